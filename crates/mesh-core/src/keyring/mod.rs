//! Gossip encryption keys: a [`Keyring`] of 32-byte [`SecretKey`]s, one of them primary.
//!
//! # Construction
//!
//! With a keyring configured, every datagram is sealed with XChaCha20-Poly1305 (the extended
//! nonce variant of ChaCha20-Poly1305, RFC 8439; draft-irtf-cfrg-xchacha) under the primary
//! key. The body of the [envelope](crate::wire) is `nonce ‖ ciphertext ‖ tag`, and the
//! associated data is the four header bytes (with the encrypted bit set) followed by the
//! cluster label, so a datagram can neither be moved to a cluster with another label nor have
//! its header altered: either fails authentication like a wrong key does.
//!
//! **Nonces are 24 random bytes** drawn from the operating system for every datagram. With
//! 192-bit nonces the chance that two datagrams under one key ever share a nonce is about
//! `n² / 2¹⁹³`: for a hundred nodes sending ten thousand datagrams a second for a year
//! (`n ≈ 2⁴⁵`) that is `2⁻¹⁰³`. The 12-byte nonces of plain ChaCha20-Poly1305 or AES-GCM would
//! reach `2⁻⁷` (one chance in 128 of a repeated nonce, which breaks both confidentiality and
//! authenticity) with the same traffic, and a counter would have to survive restarts. If the
//! random source fails, the datagram is not sent (and counted), never sealed with a weak
//! nonce.
//!
//! **Rotation** mirrors HashiCorp memberlist's keyring (`keyring.go`, `security.go`; the
//! `consul keyring -install/-use/-remove` workflow): encryption uses the primary key,
//! decryption tries every installed key, primary first. Rotating without ever breaking
//! membership is three cluster-wide steps, each finished on every node before the next begins:
//!
//! 1. install the new key everywhere ([`crate::Membership::install_key`]): everyone can now
//!    read it, nobody writes with it yet;
//! 2. make it primary everywhere ([`crate::Membership::use_primary_key`]): nodes switch one by
//!    one, and both keys are readable on every node meanwhile;
//! 3. remove the old key everywhere ([`crate::Membership::remove_key`]): nobody writes with it
//!    any more, and a node that only knows the old key is locked out.
//!
//! Unlike memberlist (AES-GCM with 12-byte random nonces, a version byte in front), the
//! cipher is XChaCha20-Poly1305 for the nonce margin above, and the label is never sent: it
//! only enters the associated data.
//!
//! # Keys
//!
//! A key is 32 random bytes, written as standard base64 with padding (44 characters, e.g. from
//! `openssl rand -base64 32`) or as 64 hex digits. Keys never appear in `Debug` or `Display`
//! output, logs or error messages: they show as a [`KeyFingerprint`], 8 hex digits that tell
//! keys apart. Key bytes are zeroed when a key is dropped (best effort: the operating system
//! or the environment may still hold the text they were read from).
//!
//! ```
//! use mesh_core::{Keyring, SecretKey};
//!
//! let old: SecretKey = "AAECAwQFBgcICQoLDA0ODxAREhMUFRYXGBkaGxwdHh8=".parse()?;
//! let new: SecretKey =
//!     "202122232425262728292a2b2c2d2e2f303132333435363738393a3b3c3d3e3f".parse()?;
//! let mut keyring = Keyring::new(old.clone());
//!
//! keyring.install(new.clone());
//! keyring.use_primary(&new)?;
//! keyring.remove(&old)?;
//! assert_eq!(keyring.keys(), vec![new.fingerprint()]);
//! // What logs show: a fingerprint, never the key.
//! assert_eq!(format!("{new:?}"), format!("SecretKey({})", new.fingerprint()));
//! # Ok::<(), Box<dyn std::error::Error>>(())
//! ```

mod load;

use std::{
    fmt,
    str::FromStr,
    sync::{Arc, Mutex},
};

use arc_swap::{ArcSwap, Guard};
use base64ct::{Base64, Encoding};
use chacha20poly1305::{AeadInOut, KeyInit, XChaCha20Poly1305, XNonce};
use zeroize::Zeroize;

pub use self::load::{KeyOrigin, KeySource, KeyringLoadError};

/// Length of a key in bytes.
pub const KEY_LEN: usize = 32;
/// Length of a key written as standard base64 with padding.
const BASE64_LEN: usize = 44;
/// Length of a key written as hex.
const HEX_LEN: usize = 64;
/// The nonce of the key check value behind [`KeyFingerprint`]; exactly 24 bytes, and never
/// drawn at random (the chance is 2⁻¹⁹² per datagram).
const FINGERPRINT_NONCE: [u8; 24] = *b"mesh gossip key check v1";

/// A 32-byte gossip encryption key.
///
/// Parse one from base64 or hex with [`str::parse`], or draw one with
/// [`SecretKey::generate`]. `Debug` and `Display` show its [`KeyFingerprint`], never the key;
/// comparison takes the same time wherever two keys differ; the bytes are zeroed on drop.
#[derive(Clone)]
pub struct SecretKey([u8; KEY_LEN]);

impl SecretKey {
    /// A key from raw bytes.
    pub fn from_bytes(bytes: [u8; KEY_LEN]) -> Self {
        Self(bytes)
    }

    /// A new random key from the operating system's random source; fails only if that source
    /// does.
    pub fn generate() -> std::io::Result<Self> {
        use rand::TryRng;
        let mut key = Self([0; KEY_LEN]);
        rand::rngs::SysRng
            .try_fill_bytes(&mut key.0)
            .map_err(std::io::Error::from)?;
        Ok(key)
    }

    /// A short, stable name for this key that reveals nothing useful about it.
    pub fn fingerprint(&self) -> KeyFingerprint {
        let mut check = [0u8; 4];
        // Encrypting four bytes cannot fail (only messages of 256 GiB and more do); the tag is
        // not part of the check value.
        let _tag = self.cipher().encrypt_inout_detached(
            &XNonce::from(FINGERPRINT_NONCE),
            &[],
            (&mut check[..]).into(),
        );
        KeyFingerprint(check)
    }

    pub(crate) fn cipher(&self) -> XChaCha20Poly1305 {
        XChaCha20Poly1305::new((&self.0).into())
    }
}

impl Drop for SecretKey {
    fn drop(&mut self) {
        self.0.zeroize();
    }
}

impl PartialEq for SecretKey {
    fn eq(&self, other: &Self) -> bool {
        // No early exit: the time taken does not depend on where the keys differ.
        self.0
            .iter()
            .zip(other.0.iter())
            .fold(0u8, |diff, (a, b)| diff | (a ^ b))
            == 0
    }
}

impl Eq for SecretKey {}

impl fmt::Debug for SecretKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "SecretKey({})", self.fingerprint())
    }
}

/// Shows the fingerprint: a key's text never round-trips through `Display`.
impl fmt::Display for SecretKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Display::fmt(&self.fingerprint(), f)
    }
}

impl FromStr for SecretKey {
    type Err = KeyError;

    /// Parses 44 characters of standard, padded base64 or 64 hex digits (either case). The
    /// text is taken as is: trim it first if it may carry whitespace.
    ///
    /// Decoding is RustCrypto's constant-time `base64ct` and `base16ct`; base64 is strict
    /// (one trailing `=`, zero trailing bits), so every key has one spelling per alphabet.
    fn from_str(text: &str) -> Result<Self, KeyError> {
        let mut key = Self([0; KEY_LEN]);
        let decoded_len = match (text.chars().count(), text.is_ascii()) {
            (BASE64_LEN, true) => Base64::decode(text, &mut key.0)
                .map(<[u8]>::len)
                .map_err(|_| KeyError::Base64),
            (HEX_LEN, true) => base16ct::mixed::decode(text, &mut key.0)
                .map(<[u8]>::len)
                .map_err(|_| KeyError::Hex),
            (BASE64_LEN, false) => Err(KeyError::Base64),
            (HEX_LEN, false) => Err(KeyError::Hex),
            (len, _) => Err(KeyError::Length { len }),
        }?;
        // 44 base64 characters ending in "==" hold 31 bytes: not a key either.
        if decoded_len != KEY_LEN {
            return Err(KeyError::Base64);
        }
        Ok(key)
    }
}

/// A short name of a [`SecretKey`] for logs and operators: 8 hex digits.
///
/// It is a key check value: the first four bytes of XChaCha20-Poly1305's encryption of four
/// zero bytes under the key, with the fixed nonce `"mesh gossip key check v1"` and no
/// associated data. Any XChaCha20-Poly1305 implementation reproduces it; it is a pseudorandom
/// function of the key, so it reveals nothing about the key beyond those 32 bits, and it is the
/// same on every platform and version.
#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct KeyFingerprint([u8; 4]);

impl fmt::Display for KeyFingerprint {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for byte in self.0 {
            write!(f, "{byte:02x}")?;
        }
        Ok(())
    }
}

impl fmt::Debug for KeyFingerprint {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Display::fmt(self, f)
    }
}

/// The keys a node encrypts and decrypts gossip with: never empty, the first is the primary.
///
/// Datagrams are sealed with the primary key; a received datagram is tried against every key,
/// primary first. See the [module docs](self) for the construction and the rotation procedure.
#[derive(Clone)]
pub struct Keyring {
    /// Distinct keys; `keys[0]` is the primary.
    keys: Vec<SecretKey>,
}

impl Keyring {
    /// A keyring holding only `primary`.
    pub fn new(primary: SecretKey) -> Self {
        Self {
            keys: vec![primary],
        }
    }

    /// Adds `key` for decryption (it does not become primary). Returns `false`, changing
    /// nothing, if it was already installed.
    pub fn install(&mut self, key: SecretKey) -> bool {
        if self.contains(&key) {
            return false;
        }
        self.keys.push(key);
        true
    }

    /// Makes an installed key the primary: datagrams are encrypted with it from now on. The
    /// previous primary stays installed, and is the second key tried.
    pub fn use_primary(&mut self, key: &SecretKey) -> Result<(), KeyringError> {
        let position = self.position(key)?;
        self.keys[..=position].rotate_right(1);
        Ok(())
    }

    /// Removes an installed key. The primary cannot be removed: make another key primary
    /// first.
    pub fn remove(&mut self, key: &SecretKey) -> Result<(), KeyringError> {
        match self.position(key)? {
            0 => Err(KeyringError::RemovePrimary {
                fingerprint: key.fingerprint(),
            }),
            position => {
                self.keys.remove(position);
                Ok(())
            }
        }
    }

    /// Whether `key` is installed.
    pub fn contains(&self, key: &SecretKey) -> bool {
        self.keys.iter().any(|known| known == key)
    }

    /// The fingerprints of the installed keys, primary first.
    pub fn keys(&self) -> Vec<KeyFingerprint> {
        self.keys.iter().map(SecretKey::fingerprint).collect()
    }

    /// The key datagrams are sealed with.
    pub(crate) fn primary(&self) -> &SecretKey {
        &self.keys[0]
    }

    /// Every key, in the order decryption tries them.
    pub(crate) fn decryption_keys(&self) -> &[SecretKey] {
        &self.keys
    }

    fn position(&self, key: &SecretKey) -> Result<usize, KeyringError> {
        self.keys
            .iter()
            .position(|known| known == key)
            .ok_or_else(|| KeyringError::NotInstalled {
                fingerprint: key.fingerprint(),
            })
    }
}

impl fmt::Debug for Keyring {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Keyring")
            .field("primary", &self.primary().fingerprint())
            .field("keys", &self.keys())
            .finish()
    }
}

/// A node's live keyring, shared by the receive task (decryption), the membership task
/// (encryption) and the handles (rotation). Readers never wait; writers take turns.
#[derive(Debug)]
pub(crate) struct SharedKeyring {
    current: ArcSwap<Keyring>,
    writers: Mutex<()>,
}

impl SharedKeyring {
    pub(crate) fn new(keyring: Keyring) -> Self {
        Self {
            current: ArcSwap::from_pointee(keyring),
            writers: Mutex::new(()),
        }
    }

    pub(crate) fn load(&self) -> Guard<Arc<Keyring>> {
        self.current.load()
    }

    /// Applies `change` to a copy of the keyring and publishes it if the change succeeded.
    pub(crate) fn update<T>(
        &self,
        change: impl FnOnce(&mut Keyring) -> Result<T, KeyringError>,
    ) -> Result<T, KeyringError> {
        let _turn = self
            .writers
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner());
        let mut next = Keyring::clone(&self.current.load());
        let outcome = change(&mut next)?;
        self.current.store(Arc::new(next));
        Ok(outcome)
    }
}

/// Why text is not a [`SecretKey`]. The message states the rule and never contains the text.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum KeyError {
    /// Neither 44 nor 64 characters long.
    #[error("a key is 32 bytes as base64 (44 chars) or hex (64 chars), got {len} characters")]
    Length {
        /// The number of characters found.
        len: usize,
    },
    /// 44 characters that are not standard base64 of 32 bytes.
    #[error(
        "a key is 32 bytes as base64 (44 chars) or hex (64 chars); these 44 characters are not \
         standard base64 (A-Z a-z 0-9 + /, one trailing =, e.g. from `openssl rand -base64 32`)"
    )]
    Base64,
    /// 64 characters that are not all hex digits.
    #[error(
        "a key is 32 bytes as base64 (44 chars) or hex (64 chars); these 64 characters are not \
         all hex digits"
    )]
    Hex,
}

/// A keyring operation was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum KeyringError {
    /// The key is not installed.
    #[error("key {fingerprint} is not installed; install it first")]
    NotInstalled {
        /// The key's fingerprint.
        fingerprint: KeyFingerprint,
    },
    /// The primary key cannot be removed.
    #[error("key {fingerprint} is the primary key; make another key primary before removing it")]
    RemovePrimary {
        /// The key's fingerprint.
        fingerprint: KeyFingerprint,
    },
    /// The node runs without a keyring.
    #[error(
        "this node was started without a keyring; encryption cannot be switched on while it runs"
    )]
    NoKeyring,
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The key `0, 1, …, 31` in base64 and in hex.
    pub(super) const BASE64: &str = "AAECAwQFBgcICQoLDA0ODxAREhMUFRYXGBkaGxwdHh8=";
    pub(super) const HEX: &str = "000102030405060708090a0b0c0d0e0f101112131415161718191a1b1c1d1e1f";

    pub(super) fn counting() -> [u8; KEY_LEN] {
        std::array::from_fn(|i| i as u8)
    }

    #[test]
    fn parses_base64_and_hex_to_the_same_key() {
        let expected = SecretKey::from_bytes(counting());
        assert_eq!(BASE64.parse::<SecretKey>().unwrap(), expected);
        assert_eq!(HEX.parse::<SecretKey>().unwrap(), expected);
        assert_eq!(HEX.to_uppercase().parse::<SecretKey>().unwrap(), expected);
        let all_ones = "//////////////////////////////////////////8=";
        assert_eq!(
            all_ones.parse::<SecretKey>().unwrap(),
            SecretKey::from_bytes([0xff; KEY_LEN])
        );
    }

    #[test]
    fn malformed_keys_name_the_rule_and_never_the_text() {
        let cases = [
            ("c2VjcmV0LWtleQ==", KeyError::Length { len: 16 }),
            // Right length, a symbol outside the alphabet.
            (
                "AAECAwQFBgcICQoLDA0ODxAREhMUFRYXGBkaGxwdHh-=",
                KeyError::Base64,
            ),
            // Right length, no padding.
            (
                "AAECAwQFBgcICQoLDA0ODxAREhMUFRYXGBkaGxwdHh8A",
                KeyError::Base64,
            ),
            // Non-zero trailing bits: a second spelling of a key.
            (
                "AAECAwQFBgcICQoLDA0ODxAREhMUFRYXGBkaGxwdHh9=",
                KeyError::Base64,
            ),
            (
                "000102030405060708090a0b0c0d0e0f101112131415161718191a1b1c1d1e1g",
                KeyError::Hex,
            ),
            (
                " AAECAwQFBgcICQoLDA0ODxAREhMUFRYXGBkaGxwdHh8=",
                KeyError::Length { len: 45 },
            ),
            ("ééé", KeyError::Length { len: 3 }),
        ];
        for (text, expected) in cases {
            let error = text.parse::<SecretKey>().unwrap_err();
            assert_eq!(error, expected, "{text}");
            let message = error.to_string();
            assert!(message.contains("a key is 32 bytes"), "{message}");
            assert!(!message.contains(text.trim()), "{message}");
        }
        assert_eq!(
            KeyError::Length { len: 12 }.to_string(),
            "a key is 32 bytes as base64 (44 chars) or hex (64 chars), got 12 characters"
        );
    }

    #[test]
    fn debug_and_display_never_show_key_material() {
        let key: SecretKey = BASE64.parse().unwrap();
        let mut keyring = Keyring::new(key.clone());
        keyring.install(SecretKey::from_bytes([0xab; KEY_LEN]));
        let shown = [
            format!("{key:?}"),
            format!("{key}"),
            format!("{keyring:?}"),
            format!("{keyring:#?}"),
        ];
        let hex_ab = "ab".repeat(KEY_LEN);
        for text in &shown {
            for secret in [BASE64, HEX, &HEX.to_uppercase(), &hex_ab, "q6ur"] {
                assert!(!text.contains(secret), "{text} shows {secret}");
            }
            assert!(text.contains(&key.fingerprint().to_string()), "{text}");
        }
        // Not even as a byte array.
        assert!(!shown[2].contains("[0, 1, 2"), "{}", shown[2]);
    }

    #[test]
    fn fingerprints_are_stable_and_tell_keys_apart() {
        let key = SecretKey::from_bytes(counting());
        // Pinned, and computed independently (Python: HChaCha20 + `cryptography`'s
        // ChaCha20-Poly1305): logs of different builds and tools must agree on a key's name.
        assert_eq!(key.fingerprint().to_string(), "5dbe7477");
        assert_eq!(
            SecretKey::from_bytes([0; KEY_LEN])
                .fingerprint()
                .to_string(),
            "9c975159"
        );
        assert_ne!(
            key.fingerprint(),
            SecretKey::from_bytes([1; KEY_LEN]).fingerprint()
        );
        assert_eq!(key.fingerprint().to_string().len(), 8);
    }

    #[test]
    fn generated_keys_differ() {
        let a = SecretKey::generate().unwrap();
        let b = SecretKey::generate().unwrap();
        assert_ne!(a, b);
    }

    #[test]
    fn rotation_operations_keep_one_primary_and_refuse_what_would_break() {
        let old = SecretKey::from_bytes([1; KEY_LEN]);
        let new = SecretKey::from_bytes([2; KEY_LEN]);
        let stranger = SecretKey::from_bytes([3; KEY_LEN]);
        let mut keyring = Keyring::new(old.clone());

        assert_eq!(
            keyring.use_primary(&new),
            Err(KeyringError::NotInstalled {
                fingerprint: new.fingerprint()
            })
        );
        assert!(keyring.install(new.clone()));
        assert!(!keyring.install(new.clone()), "installing twice is a no-op");
        assert_eq!(keyring.keys(), [old.fingerprint(), new.fingerprint()]);
        assert_eq!(keyring.primary(), &old);

        keyring.use_primary(&new).unwrap();
        assert_eq!(keyring.keys(), [new.fingerprint(), old.fingerprint()]);
        let error = keyring.remove(&new).unwrap_err();
        assert_eq!(
            error,
            KeyringError::RemovePrimary {
                fingerprint: new.fingerprint()
            }
        );
        assert!(error.to_string().contains("make another key primary"));
        assert!(matches!(
            keyring.remove(&stranger),
            Err(KeyringError::NotInstalled { .. })
        ));

        keyring.remove(&old).unwrap();
        assert_eq!(keyring.keys(), [new.fingerprint()]);
        assert!(!keyring.contains(&old));
    }

    #[test]
    fn use_primary_keeps_the_previous_primary_second() {
        let keys: Vec<SecretKey> = (1..=4)
            .map(|b| SecretKey::from_bytes([b; KEY_LEN]))
            .collect();
        let mut keyring = Keyring::new(keys[0].clone());
        for key in &keys[1..] {
            keyring.install(key.clone());
        }
        keyring.use_primary(&keys[2]).unwrap();
        let expected: Vec<_> = [2, 0, 1, 3]
            .iter()
            .map(|&i| keys[i].fingerprint())
            .collect();
        assert_eq!(keyring.keys(), expected);
    }

    #[test]
    fn updates_to_a_shared_keyring_are_all_or_nothing() {
        let old = SecretKey::from_bytes([1; KEY_LEN]);
        let shared = SharedKeyring::new(Keyring::new(old.clone()));
        let before = shared.load().keys();
        let error = shared.update(|keyring| keyring.remove(&old)).unwrap_err();
        assert!(matches!(error, KeyringError::RemovePrimary { .. }));
        assert_eq!(shared.load().keys(), before);
        let new = SecretKey::from_bytes([2; KEY_LEN]);
        assert!(
            shared
                .update(|keyring| Ok(keyring.install(new.clone())))
                .unwrap()
        );
        assert_eq!(shared.load().keys(), [old.fingerprint(), new.fingerprint()]);
    }
}
