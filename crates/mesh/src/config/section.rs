//! One configuration file for a whole server: a section per concern (`[mesh]` here, `[reapi]`
//! in `mesh-reapi`), each with its keys declared once by [`config_section!`](crate::config_section),
//! read from TOML or YAML, then overridden by environment variables (`MESH_<KEY>` for the mesh
//! section, `MESH_<SECTION>_<KEY>` for the others), as Serf and Consul layer file, environment
//! and flags.
//!
//! A file with a known section name at its top level is read by section, and any other
//! top-level key is refused with the list of sections; a file without sections holds the mesh
//! keys at its top level (the seed server's flat files).

use std::{fmt, marker::PhantomData, path::Path};

use serde::{
    Deserialize,
    de::{IgnoredAny, MapAccess, Visitor},
};

use super::{ConfigError, invalid};

/// The sections a configuration file may have.
pub const SECTIONS: &[&str] = &["mesh", "reapi"];

/// A section of the configuration file: a struct with a default for every key, deserialisable
/// from the file and settable key by key from text. [`config_section!`](crate::config_section)
/// declares one from a single list of keys.
pub trait Section: serde::de::DeserializeOwned + Default {
    /// The section's name in files (`[reapi]`), one of [`SECTIONS`].
    const NAME: &'static str;
    /// Every key, in the order they are declared.
    const KEYS: &'static [&'static str];

    /// Sets one key from text, as an environment variable or a flag would; the error is the
    /// rule the value broke (or that the key does not exist).
    fn set_key(&mut self, key: &str, value: &str) -> Result<(), String>;

    /// The prefix of this section's environment variables: `MESH_` for the mesh section,
    /// `MESH_<NAME>_` for the others (`MESH_REAPI_DATA_DIR`).
    fn env_prefix() -> String {
        if Self::NAME == "mesh" {
            "MESH_".to_owned()
        } else {
            format!("MESH_{}_", Self::NAME.to_ascii_uppercase())
        }
    }
}

/// Reads section `T` from a TOML (`.toml`) or YAML (`.yaml`, `.yml`) file: its `[T::NAME]`
/// table, or its defaults when the file has none.
pub fn from_file<T: Section>(path: impl AsRef<Path>) -> Result<T, ConfigError> {
    parse_file(path.as_ref(), from_toml_str, from_yaml_str)
}

/// Whether the TOML or YAML file at `path` sets `key` in section `T` (the mesh section's keys
/// may also be at the top level): a value the file sets, told from the default. A caller whose
/// default depends on another section's key (`[reapi] max_concurrency` takes `[mesh]`'s only
/// when that is set) asks this.
pub fn sets_in_file<T: Section>(path: impl AsRef<Path>, key: &str) -> Result<bool, ConfigError> {
    let is_section = |name: &str| SECTIONS.contains(&name);
    parse_file(
        path.as_ref(),
        |text| {
            let table: toml::Table = toml::from_str(text).map_err(|e| e.to_string())?;
            let sectioned = table.keys().any(|name| is_section(name));
            Ok(match table.get(T::NAME) {
                Some(toml::Value::Table(section)) => section.contains_key(key),
                _ => !sectioned && T::NAME == "mesh" && table.contains_key(key),
            })
        },
        |text| {
            let value: serde_yaml_ng::Value =
                serde_yaml_ng::from_str(text).map_err(|e| e.to_string())?;
            let serde_yaml_ng::Value::Mapping(map) = value else {
                return Ok(false);
            };
            let sectioned = map.keys().any(|name| name.as_str().is_some_and(is_section));
            Ok(match map.get(T::NAME) {
                Some(serde_yaml_ng::Value::Mapping(section)) => section.contains_key(key),
                _ => !sectioned && T::NAME == "mesh" && map.contains_key(key),
            })
        },
    )
}

/// Reads the file at `path` and parses its text with `toml` or `yaml`, by its extension;
/// every error names the file.
fn parse_file<R>(
    path: &Path,
    toml: impl FnOnce(&str) -> Result<R, String>,
    yaml: impl FnOnce(&str) -> Result<R, String>,
) -> Result<R, ConfigError> {
    let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
        path: path.to_owned(),
        source,
    })?;
    let parse_error = |message: String| ConfigError::Parse {
        path: path.to_owned(),
        message,
    };
    match path.extension().and_then(|e| e.to_str()) {
        Some("toml") => toml(&text).map_err(parse_error),
        Some("yaml" | "yml") => yaml(&text).map_err(parse_error),
        _ => Err(ConfigError::UnknownFormat {
            path: path.to_owned(),
        }),
    }
}

/// Reads section `T` from TOML text (see [`crate::config`] for the file's shapes).
pub fn from_toml_str<T: Section>(text: &str) -> Result<T, String> {
    let table: toml::Table = toml::from_str(text).map_err(|e| e.to_string())?;
    if table.keys().any(|key| SECTIONS.contains(&key.as_str())) {
        // Parsed from the text again, so errors keep their line.
        let sectioned: Sectioned<T> = toml::from_str(text).map_err(|e| e.to_string())?;
        Ok(sectioned.0.unwrap_or_default())
    } else if T::NAME == "mesh" {
        table.try_into().map_err(|e: toml::de::Error| e.to_string())
    } else {
        Ok(T::default())
    }
}

/// Reads section `T` from YAML text (see [`crate::config`] for the file's shapes).
pub fn from_yaml_str<T: Section>(text: &str) -> Result<T, String> {
    let value: serde_yaml_ng::Value = serde_yaml_ng::from_str(text).map_err(|e| e.to_string())?;
    match &value {
        serde_yaml_ng::Value::Null => Ok(T::default()),
        serde_yaml_ng::Value::Mapping(map)
            if map
                .keys()
                .any(|key| key.as_str().is_some_and(|key| SECTIONS.contains(&key))) =>
        {
            // Parsed from the text again, so errors keep their key path and line.
            let sectioned: Sectioned<T> =
                serde_yaml_ng::from_str(text).map_err(|e| e.to_string())?;
            Ok(sectioned.0.unwrap_or_default())
        }
        _ if T::NAME == "mesh" => serde_yaml_ng::from_str(text).map_err(|e| e.to_string()),
        _ => Ok(T::default()),
    }
}

/// Overrides keys of `config` from the variables with its section's prefix
/// ([`Section::env_prefix`]); the mesh section leaves the other sections' variables alone. An
/// unknown key or a bad value is an error naming the variable, its value and the rule, so a
/// misspelled variable does not pass silently.
pub fn apply_vars<T: Section>(
    config: &mut T,
    vars: impl IntoIterator<Item = (String, String)>,
) -> Result<(), ConfigError> {
    let prefix = T::env_prefix();
    for (name, value) in vars {
        let Some(key) = name.strip_prefix(&prefix) else {
            continue;
        };
        let key = key.to_ascii_lowercase();
        let another_section = SECTIONS.iter().any(|section| {
            *section != T::NAME
                && key
                    .strip_prefix(section)
                    .is_some_and(|rest| rest.starts_with('_'))
        });
        if T::NAME == "mesh" && another_section {
            continue;
        }
        config
            .set_key(&key, &value)
            .map_err(|rule| invalid(&name, value.clone(), rule))?;
    }
    Ok(())
}

/// A file read by section: section `T`'s table if present; the other known sections skipped,
/// any other top-level key refused.
struct Sectioned<T>(Option<T>);

impl<'de, T: Section> Deserialize<'de> for Sectioned<T> {
    fn deserialize<D: serde::Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        struct Sections<T>(PhantomData<T>);

        impl<'de, T: Section> Visitor<'de> for Sections<T> {
            type Value = Sectioned<T>;

            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                write!(f, "sections named {}", super::text::one_of(SECTIONS))
            }

            fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Self::Value, A::Error> {
                let mut found = None;
                while let Some(key) = map.next_key::<String>()? {
                    if key == T::NAME {
                        found = Some(map.next_value::<T>()?);
                    } else if SECTIONS.contains(&key.as_str()) {
                        map.next_value::<IgnoredAny>()?;
                    } else {
                        return Err(serde::de::Error::unknown_field(&key, SECTIONS));
                    }
                }
                Ok(Sectioned(found))
            }
        }

        deserializer.deserialize_map(Sections(PhantomData))
    }
}

/// Declares a configuration [`Section`] from one list of keys: each key's documentation and
/// serde attributes, its type and its default. The struct, its `Default`, `KEYS` and the text
/// setter behind environment variables and flags (`set`) are generated from the list, so a
/// key is written in one place. Each key's type must implement
/// [`FromText`](crate::config::FromText); the struct needs `#[serde(default)]`.
///
/// ```
/// use std::time::Duration;
///
/// use serde::Deserialize;
///
/// mesh::config_section! {
///     /// The `[reapi]` section (an example with two keys).
///     #[derive(Debug, Clone, PartialEq, Deserialize)]
///     #[serde(default, deny_unknown_fields)]
///     pub struct ReapiKeys in "reapi" {
///         /// Where the data lives.
///         data_dir: String = "/var/lib/reapi".to_owned(),
///         /// How long results are kept.
///         #[serde(with = "humantime_serde")]
///         retention: Duration = Duration::from_secs(600),
///     }
/// }
///
/// let keys: ReapiKeys =
///     mesh::config::from_toml_str("[reapi]\nretention = \"1m\"\n").unwrap();
/// assert_eq!(keys.retention, Duration::from_secs(60));
/// let mut keys = keys;
/// keys.set("data_dir", "/data").unwrap();
/// assert!(keys.set("data_dri", "/data").is_err());
/// ```
#[macro_export]
macro_rules! config_section {
    (
        $(#[$struct_attr:meta])*
        pub struct $name:ident in $section:literal {
            $(
                $(#[$key_attr:meta])*
                $key:ident: $ty:ty = $default:expr,
            )*
        }
    ) => {
        $(#[$struct_attr])*
        pub struct $name {
            $( $(#[$key_attr])* pub $key: $ty, )*
        }

        impl ::core::default::Default for $name {
            fn default() -> Self {
                Self { $( $key: $default, )* }
            }
        }

        impl $name {
            /// Every key, in the order they are declared.
            pub const KEYS: &'static [&'static str] = &[$( stringify!($key) ),*];

            /// Sets one key from text, as an environment variable or a command-line flag
            /// would: lists are comma-separated, maps are `k=v,k=v`, durations are like
            /// `"30s"`, sizes like `"10GiB"`. Unknown keys are an error too, so a misspelled
            /// variable does not pass silently. The error is the rule the value broke.
            pub fn set(&mut self, key: &str, value: &str) -> ::core::result::Result<(), String> {
                match key {
                    $( stringify!($key) => {
                        self.$key = $crate::config::FromText::from_text(value)?
                    } )*
                    _ => {
                        return Err(format!("is not a key of the [{}] section", $section));
                    }
                }
                Ok(())
            }
        }

        impl $crate::config::Section for $name {
            const NAME: &'static str = $section;
            const KEYS: &'static [&'static str] = $name::KEYS;

            fn set_key(&mut self, key: &str, value: &str) -> ::core::result::Result<(), String> {
                self.set(key, value)
            }
        }
    };
}
