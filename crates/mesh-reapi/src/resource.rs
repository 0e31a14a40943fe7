//! ByteStream resource names (REAPI v2, "ByteStream API" section of `remote_execution.proto`).
//!
//! * reads: `{instance_name/}blobs/{hash}/{size}{/optional_metadata}`, or compressed,
//!   `{instance_name/}compressed-blobs/zstd/{hash}/{size}`
//! * writes: `{instance_name/}uploads/{uuid}/blobs/{hash}/{size}{/optional_metadata}`, or
//!   `{instance_name/}uploads/{uuid}/compressed-blobs/zstd/{hash}/{size}{/…}`
//!
//! The instance name may itself contain `/` but never the reserved segments `blobs`,
//! `uploads` or `compressed-blobs`, so the first reserved segment ends it. The only
//! compressor is zstd ([`crate::compression`]); the hash and size are always those of the
//! uncompressed blob. The digest function is SHA-256 unless a segment names BLAKE3
//! (`blobs/blake3/{hash}/{size}`, as newer clients send); other functions are refused with a
//! clear error.

use crate::{Digest, DigestError, DigestFunction, digest::abbreviate_long};

/// A parsed ByteStream resource name.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ResourceName {
    /// Everything before the reserved segment, without the trailing `/` (may be empty).
    pub instance_name: String,
    /// The blob (uncompressed).
    pub digest: Digest,
    /// How its bytes travel: as they are, or zstd-compressed.
    pub compressor: Compressor,
}

/// How a blob's bytes travel in a ByteStream call.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub enum Compressor {
    /// As they are (`blobs/…`).
    Identity,
    /// One zstd frame (`compressed-blobs/zstd/…`).
    Zstd,
}

impl ResourceName {
    /// Parses a `Read` resource name: `{instance_name/}blobs/{hash}/{size}{/…}`.
    pub fn parse_read(name: &str) -> Result<Self, ResourceNameError> {
        parse(name, Kind::Read)
    }

    /// Parses a `Write` resource name: `{instance_name/}uploads/{uuid}/blobs/{hash}/{size}{/…}`.
    pub fn parse_write(name: &str) -> Result<Self, ResourceNameError> {
        parse(name, Kind::Write)
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Kind {
    Read,
    Write,
}

impl Kind {
    fn expected(self) -> &'static str {
        match self {
            Kind::Read => "\"{instance_name/}blobs/{hash}/{size}\"",
            Kind::Write => "\"{instance_name/}uploads/{uuid}/blobs/{hash}/{size}\"",
        }
    }
}

fn parse(name: &str, kind: Kind) -> Result<ResourceName, ResourceNameError> {
    let error = |rule| ResourceNameError {
        name: abbreviate_long(name),
        expected: kind.expected(),
        rule,
    };
    let segments: Vec<&str> = name.split('/').collect();
    let reserved = segments
        .iter()
        .position(|s| matches!(*s, "blobs" | "uploads" | "compressed-blobs"))
        .ok_or_else(|| error(ResourceRule::NoBlobsSegment))?;
    let instance_name = segments[..reserved].join("/");
    let mut rest = &segments[reserved..];
    if kind == Kind::Write {
        match rest {
            ["uploads", uuid, tail @ ..] if !uuid.is_empty() => rest = tail,
            ["uploads", ..] => return Err(error(ResourceRule::MissingUploadId)),
            _ => return Err(error(ResourceRule::NotAnUpload)),
        }
    }
    let (compressor, tail) = match rest {
        ["compressed-blobs", "zstd", tail @ ..] => (Compressor::Zstd, tail),
        ["compressed-blobs", compressor, ..] => {
            return Err(error(ResourceRule::Compressor {
                compressor: (*compressor).to_owned(),
            }));
        }
        ["compressed-blobs"] => return Err(error(ResourceRule::Truncated)),
        ["blobs", tail @ ..] => (Compressor::Identity, tail),
        ["uploads", ..] => return Err(error(ResourceRule::UploadInRead)),
        _ => return Err(error(ResourceRule::NoBlobsSegment)),
    };
    match tail {
        [function, tail @ ..] if DIGEST_FUNCTIONS.contains(function) => {
            let Some(function) = DigestFunction::from_name(function) else {
                return Err(error(ResourceRule::DigestFunction {
                    function: (*function).to_owned(),
                }));
            };
            blob(tail, instance_name, compressor, function).map_err(error)
        }
        tail if tail.len() >= 2 => {
            blob(tail, instance_name, compressor, DigestFunction::Sha256).map_err(error)
        }
        _ => Err(error(ResourceRule::Truncated)),
    }
}

/// Names of digest functions as newer clients spell them in resource names.
const DIGEST_FUNCTIONS: [&str; 10] = [
    "sha256",
    "sha1",
    "md5",
    "vso",
    "sha384",
    "sha512",
    "murmur3",
    "sha256tree",
    "blake3",
    "gitsha1",
];

/// `{hash}/{size}` and what may follow.
fn blob(
    segments: &[&str],
    instance_name: String,
    compressor: Compressor,
    function: DigestFunction,
) -> Result<ResourceName, ResourceRule> {
    let [hash, size, ..] = segments else {
        return Err(ResourceRule::Truncated);
    };
    let digest: Digest = format!("{hash}/{size}")
        .parse()
        .map_err(|e: DigestError| ResourceRule::Digest(e.rule().clone()))?;
    Ok(ResourceName {
        instance_name,
        digest: Digest::with_function(*digest.hash(), digest.size(), function),
        compressor,
    })
}

/// A resource name was malformed. The message names the value, the rule and the expected form.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("invalid resource name {name:?}: {rule}; expected {expected}")]
pub struct ResourceNameError {
    name: String,
    expected: &'static str,
    rule: ResourceRule,
}

impl ResourceNameError {
    /// The rule the name broke.
    pub fn rule(&self) -> &ResourceRule {
        &self.rule
    }
}

/// What was wrong with a resource name.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum ResourceRule {
    /// There is no `blobs` segment.
    #[error("there is no \"blobs\" segment")]
    NoBlobsSegment,
    /// `blobs/` is not followed by a hash and a size.
    #[error("\"blobs\" (or \"compressed-blobs/zstd\") must be followed by a hash and a size")]
    Truncated,
    /// A write name without `uploads/{uuid}/`.
    #[error("a write must name \"uploads/{{uuid}}/\" before \"blobs\"")]
    NotAnUpload,
    /// `uploads/` with an empty id.
    #[error("the upload id after \"uploads/\" is empty")]
    MissingUploadId,
    /// An upload name given to a read.
    #[error("reads name \"blobs/\", not \"uploads/\"")]
    UploadInRead,
    /// `compressed-blobs/{compressor}/…` with a compressor other than zstd.
    #[error("compressor {compressor:?} is not supported: this server offers zstd only")]
    Compressor {
        /// The compressor named.
        compressor: String,
    },
    /// `blobs/{function}/…` with a function other than SHA-256 and BLAKE3.
    #[error("digest function {function:?} is not supported: this server offers sha256 and blake3")]
    DigestFunction {
        /// The function named.
        function: String,
    },
    /// The hash or size is malformed.
    #[error("{0}")]
    Digest(crate::DigestRule),
}

#[cfg(test)]
mod tests {
    use super::*;

    const HASH: &str = "2cf24dba5fb0a30e26e83b2ac5b9e29e1b161e5c1fa7425e73043362938b9824";

    #[test]
    fn reads_with_and_without_instance() {
        let name = ResourceName::parse_read(&format!("blobs/{HASH}/5")).unwrap();
        assert_eq!(name.instance_name, "");
        assert_eq!(name.digest, Digest::of(b"hello"));
        let name =
            ResourceName::parse_read(&format!("a/b/main/blobs/{HASH}/5/extra/meta")).unwrap();
        assert_eq!(name.instance_name, "a/b/main");
        assert_eq!(name.digest.size(), 5);
    }

    #[test]
    fn writes_with_and_without_instance() {
        let name = ResourceName::parse_write(&format!(
            "uploads/0190b6c4-6f1c-7cc0-9d5e-3f6b8a2e4d10/blobs/{HASH}/5"
        ))
        .unwrap();
        assert_eq!(name.instance_name, "");
        assert_eq!(name.digest, Digest::of(b"hello"));
        let name =
            ResourceName::parse_write(&format!("main/uploads/x/blobs/{HASH}/5/meta")).unwrap();
        assert_eq!(name.instance_name, "main");
    }

    #[test]
    fn malformed_names_say_what_is_wrong() {
        let read_cases = [
            (String::new(), "no \"blobs\" segment"),
            ("main/blobz/x/5".to_owned(), "no \"blobs\" segment"),
            (format!("blobs/{HASH}"), "followed by a hash and a size"),
            (format!("blobs/{HASH}/-1"), "non-negative decimal"),
            (format!("blobs/{HASH}/five"), "non-negative decimal"),
            (
                format!("blobs/{}/5", HASH.to_uppercase()),
                "lowercase hexadecimal",
            ),
            ("blobs/abc/5".to_owned(), "not 3"),
            (
                format!("compressed-blobs/deflate/{HASH}/5"),
                "compressor \"deflate\" is not supported: this server offers zstd only",
            ),
            (
                "compressed-blobs/zstd/abc".to_owned(),
                "followed by a hash and a size",
            ),
            (
                format!("blobs/sha1/{HASH}/5"),
                "\"sha1\" is not supported: this server offers sha256 and blake3",
            ),
            (format!("uploads/u/blobs/{HASH}/5"), "reads name \"blobs/\""),
        ];
        for (name, rule) in read_cases {
            let message = ResourceName::parse_read(&name).unwrap_err().to_string();
            assert!(message.contains(rule), "{name}: {message}");
            assert!(
                message.contains("expected \"{instance_name/}blobs/"),
                "{message}"
            );
            assert!(message.contains(&format!("{name:?}")), "{message}");
        }
        let write_cases = [
            (format!("blobs/{HASH}/5"), "must name \"uploads/{uuid}/\""),
            (
                format!("uploads//blobs/{HASH}/5"),
                "upload id after \"uploads/\" is empty",
            ),
            ("uploads/u/blobs/zz/5".to_owned(), "not 2"),
            (
                format!("main/uploads/u/compressed-blobs/identity/{HASH}/5"),
                "compressor \"identity\" is not supported",
            ),
        ];
        for (name, rule) in write_cases {
            let message = ResourceName::parse_write(&name).unwrap_err().to_string();
            assert!(message.contains(rule), "{name}: {message}");
            assert!(
                message.contains("uploads/{uuid}/blobs/{hash}/{size}"),
                "{message}"
            );
        }
    }
}
