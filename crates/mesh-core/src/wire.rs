//! The datagram envelope: `[magic 2B][version 1B][kind 1B][body]`.
//!
//! Every datagram the mesh sends or accepts starts with this four-byte header, so anything else
//! arriving on the gossip port (a port scanner, a node of another protocol version, garbage) is
//! recognised and dropped before it reaches foca.
//!
//! # Plain and encrypted bodies
//!
//! Without a [`Keyring`](crate::Keyring) the body is the message itself:
//!
//! ```text
//! "m" "s" 0x01 kind  ‖ message
//! ```
//!
//! With a keyring, the high bit of `kind` is set and the body is sealed with
//! XChaCha20-Poly1305 under the primary key ([`NONCE_LEN`] random bytes, a [`TAG_LEN`]-byte
//! tag; see [`crate::keyring`] for the construction and key rotation):
//!
//! ```text
//! "m" "s" 0x01 kind|0x80 ‖ nonce (24 B) ‖ ciphertext (= message length) ‖ tag (16 B)
//! associated data: "m" "s" 0x01 kind|0x80 ‖ cluster label (0-255 bytes, never sent)
//! ```
//!
//! The associated data binds the header and the cluster label to the ciphertext: changing any
//! header byte, or opening the datagram under another label, fails authentication exactly like
//! a wrong key. A node with a keyring refuses plain datagrams and a node without one refuses
//! encrypted datagrams, so a cluster is either encrypted or not. Decryption happens on the
//! receive task; nothing that fails it reaches foca.

use std::{fmt, sync::Arc};

use chacha20poly1305::{AeadInOut, XNonce};
use rand::TryRng;

use crate::keyring::SharedKeyring;

/// First two bytes of every datagram (`"ms"`).
pub const MAGIC: [u8; 2] = *b"ms";
/// The envelope version this build speaks.
pub const WIRE_VERSION: u8 = 1;
/// Length of the envelope header.
pub const HEADER_LEN: usize = 4;
/// The datagram budget: nothing larger is sent or accepted.
pub const MAX_DATAGRAM: usize = 1400;
/// Length of the random nonce in front of an encrypted body.
pub const NONCE_LEN: usize = 24;
/// Length of the authentication tag at the end of an encrypted body.
pub const TAG_LEN: usize = 16;
/// The longest cluster label, in bytes.
pub const MAX_CLUSTER_LABEL_LEN: usize = 255;

const ENCRYPTED: u8 = 0x80;

/// What a datagram carries.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum Kind {
    /// A foca SWIM packet.
    Foca,
    /// A node pushing its own [`crate::NodeState`] directly (on change, on join, periodically).
    StatePush,
    /// A node announcing that it is leaving; the body is its [`crate::Identity`].
    Leave,
    /// Lifeguard's suspicion messages (buddy notices, witness checks, refutations,
    /// confirmations, and the notice that a suspect was declared down), outside foca's own
    /// packets.
    Lifeguard,
}

impl Kind {
    fn to_byte(self) -> u8 {
        match self {
            Kind::Foca => 1,
            Kind::StatePush => 2,
            Kind::Leave => 3,
            Kind::Lifeguard => 4,
        }
    }

    fn from_byte(byte: u8) -> Option<Self> {
        match byte {
            1 => Some(Kind::Foca),
            2 => Some(Kind::StatePush),
            3 => Some(Kind::Leave),
            4 => Some(Kind::Lifeguard),
            _ => None,
        }
    }
}

impl fmt::Display for Kind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Kind::Foca => "foca",
            Kind::StatePush => "state-push",
            Kind::Leave => "leave",
            Kind::Lifeguard => "lifeguard",
        })
    }
}

/// A parsed envelope header.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Header {
    /// What the body carries.
    pub kind: Kind,
    /// Whether the body is encrypted.
    pub encrypted: bool,
}

impl Header {
    /// The four header bytes.
    pub fn to_bytes(self) -> [u8; HEADER_LEN] {
        let flags = if self.encrypted { ENCRYPTED } else { 0 };
        [
            MAGIC[0],
            MAGIC[1],
            WIRE_VERSION,
            self.kind.to_byte() | flags,
        ]
    }
}

/// Splits a datagram into its header and body, checking the header.
pub fn parse(datagram: &[u8]) -> Result<(Header, &[u8]), WireError> {
    if datagram.len() > MAX_DATAGRAM {
        return Err(WireError::TooLarge {
            len: datagram.len(),
        });
    }
    let Some((head, body)) = datagram.split_first_chunk::<HEADER_LEN>() else {
        return Err(WireError::TooShort {
            len: datagram.len(),
        });
    };
    if head[..2] != MAGIC {
        return Err(WireError::BadMagic {
            found: [head[0], head[1]],
        });
    }
    if head[2] != WIRE_VERSION {
        return Err(WireError::UnsupportedVersion { found: head[2] });
    }
    let kind =
        Kind::from_byte(head[3] & !ENCRYPTED).ok_or(WireError::UnknownKind { found: head[3] })?;
    Ok((
        Header {
            kind,
            encrypted: head[3] & ENCRYPTED != 0,
        },
        body,
    ))
}

/// Why a datagram was dropped before it reached foca.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum WireError {
    /// Shorter than the header.
    #[error("datagram of {len} bytes is shorter than the 4-byte envelope header")]
    TooShort {
        /// Its length.
        len: usize,
    },
    /// Over [`MAX_DATAGRAM`].
    #[error("datagram of {len} bytes exceeds the 1400-byte budget")]
    TooLarge {
        /// Its length.
        len: usize,
    },
    /// Does not start with [`MAGIC`].
    #[error("datagram does not start with the mesh magic \"ms\" (found {found:02x?})")]
    BadMagic {
        /// The first two bytes.
        found: [u8; 2],
    },
    /// Another envelope version.
    #[error("datagram has envelope version {found}, this node speaks version 1")]
    UnsupportedVersion {
        /// The version byte found.
        found: u8,
    },
    /// A kind this build does not know.
    #[error("datagram has unknown kind byte {found:#04x}")]
    UnknownKind {
        /// The kind byte found.
        found: u8,
    },
    /// Encrypted, but no keyring is configured here.
    #[error("datagram is encrypted but this node has no keyring configured")]
    UnexpectedEncryption,
    /// Plain, but this node requires encryption.
    #[error("datagram is not encrypted but this node requires a cluster key")]
    MissingEncryption,
    /// No key in the keyring authenticates it (wrong key, wrong cluster label, or tampering).
    #[error("datagram failed authentication with every key in the keyring")]
    Unauthenticated,
}

impl WireError {
    /// A short, stable label for metrics.
    pub fn label(&self) -> &'static str {
        match self {
            WireError::TooShort { .. } => "too_short",
            WireError::TooLarge { .. } => "too_large",
            WireError::BadMagic { .. } => "bad_magic",
            WireError::UnsupportedVersion { .. } => "unsupported_version",
            WireError::UnknownKind { .. } => "unknown_kind",
            WireError::UnexpectedEncryption => "unexpected_encryption",
            WireError::MissingEncryption => "missing_encryption",
            WireError::Unauthenticated => "unauthenticated",
        }
    }
}

/// A cluster label no longer than [`MAX_CLUSTER_LABEL_LEN`] bytes.
#[derive(Debug, Clone, Default)]
pub(crate) struct ClusterLabel(Arc<str>);

impl ClusterLabel {
    /// `None` if `label` is longer than [`MAX_CLUSTER_LABEL_LEN`] bytes.
    pub(crate) fn new(label: &str) -> Option<Self> {
        (label.len() <= MAX_CLUSTER_LABEL_LEN).then(|| Self(label.into()))
    }
}

/// Seals outgoing bodies into datagrams and opens incoming ones, in plain text or, with a
/// keyring, encrypted and authenticated. The membership task and its receive task use one
/// each; it is public so the codec can be fuzzed, benchmarked and used by tools that read
/// gossip traffic.
///
/// ```
/// use mesh_core::{Keyring, SecretKey, wire::{Envelope, Kind, MAX_DATAGRAM}};
///
/// let key = SecretKey::from_bytes([7; 32]);
/// let envelope = Envelope::with_keyring(Keyring::new(key), "prod").unwrap();
/// let mut datagram = Vec::new();
/// envelope.seal(Kind::StatePush, b"state", &mut datagram)?;
/// assert_eq!(datagram.len(), b"state".len() + envelope.overhead());
///
/// let mut scratch = [0; MAX_DATAGRAM];
/// assert_eq!(envelope.open(&datagram, &mut scratch)?, (Kind::StatePush, &b"state"[..]));
/// assert!(Envelope::plain().open(&datagram, &mut scratch).is_err());
/// # Ok::<(), Box<dyn std::error::Error>>(())
/// ```
#[derive(Debug, Clone, Default)]
pub struct Envelope {
    encryption: Option<Encryption>,
}

#[derive(Debug, Clone)]
struct Encryption {
    keyring: Arc<SharedKeyring>,
    label: ClusterLabel,
}

impl Encryption {
    /// The header (encrypted bit set) followed by the label, built on the stack.
    fn associated_data(&self, header: Header) -> AssociatedData {
        let label = self.label.0.as_bytes();
        let mut bytes = [0; HEADER_LEN + MAX_CLUSTER_LABEL_LEN];
        bytes[..HEADER_LEN].copy_from_slice(&header.to_bytes());
        // `ClusterLabel` holds at most MAX_CLUSTER_LABEL_LEN bytes.
        bytes[HEADER_LEN..HEADER_LEN + label.len()].copy_from_slice(label);
        AssociatedData {
            bytes,
            len: HEADER_LEN + label.len(),
        }
    }
}

struct AssociatedData {
    bytes: [u8; HEADER_LEN + MAX_CLUSTER_LABEL_LEN],
    len: usize,
}

impl AssociatedData {
    fn as_slice(&self) -> &[u8] {
        &self.bytes[..self.len]
    }
}

/// Why a datagram could not be sealed; it is not sent.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum SealError {
    /// No nonce: the operating system's random source failed.
    #[error("the operating system's random source failed: {0}")]
    Random(#[source] rand::rngs::SysError),
    /// The cipher refused the body (only bodies of 256 GiB and more are refused).
    #[error("the body is too long to encrypt")]
    TooLong,
}

impl Envelope {
    /// An envelope without encryption.
    pub fn plain() -> Self {
        Self::default()
    }

    /// An envelope that encrypts with `keyring`'s primary key and authenticates `label`;
    /// `None` if the label is longer than [`MAX_CLUSTER_LABEL_LEN`] bytes.
    pub fn with_keyring(keyring: crate::Keyring, label: &str) -> Option<Self> {
        Some(Self::encrypted(
            Arc::new(SharedKeyring::new(keyring)),
            ClusterLabel::new(label)?,
        ))
    }

    /// An envelope that encrypts with `keyring`'s primary key and authenticates `label`.
    pub(crate) fn encrypted(keyring: Arc<SharedKeyring>, label: ClusterLabel) -> Self {
        Self {
            encryption: Some(Encryption { keyring, label }),
        }
    }

    /// Bytes this envelope adds to every body.
    pub fn overhead(&self) -> usize {
        match self.encryption {
            Some(_) => HEADER_LEN + NONCE_LEN + TAG_LEN,
            None => HEADER_LEN,
        }
    }

    /// Writes the datagram for `body` into `out` (cleared first; reusing its allocation). On
    /// error `out` holds no datagram and nothing must be sent.
    pub fn seal(&self, kind: Kind, body: &[u8], out: &mut Vec<u8>) -> Result<(), SealError> {
        out.clear();
        let Some(encryption) = &self.encryption else {
            let header = Header {
                kind,
                encrypted: false,
            };
            out.extend_from_slice(&header.to_bytes());
            out.extend_from_slice(body);
            return Ok(());
        };
        let header = Header {
            kind,
            encrypted: true,
        };
        let mut nonce = XNonce::default();
        rand::rngs::SysRng
            .try_fill_bytes(&mut nonce)
            .map_err(SealError::Random)?;
        out.extend_from_slice(&header.to_bytes());
        out.extend_from_slice(&nonce);
        out.extend_from_slice(body);
        let associated_data = encryption.associated_data(header);
        let sealed = encryption
            .keyring
            .load()
            .primary()
            .cipher()
            .encrypt_inout_detached(
                &nonce,
                associated_data.as_slice(),
                (&mut out[HEADER_LEN + NONCE_LEN..]).into(),
            );
        match sealed {
            Ok(tag) => {
                out.extend_from_slice(&tag);
                Ok(())
            }
            Err(_) => {
                out.clear();
                Err(SealError::TooLong)
            }
        }
    }

    /// Checks a received datagram and returns what it carries. An encrypted body is decrypted
    /// into `scratch`.
    pub fn open<'a>(
        &self,
        datagram: &'a [u8],
        scratch: &'a mut [u8; MAX_DATAGRAM],
    ) -> Result<(Kind, &'a [u8]), WireError> {
        let (header, body) = parse(datagram)?;
        let encryption = match (&self.encryption, header.encrypted) {
            (None, false) => return Ok((header.kind, body)),
            (None, true) => return Err(WireError::UnexpectedEncryption),
            (Some(_), false) => return Err(WireError::MissingEncryption),
            (Some(encryption), true) => encryption,
        };
        let (nonce, sealed) = body
            .split_first_chunk::<NONCE_LEN>()
            .ok_or(WireError::Unauthenticated)?;
        let (ciphertext, tag) = sealed
            .split_last_chunk::<TAG_LEN>()
            .ok_or(WireError::Unauthenticated)?;
        // `parse` bounds every datagram, and so every ciphertext, by MAX_DATAGRAM.
        let plaintext = &mut scratch[..ciphertext.len()];
        let associated_data = encryption.associated_data(header);
        let keyring = encryption.keyring.load();
        for key in keyring.decryption_keys() {
            // Each attempt starts from the ciphertext, whatever a failed one left behind.
            plaintext.copy_from_slice(ciphertext);
            let opened = key.cipher().decrypt_inout_detached(
                nonce.into(),
                associated_data.as_slice(),
                (&mut *plaintext).into(),
                tag.into(),
            );
            if opened.is_ok() {
                return Ok((header.kind, plaintext));
            }
        }
        Err(WireError::Unauthenticated)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{Keyring, SecretKey};

    #[test]
    fn header_roundtrip() {
        for kind in [Kind::Foca, Kind::StatePush, Kind::Leave, Kind::Lifeguard] {
            for encrypted in [false, true] {
                let header = Header { kind, encrypted };
                let mut datagram = header.to_bytes().to_vec();
                datagram.extend_from_slice(b"body");
                let (parsed, body) = parse(&datagram).unwrap();
                assert_eq!(parsed, header);
                assert_eq!(body, b"body");
            }
        }
    }

    #[test]
    fn rejects_each_malformation_with_its_reason() {
        assert_eq!(parse(b"ms\x01"), Err(WireError::TooShort { len: 3 }));
        assert_eq!(
            parse(b"xx\x01\x01"),
            Err(WireError::BadMagic { found: *b"xx" })
        );
        assert_eq!(
            parse(b"ms\x09\x01"),
            Err(WireError::UnsupportedVersion { found: 9 })
        );
        assert_eq!(
            parse(b"ms\x01\x7f"),
            Err(WireError::UnknownKind { found: 0x7f })
        );
        assert_eq!(parse(&[0u8; 1401]), Err(WireError::TooLarge { len: 1401 }));
        let message = WireError::UnsupportedVersion { found: 9 }.to_string();
        assert!(message.contains('9') && message.contains("version 1"));
    }

    fn keyring(keys: &[u8]) -> Arc<SharedKeyring> {
        let mut keys = keys.iter().map(|&b| SecretKey::from_bytes([b; 32]));
        let mut keyring = Keyring::new(keys.next().unwrap());
        for key in keys {
            keyring.install(key);
        }
        Arc::new(SharedKeyring::new(keyring))
    }

    fn encrypted(keys: &[u8], label: &str) -> Envelope {
        Envelope::encrypted(keyring(keys), ClusterLabel::new(label).unwrap())
    }

    fn sealed(envelope: &Envelope, kind: Kind, body: &[u8]) -> Vec<u8> {
        let mut out = Vec::new();
        envelope.seal(kind, body, &mut out).unwrap();
        out
    }

    fn open(envelope: &Envelope, datagram: &[u8]) -> Result<(Kind, Vec<u8>), WireError> {
        let mut scratch = [0; MAX_DATAGRAM];
        envelope
            .open(datagram, &mut scratch)
            .map(|(kind, body)| (kind, body.to_vec()))
    }

    #[test]
    fn seal_open_roundtrip_plain_and_encrypted() {
        let body = b"a foca packet".as_slice();
        for envelope in [
            Envelope::default(),
            encrypted(&[1], ""),
            encrypted(&[1, 2], "prod"),
        ] {
            for kind in [Kind::Foca, Kind::StatePush, Kind::Leave] {
                let datagram = sealed(&envelope, kind, body);
                assert_eq!(datagram.len(), body.len() + envelope.overhead());
                assert_eq!(open(&envelope, &datagram), Ok((kind, body.to_vec())));
            }
            let empty = sealed(&envelope, Kind::Leave, &[]);
            assert_eq!(open(&envelope, &empty), Ok((Kind::Leave, Vec::new())));
        }
    }

    #[test]
    fn an_encrypted_datagram_hides_the_body_and_never_repeats_a_nonce() {
        let envelope = encrypted(&[1], "");
        let body = b"pending=3 max_concurrency=8";
        let first = sealed(&envelope, Kind::StatePush, body);
        let second = sealed(&envelope, Kind::StatePush, body);
        assert_eq!(envelope.overhead(), HEADER_LEN + NONCE_LEN + TAG_LEN);
        assert_eq!(first[..3], *b"ms\x01");
        assert_eq!(first[3], 0x82, "kind with the encrypted bit");
        assert!(!first.windows(7).any(|w| w == b"pending"));
        assert_ne!(first[4..4 + NONCE_LEN], second[4..4 + NONCE_LEN]);
        assert_ne!(first[4 + NONCE_LEN..], second[4 + NONCE_LEN..]);
    }

    #[test]
    fn opens_a_datagram_sealed_by_another_implementation() {
        // Built with Python (HChaCha20 checked against draft-irtf-cfrg-xchacha, then
        // `cryptography`'s ChaCha20-Poly1305): key 32 × 0x01, label "prod", kind foca,
        // nonce 00 01 … 17, body "ping".
        let datagram = [
            0x6d, 0x73, 0x01, 0x81, 0x00, 0x01, 0x02, 0x03, 0x04, 0x05, 0x06, 0x07, 0x08, 0x09,
            0x0a, 0x0b, 0x0c, 0x0d, 0x0e, 0x0f, 0x10, 0x11, 0x12, 0x13, 0x14, 0x15, 0x16, 0x17,
            0x08, 0xb9, 0xb5, 0xe2, 0x7e, 0x69, 0x92, 0x0a, 0x1d, 0xb8, 0x47, 0xe6, 0xc6, 0x90,
            0x51, 0x1f, 0x05, 0x18, 0xae, 0x9d,
        ];
        assert_eq!(
            open(&encrypted(&[1], "prod"), &datagram),
            Ok((Kind::Foca, b"ping".to_vec()))
        );
    }

    #[test]
    fn every_single_bit_flip_is_rejected() {
        let envelope = encrypted(&[7, 8], "prod");
        let datagram = sealed(&envelope, Kind::Foca, b"ping from node-1");
        for bit in 0..datagram.len() * 8 {
            let mut flipped = datagram.clone();
            flipped[bit / 8] ^= 1 << (bit % 8);
            assert!(
                open(&envelope, &flipped).is_err(),
                "flipping bit {bit} was not detected"
            );
        }
        assert!(open(&envelope, &datagram).is_ok());
    }

    #[test]
    fn truncated_or_extended_datagrams_are_rejected() {
        let envelope = encrypted(&[1], "");
        let datagram = sealed(&envelope, Kind::Foca, b"ping");
        for len in 0..datagram.len() {
            assert!(open(&envelope, &datagram[..len]).is_err(), "length {len}");
        }
        let mut longer = datagram.clone();
        longer.push(0);
        assert_eq!(open(&envelope, &longer), Err(WireError::Unauthenticated));
        // Header only, and a body too short to hold a nonce and a tag.
        assert_eq!(
            open(&envelope, &datagram[..HEADER_LEN + NONCE_LEN + TAG_LEN - 1]),
            Err(WireError::Unauthenticated)
        );
    }

    #[test]
    fn another_label_or_key_cannot_open_a_datagram() {
        let datagram = sealed(&encrypted(&[1], "prod"), Kind::Foca, b"ping");
        assert_eq!(
            open(&encrypted(&[1], "staging"), &datagram),
            Err(WireError::Unauthenticated)
        );
        assert_eq!(
            open(&encrypted(&[1], ""), &datagram),
            Err(WireError::Unauthenticated)
        );
        assert_eq!(
            open(&encrypted(&[2], "prod"), &datagram),
            Err(WireError::Unauthenticated)
        );
        // The label is not a prefix game: "pro" + "d" in the body is not "prod".
        let short_label = sealed(&encrypted(&[1], "pro"), Kind::Foca, b"dping");
        assert_eq!(
            open(&encrypted(&[1], "prod"), &short_label),
            Err(WireError::Unauthenticated)
        );
    }

    #[test]
    fn any_installed_key_opens_and_only_the_primary_seals() {
        let sender = encrypted(&[2, 1], "");
        let datagram = sealed(&sender, Kind::Foca, b"ping");
        // Secondary on the receiver: still opens.
        assert!(open(&encrypted(&[1, 2], ""), &datagram).is_ok());
        // Sealed with the primary (2), not the secondary (1).
        assert_eq!(
            open(&encrypted(&[1], ""), &datagram),
            Err(WireError::Unauthenticated)
        );
    }

    #[test]
    fn live_key_changes_apply_to_the_next_datagram() {
        let shared = keyring(&[1]);
        let envelope = Envelope::encrypted(Arc::clone(&shared), ClusterLabel::default());
        let new = SecretKey::from_bytes([2; 32]);
        shared.update(|k| Ok(k.install(new.clone()))).unwrap();
        shared.update(|k| k.use_primary(&new)).unwrap();
        let datagram = sealed(&envelope, Kind::Foca, b"ping");
        assert!(open(&encrypted(&[2], ""), &datagram).is_ok());
        assert!(open(&encrypted(&[1], ""), &datagram).is_err());
    }

    #[test]
    fn a_cluster_is_either_encrypted_or_not() {
        let plain = Envelope::default();
        let secret = encrypted(&[1], "");
        assert_eq!(
            open(&secret, &sealed(&plain, Kind::Foca, b"ping")),
            Err(WireError::MissingEncryption)
        );
        assert_eq!(
            open(&plain, &sealed(&secret, Kind::Foca, b"ping")),
            Err(WireError::UnexpectedEncryption)
        );
    }

    #[test]
    fn cluster_labels_are_at_most_255_bytes() {
        assert!(ClusterLabel::new(&"x".repeat(MAX_CLUSTER_LABEL_LEN)).is_some());
        assert!(ClusterLabel::new(&"x".repeat(MAX_CLUSTER_LABEL_LEN + 1)).is_none());
        let longest = "é".repeat(MAX_CLUSTER_LABEL_LEN / 2);
        let envelope = encrypted(&[1], &longest);
        let datagram = sealed(&envelope, Kind::Foca, b"ping");
        assert!(open(&envelope, &datagram).is_ok());
    }
}
