//! SHA-256 digests, parsed and checked once at the edge.
//!
//! The Remote Execution API names every blob by `{hash}/{size}`: the lowercase hexadecimal
//! SHA-256 of its bytes and its length. Everything behind the gRPC services works with
//! [`Digest`], which can only hold a well-formed value, so a malformed digest is rejected where
//! it enters (with an error naming the value and the rule) and never reaches a store.

use std::{fmt, str::FromStr};

use bazel_remote_apis::build::bazel::remote::execution::v2 as re;
use sha2::{Digest as _, Sha256};

/// The length of a SHA-256 hash in bytes.
pub const HASH_LEN: usize = 32;

/// A blob's SHA-256 hash and size.
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
    };

    /// A digest from its parts.
    pub fn new(hash: [u8; HASH_LEN], size: u64) -> Self {
        Self { hash, size }
    }

    /// The digest of `bytes`.
    pub fn of(bytes: &[u8]) -> Self {
        let mut hasher = Hasher::new();
        hasher.update(bytes);
        hasher.finish()
    }

    /// The SHA-256 hash.
    pub fn hash(&self) -> &[u8; HASH_LEN] {
        &self.hash
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
        *self == Self::EMPTY
    }

    /// Parses a digest received in a request; `field` names where it came from in the error.
    pub fn from_proto(digest: &re::Digest, field: &str) -> Result<Self, DigestError> {
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
        Ok(Self { hash, size })
    }

    /// Parses a required digest field: a missing one is an error naming `field`.
    pub fn from_required(digest: Option<&re::Digest>, field: &str) -> Result<Self, DigestError> {
        match digest {
            Some(digest) => Self::from_proto(digest, field),
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
    /// `blobs/{hash}/{size}`.
    pub fn missing_subject(&self) -> String {
        format!("blobs/{self}")
    }
}

impl From<Digest> for re::Digest {
    fn from(digest: Digest) -> Self {
        digest.to_proto()
    }
}

impl fmt::Display for Digest {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.hex(), self.size)
    }
}

impl fmt::Debug for Digest {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Digest({self})")
    }
}

impl FromStr for Digest {
    type Err = DigestError;

    /// Parses `{hash}/{size}`.
    fn from_str(text: &str) -> Result<Self, Self::Err> {
        let error = |rule| DigestError {
            field: String::new(),
            value: abbreviate(text),
            rule,
        };
        let (hash, size) = text
            .split_once('/')
            .ok_or_else(|| error(DigestRule::Form))?;
        let size: u64 = parse_size(size).ok_or_else(|| error(DigestRule::Size))?;
        let hash = parse_hash(hash).map_err(error)?;
        Ok(Self { hash, size })
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
    sha: Sha256,
    size: u64,
}

impl Hasher {
    /// A hasher that has seen nothing yet.
    pub fn new() -> Self {
        Self::default()
    }

    /// Feeds more bytes.
    pub fn update(&mut self, bytes: &[u8]) {
        self.sha.update(bytes);
        self.size = self.size.saturating_add(bytes.len() as u64);
    }

    /// Bytes fed so far.
    pub fn size(&self) -> u64 {
        self.size
    }

    /// The digest of everything fed.
    pub fn finish(self) -> Digest {
        let output = self.sha.finalize();
        let mut hash = [0u8; HASH_LEN];
        hash.copy_from_slice(output.as_slice());
        Digest {
            hash,
            size: self.size,
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
        "the hash must be 64 lowercase hexadecimal characters (SHA-256, the only digest function this server offers), not {len}"
    )]
    HashLength {
        /// The length received.
        len: usize,
    },
    /// The hash has characters other than `0-9a-f`.
    #[error(
        "the hash must be 64 lowercase hexadecimal characters [0-9a-f] (SHA-256, the only digest function this server offers)"
    )]
    HashCharacters,
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
        assert_eq!(Digest::from_proto(&proto, "x").unwrap(), digest);
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
            )
            .unwrap_err();
            let message = error.to_string();
            assert!(message.contains(rule), "{message}");
            assert!(message.contains("in action_digest"), "{message}");
            assert!(message.contains(&format!("/{size}")), "{message}");
        }
        let missing = Digest::from_required(None, "input_root_digest").unwrap_err();
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
