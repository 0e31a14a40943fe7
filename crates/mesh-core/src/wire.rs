//! The datagram envelope: `[magic 2B][version 1B][kind 1B][body]`.
//!
//! Every datagram the mesh sends or accepts starts with this four-byte header, so anything else
//! arriving on the gossip port (a port scanner, a node of another protocol version, garbage) is
//! recognised and dropped before it reaches foca. The high bit of `kind` marks an encrypted body
//! (`nonce ‖ ChaCha20-Poly1305 ciphertext`).

use std::fmt;

/// First two bytes of every datagram (`"ms"`).
pub const MAGIC: [u8; 2] = *b"ms";
/// The envelope version this build speaks.
pub const WIRE_VERSION: u8 = 1;
/// Length of the envelope header.
pub const HEADER_LEN: usize = 4;
/// The datagram budget: nothing larger is sent or accepted.
pub const MAX_DATAGRAM: usize = 1400;

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
}

impl Kind {
    fn to_byte(self) -> u8 {
        match self {
            Kind::Foca => 1,
            Kind::StatePush => 2,
            Kind::Leave => 3,
        }
    }

    fn from_byte(byte: u8) -> Option<Self> {
        match byte {
            1 => Some(Kind::Foca),
            2 => Some(Kind::StatePush),
            3 => Some(Kind::Leave),
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn header_roundtrip() {
        for kind in [Kind::Foca, Kind::StatePush, Kind::Leave] {
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
}

/// Seals outgoing bodies into datagrams and opens incoming ones.
#[derive(Debug, Clone, Default)]
pub(crate) struct Envelope {}

impl Envelope {
    /// Bytes this envelope adds to every body.
    pub(crate) fn overhead(&self) -> usize {
        HEADER_LEN
    }

    /// Writes the datagram for `body` into `out` (cleared first).
    pub(crate) fn seal(&self, kind: Kind, body: &[u8], out: &mut Vec<u8>) {
        out.clear();
        out.extend_from_slice(
            &Header {
                kind,
                encrypted: false,
            }
            .to_bytes(),
        );
        out.extend_from_slice(body);
    }

    /// Checks a received datagram and returns what it carries.
    pub(crate) fn open<'a>(&self, datagram: &'a [u8]) -> Result<(Kind, &'a [u8]), WireError> {
        let (header, body) = parse(datagram)?;
        if header.encrypted {
            return Err(WireError::UnexpectedEncryption);
        }
        Ok((header.kind, body))
    }
}
