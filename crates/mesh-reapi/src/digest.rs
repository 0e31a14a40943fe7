//! Digests, parsed and checked once at the edge.
//!
//! The Remote Execution API names every blob by `{hash}/{size}`: the lowercase hexadecimal
//! hash of its bytes and its length. The hash function is SHA-256 unless a request names
//! another in its `digest_function` field (and ByteStream names in a segment:
//! `blobs/blake3/{hash}/{size}`); this server offers SHA-256 and BLAKE3 (Bazel 6.4+'s
//! `--digest_function=blake3`, which Buildbarn, BuildBuddy, NativeLink and Buildfarm accept),
//! both 32-byte hashes. A [`Digest`] carries its function, so a BLAKE3 digest and a SHA-256
//! digest never name the same blob, every blob is verified with its own function, and the
//! digests an action's tree and outputs hold are read and computed with the action's.
//!
//! Everything behind the gRPC services works with [`Digest`], which can only hold a
//! well-formed value, so a malformed digest is rejected where it enters (with an error naming
//! the value and the rule) and never reaches a store.

use std::{fmt, str::FromStr};

use bazel_remote_apis::build::bazel::remote::execution::v2::{self as re, digest_function};
use sha2::{Digest as _, Sha256};

/// The length of a hash in bytes (SHA-256 and BLAKE3 alike).
pub const HASH_LEN: usize = 32;

/// The hash function of a digest.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Default)]
#[non_exhaustive]
pub enum DigestFunction {
    /// SHA-256: the default, and what a request that names no function means.
    #[default]
    Sha256,
    /// BLAKE3 with a 32-byte output.
    Blake3,
}

impl DigestFunction {
    /// Every function this server offers, in the order Capabilities lists them.
    pub const ALL: [DigestFunction; 2] = [DigestFunction::Sha256, DigestFunction::Blake3];

    /// The function a request's `digest_function` field names: unset (`UNKNOWN`) means
    /// SHA-256; any function other than SHA-256 and BLAKE3 is refused, naming it.
    pub fn from_request(value: i32) -> Result<Self, DigestError> {
        match digest_function::Value::try_from(value) {
            Ok(digest_function::Value::Unknown | digest_function::Value::Sha256) => {
                Ok(Self::Sha256)
            }
            Ok(digest_function::Value::Blake3) => Ok(Self::Blake3),
            other => Err(DigestError {
                field: "digest_function".to_owned(),
                value: other
                    .map(|v| v.as_str_name().to_owned())
                    .unwrap_or_else(|_| value.to_string()),
                rule: DigestRule::Function,
            }),
        }
    }

    /// The function as the protocol's enum value.
    pub fn to_proto(self) -> i32 {
        match self {
            Self::Sha256 => digest_function::Value::Sha256 as i32,
            Self::Blake3 => digest_function::Value::Blake3 as i32,
        }
    }

    /// The function's name in resource names (`blobs/blake3/…`): `sha256` or `blake3`.
    pub fn name(self) -> &'static str {
        match self {
            Self::Sha256 => "sha256",
            Self::Blake3 => "blake3",
        }
    }

    /// The function a resource name's segment names, if it is one this server offers.
    pub fn from_name(name: &str) -> Option<Self> {
        Self::ALL.into_iter().find(|f| f.name() == name)
    }

    /// The digest of the empty blob under this function.
    pub fn empty(self) -> Digest {
        match self {
            Self::Sha256 => Digest::EMPTY,
            Self::Blake3 => Digest::of_with(self, b""),
        }
    }
}

/// A blob's hash, size and hash function (SHA-256 unless made otherwise).
///
/// ```
/// use mesh_reapi::Digest;
///
/// let digest = Digest::of(b"hello");
/// assert_eq!(
///     digest.to_string(),
///     "2cf24dba5fb0a30e26e83b2ac5b9e29e1b161e5c1fa7425e73043362938b9824/5"
/// );
/// let parsed: Digest = "2cf24dba5fb0a30e26e83b2ac5b9e29e1b161e5c1fa7425e73043362938b9824/5".parse()?;
/// assert_eq!(parsed, digest);
/// assert!("2CF24DBA/5".parse::<Digest>().is_err());
/// # Ok::<(), mesh_reapi::DigestError>(())
/// ```
#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Digest {
    hash: [u8; HASH_LEN],
    size: u64,
    function: DigestFunction,
}

impl Digest {
    /// The digest of the empty blob, which every CAS holds without storing it.
    pub const EMPTY: Digest = Digest {
        hash: [
            0xe3, 0xb0, 0xc4, 0x42, 0x98, 0xfc, 0x1c, 0x14, 0x9a, 0xfb, 0xf4, 0xc8, 0x99, 0x6f,
            0xb9, 0x24, 0x27, 0xae, 0x41, 0xe4, 0x64, 0x9b, 0x93, 0x4c, 0xa4, 0x95, 0x99, 0x1b,
            0x78, 0x52, 0xb8, 0x55,
        ],
        size: 0,
        function: DigestFunction::Sha256,
    };

    /// A SHA-256 digest from its parts.
    pub fn new(hash: [u8; HASH_LEN], size: u64) -> Self {
        Self::with_function(hash, size, DigestFunction::Sha256)
    }

    /// A digest from its parts.
    pub fn with_function(hash: [u8; HASH_LEN], size: u64, function: DigestFunction) -> Self {
        Self {
            hash,
            size,
            function,
        }
    }

    /// The SHA-256 digest of `bytes`.
    pub fn of(bytes: &[u8]) -> Self {
        Self::of_with(DigestFunction::Sha256, bytes)
    }

    /// The digest of `bytes` under `function`.
    pub fn of_with(function: DigestFunction, bytes: &[u8]) -> Self {
        let mut hasher = Hasher::for_function(function);
        hasher.update(bytes);
        hasher.finish()
    }

    /// The hash.
    pub fn hash(&self) -> &[u8; HASH_LEN] {
        &self.hash
    }

    /// The hash function.
    pub fn function(&self) -> DigestFunction {
        self.function
    }

    /// The hash in lowercase hexadecimal.
    pub fn hex(&self) -> String {
        to_hex(&self.hash)
    }

    /// The size in bytes.
    pub fn size(&self) -> u64 {
        self.size
    }

    /// Whether this is the digest of the empty blob.
    pub fn is_empty(&self) -> bool {
        self.size == 0 && *self == self.function.empty()
    }

    /// Parses a digest received in a request whose digest function is `function`; `field`
    /// names where it came from in the error.
    pub fn from_proto(
        digest: &re::Digest,
        field: &str,
        function: DigestFunction,
    ) -> Result<Self, DigestError> {
        let size = u64::try_from(digest.size_bytes).map_err(|_| DigestError {
            field: field.to_owned(),
            value: format!("{}/{}", abbreviate(&digest.hash), digest.size_bytes),
            rule: DigestRule::NegativeSize,
        })?;
        let hash = parse_hash(&digest.hash).map_err(|rule| DigestError {
            field: field.to_owned(),
            value: format!("{}/{}", abbreviate(&digest.hash), digest.size_bytes),
            rule,
        })?;
        Ok(Self {
            hash,
            size,
            function,
        })
    }

    /// Parses a required digest field: a missing one is an error naming `field`.
    pub fn from_required(
        digest: Option<&re::Digest>,
        field: &str,
        function: DigestFunction,
    ) -> Result<Self, DigestError> {
        match digest {
            Some(digest) => Self::from_proto(digest, field, function),
            None => Err(DigestError {
                field: field.to_owned(),
                value: String::new(),
                rule: DigestRule::Missing,
            }),
        }
    }

    /// The digest as the protocol's message.
    pub fn to_proto(&self) -> re::Digest {
        re::Digest {
            hash: self.hex(),
            size_bytes: i64::try_from(self.size).unwrap_or(i64::MAX),
        }
    }

    /// The subject of a `MISSING` precondition violation naming this blob:
    /// `blobs/{hash}/{size}` (`blobs/blake3/{hash}/{size}` for BLAKE3).
    pub fn missing_subject(&self) -> String {
        format!("blobs/{self}")
    }
}

impl From<Digest> for re::Digest {
    fn from(digest: Digest) -> Self {
        digest.to_proto()
    }
}

/// `{hash}/{size}`, and `blake3/{hash}/{size}` for BLAKE3 (the resource name form).
impl fmt::Display for Digest {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.function {
            DigestFunction::Sha256 => write!(f, "{}/{}", self.hex(), self.size),
            function => write!(f, "{}/{}/{}", function.name(), self.hex(), self.size),
        }
    }
}

impl fmt::Debug for Digest {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Digest({self})")
    }
}

impl FromStr for Digest {
    type Err = DigestError;

    /// Parses `{hash}/{size}` (SHA-256) or `{function}/{hash}/{size}` (`blake3/…`).
    fn from_str(text: &str) -> Result<Self, Self::Err> {
        let error = |rule| DigestError {
            field: String::new(),
            value: abbreviate(text),
            rule,
        };
        let (function, rest) = match text.split_once('/') {
            Some((name, rest)) if rest.contains('/') => (
                DigestFunction::from_name(name).ok_or_else(|| error(DigestRule::Form))?,
                rest,
            ),
            _ => (DigestFunction::Sha256, text),
        };
        let (hash, size) = rest
            .split_once('/')
            .ok_or_else(|| error(DigestRule::Form))?;
        let size: u64 = parse_size(size).ok_or_else(|| error(DigestRule::Size))?;
        let hash = parse_hash(hash).map_err(error)?;
        Ok(Self {
            hash,
            size,
            function,
        })
    }
}

/// A size in a resource name or digest string: decimal digits only, no sign.
pub(crate) fn parse_size(text: &str) -> Option<u64> {
    if text.is_empty() || !text.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    text.parse().ok()
}

pub(crate) fn parse_hash(text: &str) -> Result<[u8; HASH_LEN], DigestRule> {
    if text.len() != HASH_LEN * 2 {
        return Err(DigestRule::HashLength { len: text.len() });
    }
    let mut hash = [0u8; HASH_LEN];
    for (byte, pair) in hash.iter_mut().zip(text.as_bytes().chunks_exact(2)) {
        let high = hex_value(pair[0]).ok_or(DigestRule::HashCharacters)?;
        let low = hex_value(pair[1]).ok_or(DigestRule::HashCharacters)?;
        *byte = (high << 4) | low;
    }
    Ok(hash)
}

/// Lowercase hexadecimal digits only: REAPI requires lowercase, and one spelling per digest
/// keeps every store's keys unique. A table, not a match: every digest of every
/// `FindMissingBlobs` goes through here.
fn hex_value(c: u8) -> Option<u8> {
    const INVALID: u8 = 0xff;
    const TABLE: [u8; 256] = {
        let mut table = [INVALID; 256];
        let mut i = 0;
        while i < 10 {
            table[b'0' as usize + i] = i as u8;
            i += 1;
        }
        let mut i = 0;
        while i < 6 {
            table[b'a' as usize + i] = 10 + i as u8;
            i += 1;
        }
        table
    };
    let value = TABLE[usize::from(c)];
    (value != INVALID).then_some(value)
}

fn to_hex(bytes: &[u8]) -> String {
    const DIGITS: &[u8; 16] = b"0123456789abcdef";
    let mut text = String::with_capacity(bytes.len() * 2);
    for byte in bytes {
        text.push(char::from(DIGITS[usize::from(byte >> 4)]));
        text.push(char::from(DIGITS[usize::from(byte & 0x0f)]));
    }
    text
}

/// Keeps error messages bounded when a client sends something huge (80 characters shown).
pub(crate) fn abbreviate(text: &str) -> String {
    mesh_core::abbreviate(text)
}

/// Like [`abbreviate`], for values that are long when valid (resource names): up to 512
/// characters are shown.
pub(crate) fn abbreviate_long(text: &str) -> String {
    const SHOWN: usize = 512;
    if text.len() <= SHOWN {
        return text.to_owned();
    }
    let mut end = SHOWN;
    while !text.is_char_boundary(end) {
        end -= 1;
    }
    format!("{}… ({} bytes)", &text[..end], text.len())
}

/// Computes a [`Digest`] over bytes fed in pieces.
#[derive(Debug, Clone, Default)]
pub struct Hasher {
    state: HashState,
    size: u64,
}

#[derive(Debug, Clone)]
enum HashState {
    Sha256(Sha256),
    Blake3(Box<blake3::Hasher>),
}

impl Default for HashState {
    fn default() -> Self {
        Self::Sha256(Sha256::default())
    }
}

impl Hasher {
    /// A SHA-256 hasher that has seen nothing yet.
    pub fn new() -> Self {
        Self::default()
    }

    /// A hasher for `function` that has seen nothing yet.
    pub fn for_function(function: DigestFunction) -> Self {
        Self {
            state: match function {
                DigestFunction::Sha256 => HashState::Sha256(Sha256::default()),
                DigestFunction::Blake3 => HashState::Blake3(Box::default()),
            },
            size: 0,
        }
    }

    /// Feeds more bytes.
    pub fn update(&mut self, bytes: &[u8]) {
        match &mut self.state {
            HashState::Sha256(sha) => sha.update(bytes),
            HashState::Blake3(blake) => {
                blake.update(bytes);
            }
        }
        self.size = self.size.saturating_add(bytes.len() as u64);
    }

    /// Bytes fed so far.
    pub fn size(&self) -> u64 {
        self.size
    }

    /// The digest of everything fed.
    pub fn finish(self) -> Digest {
        let mut hash = [0u8; HASH_LEN];
        let function = match self.state {
            HashState::Sha256(sha) => {
                hash.copy_from_slice(sha.finalize().as_slice());
                DigestFunction::Sha256
            }
            HashState::Blake3(blake) => {
                hash = *blake.finalize().as_bytes();
                DigestFunction::Blake3
            }
        };
        Digest {
            hash,
            size: self.size,
            function,
        }
    }
}

/// A digest in a request was malformed. The message names the field, the value and the rule.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("invalid digest{} {value:?}: {rule}", field_label(field))]
pub struct DigestError {
    field: String,
    value: String,
    rule: DigestRule,
}

fn field_label(field: &str) -> String {
    if field.is_empty() {
        String::new()
    } else {
        format!(" in {field}")
    }
}

impl DigestError {
    /// The rejected value (abbreviated when very long).
    pub fn value(&self) -> &str {
        &self.value
    }

    /// The rule it broke.
    pub fn rule(&self) -> &DigestRule {
        &self.rule
    }
}

/// The rule a malformed digest broke.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum DigestRule {
    /// The field is required.
    #[error("the digest is required")]
    Missing,
    /// `size_bytes` was negative.
    #[error("size_bytes must not be negative")]
    NegativeSize,
    /// The hash has the wrong length.
    #[error(
        "the hash must be 64 lowercase hexadecimal characters (SHA-256 or BLAKE3, the digest functions this server offers), not {len}"
    )]
    HashLength {
        /// The length received.
        len: usize,
    },
    /// The hash has characters other than `0-9a-f`.
    #[error(
        "the hash must be 64 lowercase hexadecimal characters [0-9a-f] (SHA-256 or BLAKE3, the digest functions this server offers)"
    )]
    HashCharacters,
    /// A digest function this server does not offer.
    #[error("this digest function is not supported: this server offers SHA256 and BLAKE3")]
    Function,
    /// The text has no `/` between hash and size.
    #[error("expected \"{{hash}}/{{size}}\"")]
    Form,
    /// The size is not a decimal number.
    #[error("the size must be a non-negative decimal number")]
    Size,
}

#[cfg(test)]
mod tests {
    use super::*;

    const HELLO: &str = "2cf24dba5fb0a30e26e83b2ac5b9e29e1b161e5c1fa7425e73043362938b9824";

    #[test]
    fn empty_digest_is_the_sha256_of_nothing() {
        assert_eq!(Digest::of(b""), Digest::EMPTY);
        assert!(Digest::EMPTY.is_empty());
        assert_eq!(
            Digest::EMPTY.hex(),
            "e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855"
        );
    }

    #[test]
    fn incremental_hashing_matches_one_shot() {
        let data: Vec<u8> = (0..10_000u32).map(|i| (i % 251) as u8).collect();
        let mut hasher = Hasher::new();
        for chunk in data.chunks(777) {
            hasher.update(chunk);
        }
        assert_eq!(hasher.size(), 10_000);
        assert_eq!(hasher.finish(), Digest::of(&data));
    }

    #[test]
    fn proto_roundtrip() {
        let digest = Digest::of(b"hello");
        let proto = digest.to_proto();
        assert_eq!(proto.hash, HELLO);
        assert_eq!(proto.size_bytes, 5);
        assert_eq!(
            Digest::from_proto(&proto, "x", DigestFunction::Sha256).unwrap(),
            digest
        );
    }

    #[test]
    fn malformed_digests_name_value_field_and_rule() {
        let cases = [
            (
                HELLO.to_uppercase(),
                5,
                "lowercase hexadecimal characters [0-9a-f]",
            ),
            ("abc".to_owned(), 5, "not 3"),
            (format!("{}zz", &HELLO[..62]), 5, "[0-9a-f]"),
            (HELLO.to_owned(), -1, "must not be negative"),
            (String::new(), 0, "not 0"),
        ];
        for (hash, size, rule) in cases {
            let error = Digest::from_proto(
                &re::Digest {
                    hash: hash.clone(),
                    size_bytes: size,
                },
                "action_digest",
                DigestFunction::Sha256,
            )
            .unwrap_err();
            let message = error.to_string();
            assert!(message.contains(rule), "{message}");
            assert!(message.contains("in action_digest"), "{message}");
            assert!(message.contains(&format!("/{size}")), "{message}");
        }
        let missing =
            Digest::from_required(None, "input_root_digest", DigestFunction::Sha256).unwrap_err();
        assert!(
            missing.to_string().contains("input_root_digest"),
            "{missing}"
        );
        assert!(missing.to_string().contains("required"), "{missing}");
    }

    #[test]
    fn text_form_parses_strictly() {
        assert_eq!(
            format!("{HELLO}/5").parse::<Digest>().unwrap(),
            Digest::of(b"hello")
        );
        for (text, rule) in [
            (HELLO.to_owned(), "expected \"{hash}/{size}\""),
            (format!("{HELLO}/-5"), "non-negative decimal"),
            (format!("{HELLO}/+5"), "non-negative decimal"),
            (format!("{HELLO}/"), "non-negative decimal"),
            (
                format!("{HELLO}/99999999999999999999999"),
                "non-negative decimal",
            ),
            ("/5".to_owned(), "not 0"),
        ] {
            let message = text.parse::<Digest>().unwrap_err().to_string();
            assert!(message.contains(rule), "{text}: {message}");
        }
    }

    #[test]
    fn huge_values_give_bounded_errors() {
        let hash = "x".repeat(1 << 20);
        let error = Digest::from_proto(
            &re::Digest {
                hash,
                size_bytes: 1,
            },
            "f",
            DigestFunction::Sha256,
        )
        .unwrap_err();
        assert!(error.to_string().len() < 1000);
    }

    #[test]
    fn missing_subject_is_what_bazel_expects() {
        assert_eq!(
            Digest::of(b"hello").missing_subject(),
            format!("blobs/{HELLO}/5")
        );
    }
}
