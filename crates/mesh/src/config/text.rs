//! Reading a key's value from text (an environment variable, a flag) by its type, with the
//! rule a bad value broke as the error.

use std::{collections::BTreeMap, fmt, time::Duration};

pub use bytesize::ByteSize;
use serde::de::{DeserializeOwned, IntoDeserializer};

/// A value of a configuration key written as text (an environment variable, a flag); the
/// error is the rule the text broke.
///
/// Implemented for the types keys have: strings, booleans, ports (`u16`), whole numbers,
/// comma-separated lists, `k=v` maps, durations (`humantime`: `"30s"`, `"1m 30s"`), sizes
/// ([`ByteSize`]: `"10GiB"`, `"512MiB"`, or bytes) and the enums that implement [`Choice`].
pub trait FromText: Sized {
    /// Reads `text`, or says which rule it broke.
    fn from_text(text: &str) -> Result<Self, String>;
}

impl FromText for String {
    fn from_text(text: &str) -> Result<Self, String> {
        Ok(text.to_owned())
    }
}

/// Parses trimmed `text`, or fails with `rule`.
fn parse_or<T: std::str::FromStr>(text: &str, rule: &str) -> Result<T, String> {
    text.trim().parse().map_err(|_| rule.to_owned())
}

impl FromText for bool {
    fn from_text(text: &str) -> Result<Self, String> {
        parse_or(text, "must be true or false")
    }
}

/// Every `u16` key is a port.
impl FromText for u16 {
    fn from_text(text: &str) -> Result<Self, String> {
        parse_or(text, "must be a port number (0-65535)")
    }
}

impl FromText for u32 {
    fn from_text(text: &str) -> Result<Self, String> {
        parse_or(text, "must be a whole number")
    }
}

impl FromText for u64 {
    fn from_text(text: &str) -> Result<Self, String> {
        parse_or(text, "must be a whole number")
    }
}

/// A size: bytes, or a number with a unit (`"512MiB"`, `"10GiB"`, `"1.5 GB"`), as
/// `bytesize` reads it in files.
impl FromText for ByteSize {
    fn from_text(text: &str) -> Result<Self, String> {
        text.trim().parse().map_err(|_| SIZE_RULE.to_owned())
    }
}

/// What a size looks like, in errors.
pub(crate) const SIZE_RULE: &str =
    "must be a size such as \"512MiB\", \"10GiB\" or a number of bytes";

/// Comma-separated, blanks dropped.
impl FromText for Vec<String> {
    fn from_text(text: &str) -> Result<Self, String> {
        Ok(text
            .split(',')
            .map(str::trim)
            .filter(|s| !s.is_empty())
            .map(str::to_owned)
            .collect())
    }
}

/// `k=v,k=v` (the only map key is `tags`).
impl FromText for BTreeMap<String, String> {
    fn from_text(text: &str) -> Result<Self, String> {
        Vec::<String>::from_text(text)?
            .into_iter()
            .map(|pair| {
                pair.split_once('=')
                    .map(|(k, v)| (k.trim().to_owned(), v.trim().to_owned()))
                    .ok_or_else(|| format!("tag {pair:?} must be key=value"))
            })
            .collect()
    }
}

/// What a duration looks like, in errors.
pub(crate) const DURATION_RULE: &str =
    "must be a positive duration such as \"500ms\", \"30s\", \"5m\" or \"1h\"";

/// `humantime`'s format, as `humantime_serde` reads it in files.
impl FromText for Duration {
    fn from_text(text: &str) -> Result<Self, String> {
        humantime::parse_duration(text.trim()).map_err(|_| DURATION_RULE.to_owned())
    }
}

/// An enum key, read by its serde names from text as from files (the variant names are
/// written once, in the enum's `#[serde(rename_all)]`). A file reads it with
/// `#[serde(deserialize_with = "mesh::config::choice")]`.
pub trait Choice: DeserializeOwned {}

impl<T: Choice> FromText for T {
    fn from_text(text: &str) -> Result<Self, String> {
        let text: &str = text.trim();
        T::deserialize(IntoDeserializer::<ChoiceError>::into_deserializer(text)).map_err(|e| e.0)
    }
}

/// Reads an enum key from a file by its name. Only a string is a name, so a number or a list
/// is reported with its value ("invalid type: integer `0`, expected the name of a choice")
/// instead of TOML's "invalid type: unit variant, expected string only"; an unknown name still
/// gets serde's "unknown variant `Lan`, expected one of `lan`, `wan`, `local`".
pub fn choice<'de, D, T>(deserializer: D) -> Result<T, D::Error>
where
    D: serde::Deserializer<'de>,
    T: Choice,
{
    struct Name<T>(std::marker::PhantomData<T>);

    impl<'de, T: Choice> serde::de::Visitor<'de> for Name<T> {
        type Value = T;

        fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
            f.write_str("the name of a choice")
        }

        fn visit_str<E: serde::de::Error>(self, name: &str) -> Result<T, E> {
            T::deserialize(IntoDeserializer::<E>::into_deserializer(name))
        }
    }

    deserializer.deserialize_str(Name(std::marker::PhantomData))
}

/// The rule an unknown variant broke, worded from serde's list of variant names.
#[derive(Debug)]
struct ChoiceError(String);

impl fmt::Display for ChoiceError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::error::Error for ChoiceError {}

impl serde::de::Error for ChoiceError {
    fn custom<M: fmt::Display>(message: M) -> Self {
        Self(message.to_string())
    }

    fn unknown_variant(_variant: &str, expected: &'static [&'static str]) -> Self {
        Self(format!("must be {}", one_of(expected)))
    }
}

/// `"a" or "b"`, `"a", "b" or "c"`; longer lists as `one of a, b, c, d`.
pub(crate) fn one_of(names: &[&str]) -> String {
    match names {
        [] => "nothing".to_owned(),
        [only] => format!("{only:?}"),
        [init @ .., last] if names.len() <= 3 => {
            let init: Vec<String> = init.iter().map(|n| format!("{n:?}")).collect();
            format!("{} or {last:?}", init.join(", "))
        }
        _ => format!("one of {}", names.join(", ")),
    }
}

/// Reads a size key from a file: a number of bytes, or text with a unit (`"10GiB"`); anything
/// else is reported with the rule (`#[serde(deserialize_with = "mesh::config::size")]`).
pub fn size<'de, D: serde::Deserializer<'de>>(deserializer: D) -> Result<ByteSize, D::Error> {
    struct Size;

    impl serde::de::Visitor<'_> for Size {
        type Value = ByteSize;

        fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
            f.write_str("a size such as \"512MiB\", \"10GiB\" or a number of bytes")
        }

        fn visit_u64<E: serde::de::Error>(self, bytes: u64) -> Result<ByteSize, E> {
            Ok(ByteSize::b(bytes))
        }

        fn visit_i64<E: serde::de::Error>(self, bytes: i64) -> Result<ByteSize, E> {
            u64::try_from(bytes)
                .map(ByteSize::b)
                .map_err(|_| E::custom(format!("{bytes} {SIZE_RULE}")))
        }

        fn visit_str<E: serde::de::Error>(self, text: &str) -> Result<ByteSize, E> {
            ByteSize::from_text(text).map_err(|rule| E::custom(format!("{text:?} {rule}")))
        }
    }

    deserializer.deserialize_any(Size)
}
