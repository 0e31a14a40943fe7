//! Loading a keyring from a file or an environment variable.
//!
//! A keyring file holds one key per line, the first is the primary; blank lines and everything
//! after a `#` are ignored. An environment variable holds comma-separated keys (a Kubernetes
//! Secret exposed as a variable). Errors name the file or variable, the line or entry and the
//! rule, never the key text, and the text read is zeroed once parsed (best effort).

use std::{
    fmt,
    path::{Path, PathBuf},
};

use zeroize::Zeroize;

use super::{KeyError, Keyring, SecretKey};

impl Keyring {
    /// Loads a keyring file: one key per line (base64 or hex), the first is the primary.
    /// Blank lines and everything after a `#` are ignored. Errors name the file, the line and
    /// the rule, never the key text.
    pub fn from_file(path: impl AsRef<Path>) -> Result<Self, KeyringLoadError> {
        let path = path.as_ref();
        let mut text = std::fs::read_to_string(path).map_err(|source| KeyringLoadError::Read {
            path: path.to_owned(),
            source,
        })?;
        let entries = text
            .lines()
            .map(|line| line.split('#').next().unwrap_or(""));
        let keyring = Self::from_entries(entries, KeySource::File(path.to_owned()));
        text.zeroize();
        keyring
    }

    /// Loads keys from the environment variable `var`: comma-separated keys (base64 or hex),
    /// the first is the primary; blank entries and whitespace around keys are ignored. Errors
    /// name the variable, the entry and the rule, never the key text.
    pub fn from_env(var: &str) -> Result<Self, KeyringLoadError> {
        let mut value = match std::env::var(var) {
            Ok(value) => value,
            Err(std::env::VarError::NotPresent) => {
                return Err(KeyringLoadError::EnvUnset {
                    var: var.to_owned(),
                });
            }
            // That error carries the value: never pass it on.
            Err(std::env::VarError::NotUnicode(_)) => {
                return Err(KeyringLoadError::EnvNotUnicode {
                    var: var.to_owned(),
                });
            }
        };
        let keyring = Self::from_env_value(var, &value);
        value.zeroize();
        keyring
    }

    fn from_env_value(var: &str, value: &str) -> Result<Self, KeyringLoadError> {
        Self::from_entries(value.split(','), KeySource::Env(var.to_owned()))
    }

    /// Parses keys from `entries`, skipping blank ones; a failing entry is named by its
    /// position in `from`, counted from 1.
    fn from_entries<'a>(
        entries: impl Iterator<Item = &'a str>,
        from: KeySource,
    ) -> Result<Self, KeyringLoadError> {
        let at = |position| KeyOrigin {
            from: from.clone(),
            position,
        };
        let mut keys: Vec<(SecretKey, usize)> = Vec::new();
        for (position, entry) in (1..).zip(entries.map(str::trim)) {
            if entry.is_empty() {
                continue;
            }
            let key = entry
                .parse::<SecretKey>()
                .map_err(|source| KeyringLoadError::Key {
                    at: at(position),
                    source,
                })?;
            if let Some((_, first)) = keys.iter().find(|(known, _)| *known == key) {
                return Err(KeyringLoadError::Duplicate {
                    at: at(position),
                    first: *first,
                });
            }
            keys.push((key, position));
        }
        if keys.is_empty() {
            return Err(KeyringLoadError::NoKeys { from });
        }
        Ok(Self {
            keys: keys.into_iter().map(|(key, _)| key).collect(),
        })
    }
}

/// Where keys were loaded from.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub enum KeySource {
    /// A keyring file.
    File(PathBuf),
    /// An environment variable.
    Env(String),
}

impl fmt::Display for KeySource {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            KeySource::File(path) => write!(f, "keyring file {}", path.display()),
            KeySource::Env(var) => write!(f, "environment variable {var}"),
        }
    }
}

/// Where one key was read from: a line of a keyring file or an entry of an environment
/// variable.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub struct KeyOrigin {
    /// The file or variable.
    pub from: KeySource,
    /// The line (file) or comma-separated entry (variable), counted from 1.
    pub position: usize,
}

impl KeyOrigin {
    fn position_name(&self) -> &'static str {
        match self.from {
            KeySource::File(_) => "line",
            KeySource::Env(_) => "entry",
        }
    }
}

impl fmt::Display for KeyOrigin {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let position = self.position;
        match &self.from {
            KeySource::File(path) => write!(f, "line {position} of {}", path.display()),
            KeySource::Env(var) => write!(f, "entry {position} of environment variable {var}"),
        }
    }
}

/// A keyring could not be loaded. Messages name the file or variable, the position and the
/// rule, never key text.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum KeyringLoadError {
    /// The keyring file could not be read.
    #[error("reading keyring file {} failed: {source}", .path.display())]
    Read {
        /// The file.
        path: PathBuf,
        /// The cause.
        #[source]
        source: std::io::Error,
    },
    /// The environment variable is not set.
    #[error(
        "environment variable {var} is not set; it should hold comma-separated keys, the first \
         is the primary"
    )]
    EnvUnset {
        /// The variable.
        var: String,
    },
    /// The environment variable is not valid unicode.
    #[error("environment variable {var} is not valid unicode")]
    EnvNotUnicode {
        /// The variable.
        var: String,
    },
    /// An entry is not a key.
    #[error("{at}: {source}")]
    Key {
        /// Where.
        at: KeyOrigin,
        /// The rule it breaks.
        #[source]
        source: KeyError,
    },
    /// A key appears twice.
    #[error("{at}: the same key as {} {first}", .at.position_name())]
    Duplicate {
        /// Where it appears again.
        at: KeyOrigin,
        /// The line or entry where it appeared first.
        first: usize,
    },
    /// No keys at all.
    #[error("{from} holds no key; a keyring needs at least one key, the first is the primary")]
    NoKeys {
        /// The file or variable.
        from: KeySource,
    },
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{
        KEY_LEN,
        keyring::tests::{BASE64, HEX, counting},
    };

    /// A file in the system temp directory, removed on drop.
    struct TempFile(PathBuf);

    impl TempFile {
        fn new(name: &str, contents: &str) -> Self {
            let path = std::env::temp_dir()
                .join(format!("mesh-core-keyring-{}-{name}", std::process::id()));
            std::fs::write(&path, contents).unwrap();
            Self(path)
        }
    }

    impl Drop for TempFile {
        fn drop(&mut self) {
            let _ = std::fs::remove_file(&self.0);
        }
    }

    #[test]
    fn a_keyring_file_has_one_key_per_line_and_comments() {
        let file = TempFile::new(
            "good",
            &format!(
                "# rotated 2025-01\n\n  {HEX}  # new primary\r\n{}\n",
                "//////////////////////////////////////////8="
            ),
        );
        let keyring = Keyring::from_file(&file.0).unwrap();
        assert_eq!(
            keyring.keys(),
            [
                SecretKey::from_bytes(counting()).fingerprint(),
                SecretKey::from_bytes([0xff; KEY_LEN]).fingerprint()
            ]
        );
    }

    #[test]
    fn keyring_file_errors_name_the_file_the_line_and_the_rule() {
        let file = TempFile::new("bad", &format!("{BASE64}\n# comment\nc2VjcmV0LWtleQ==\n"));
        let error = Keyring::from_file(&file.0).unwrap_err();
        let message = error.to_string();
        assert_eq!(
            message,
            format!(
                "line 3 of {}: a key is 32 bytes as base64 (44 chars) or hex (64 chars), got 16 \
                 characters",
                file.0.display()
            )
        );
        assert!(!message.contains("c2VjcmV0"), "{message}");

        let file = TempFile::new("dup", &format!("{BASE64}\n{HEX}\n"));
        let message = Keyring::from_file(&file.0).unwrap_err().to_string();
        assert_eq!(
            message,
            format!("line 2 of {}: the same key as line 1", file.0.display())
        );

        let file = TempFile::new("empty", "# nothing yet\n\n");
        let message = Keyring::from_file(&file.0).unwrap_err().to_string();
        assert!(message.contains("holds no key"), "{message}");
        assert!(message.contains(&file.0.display().to_string()), "{message}");

        let missing = std::env::temp_dir().join("mesh-core-keyring-does-not-exist");
        let error = Keyring::from_file(&missing).unwrap_err();
        assert!(matches!(error, KeyringLoadError::Read { .. }), "{error}");
        assert!(
            error
                .to_string()
                .contains("mesh-core-keyring-does-not-exist")
        );
    }

    #[test]
    fn environment_keys_are_comma_separated_and_errors_name_the_variable() {
        let keyring = Keyring::from_env_value("MESH_KEYS", &format!(" {HEX} , {BASE64},")).err();
        assert_eq!(
            keyring.map(|e| e.to_string()),
            Some("entry 2 of environment variable MESH_KEYS: the same key as entry 1".to_owned())
        );

        let other = "//////////////////////////////////////////8=";
        let keyring = Keyring::from_env_value("MESH_KEYS", &format!("{other},{HEX}")).unwrap();
        assert_eq!(keyring.primary(), &SecretKey::from_bytes([0xff; KEY_LEN]));
        assert_eq!(keyring.keys().len(), 2);

        let message = Keyring::from_env_value("MESH_KEYS", &format!("{BASE64},not-a-key"))
            .unwrap_err()
            .to_string();
        assert_eq!(
            message,
            "entry 2 of environment variable MESH_KEYS: a key is 32 bytes as base64 (44 chars) \
             or hex (64 chars), got 9 characters"
        );
        assert!(!message.contains("not-a-key"));

        let message = Keyring::from_env_value("MESH_KEYS", " , ")
            .unwrap_err()
            .to_string();
        assert_eq!(
            message,
            "environment variable MESH_KEYS holds no key; a keyring needs at least one key, the \
             first is the primary"
        );

        let error = Keyring::from_env("MESH_CORE_TEST_VARIABLE_THAT_IS_NEVER_SET").unwrap_err();
        assert!(
            matches!(error, KeyringLoadError::EnvUnset { .. }),
            "{error}"
        );
        assert!(
            error
                .to_string()
                .contains("MESH_CORE_TEST_VARIABLE_THAT_IS_NEVER_SET")
        );
    }
}
