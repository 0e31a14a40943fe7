//! [`MeshConfig`]: the mesh section of a server's configuration, with the seed server's keys.
//!
//! Loaded from TOML or YAML (by file extension), either at the top level or under a `mesh`
//! section, then overridden by `MESH_*` environment variables, then validated. Every error names
//! the key (or variable), the offending value and the rule.
//!
//! Each key is written once, in the [`config_section!`](crate::config_section) list below: its
//! documentation, its type and its default. The struct, its `Default`, [`MeshConfig::KEYS`] and
//! the text setter behind the environment overlay ([`MeshConfig::set`]) all come from that list,
//! and the text of a value is read by its type ([`FromText`]): numbers, booleans,
//! comma-separated lists, `k=v` maps, durations (`humantime`, as in files), sizes, and the enums
//! by their serde names, so a variant is spelled in one place too.
//!
//! Other parts of a server declare their own sections the same way and read them from the same
//! file ([`Section`], [`from_file`]): `mesh-reapi`'s `[reapi]` is one. A file with a known
//! section name ([`SECTIONS`]) at its top level is read by section, and any other top-level
//! key is refused with the list of sections; a file without sections holds the mesh keys at its
//! top level (the seed server's flat files). Variables are `MESH_<KEY>` for `[mesh]` and
//! `MESH_<SECTION>_<KEY>` for the others.
//!
//! A configuration for a Kubernetes StatefulSet behind a headless service (every other key at
//! its default; the README lists the defaults):
//!
//! ```toml
//! [mesh]
//! discovery_mode = "dns"           # "list" (the default: join_peers) or "dns"
//! dns_service_name = "mesh.build.svc.cluster.local."
//! timing = "lan"                   # "lan", "wan" or "local"
//! max_concurrency = 16
//! tls_cert_file = "/tls/tls.crt"   # the three tls_*_file keys turn TLS on for the server and
//! tls_key_file = "/tls/tls.key"    # for forwarding (peers must advertise https://, and do)
//! tls_ca_file = "/tls/ca.crt"
//! gossip_keys_env = "MESH_GOSSIP_KEYS"  # encrypt gossip with the keys in this variable
//! cluster_label = "build"
//! ```
//!
//! The parts, each in its own file: the mesh keys and their defaults (`config/keys.rs`), the
//! section machinery shared with other sections (`config/section.rs`: files, variables), the
//! reading of one value's text by its type (`config/text.rs`), the secrets the keys name
//! (`config/secrets.rs`: gossip keyring, TLS material), and the checked, resolved result that
//! builds a node (`config/resolve.rs`).
//!
//! TLS material is read and checked by [`MeshConfig::resolve`]: a file that cannot be read, a
//! key that does not belong to its certificate, or a missing companion key is reported under
//! its key name. See [`crate::tls`] for what TLS protects.

use std::path::{Path, PathBuf};

mod keys;
mod resolve;
mod secrets;
mod section;
mod text;

pub use keys::{DiscoveryMode, MeshConfig, StrategyKind, TimingPreset, WhenFullMode};
pub use resolve::{ResolvedConfig, ResolvedTls};

pub use section::{
    SECTIONS, Section, apply_vars, from_file, from_toml_str, from_yaml_str, sets_in_file,
};
pub use text::{ByteSize, Choice, FromText, choice, size};

/// A configuration could not be loaded or is invalid.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ConfigError {
    /// The file could not be read.
    #[error("reading {path}: {source}")]
    Read {
        /// The file.
        path: PathBuf,
        /// The cause.
        #[source]
        source: std::io::Error,
    },
    /// The file is not valid TOML/YAML for this schema (the message names the key and line).
    #[error("parsing {path}: {message}")]
    Parse {
        /// The file.
        path: PathBuf,
        /// The parser's message.
        message: String,
    },
    /// The file's extension is neither TOML nor YAML.
    #[error("{path}: unknown configuration format; use a .toml, .yaml or .yml file")]
    UnknownFormat {
        /// The file.
        path: PathBuf,
    },
    /// A value breaks a rule.
    #[error("invalid {key} {value:?}: {rule}")]
    Invalid {
        /// The key (or environment variable) that holds it.
        key: String,
        /// The value.
        value: String,
        /// The rule.
        rule: String,
    },
}

fn invalid(key: &str, value: impl Into<String>, rule: impl Into<String>) -> ConfigError {
    ConfigError::Invalid {
        key: key.to_owned(),
        value: mesh_core::abbreviate(&value.into()),
        rule: rule.into(),
    }
}

impl MeshConfig {
    /// Reads a TOML (`.toml`) or YAML (`.yaml`, `.yml`) file. The mesh keys may be at the top
    /// level or under a `mesh` section, beside the other sections ([`SECTIONS`]).
    pub fn from_file(path: impl AsRef<Path>) -> Result<Self, ConfigError> {
        section::from_file(path)
    }

    /// Parses TOML text (top level or `[mesh]` section).
    pub fn from_toml_str(text: &str) -> Result<Self, String> {
        section::from_toml_str(text)
    }

    /// Parses YAML text (top level or `mesh:` section).
    pub fn from_yaml_str(text: &str) -> Result<Self, String> {
        section::from_yaml_str(text)
    }

    /// Overrides keys from `MESH_<KEY>` environment variables (`MESH_NODE_ID`,
    /// `MESH_BIND_PORT`, `MESH_JOIN_PEERS` comma-separated, `MESH_TAGS` as `k=v,k=v`, …).
    /// Variables of the other sections (`MESH_REAPI_*`) are theirs.
    pub fn apply_env(&mut self) -> Result<(), ConfigError> {
        self.apply_vars(std::env::vars())
    }

    /// [`MeshConfig::apply_env`] over an explicit list of variables (for tests).
    pub fn apply_vars(
        &mut self,
        vars: impl IntoIterator<Item = (String, String)>,
    ) -> Result<(), ConfigError> {
        section::apply_vars(self, vars)
    }
}

#[cfg(test)]
mod tests {
    use std::{collections::BTreeMap, time::Duration};

    use mesh_core::Timing;
    use mesh_route::WhenFull;

    use super::*;

    #[test]
    fn a_key_set_in_a_file_is_told_from_its_default() {
        let dir = tempfile::tempdir().unwrap();
        let cases = [
            ("top.toml", "max_concurrency = 4\n", true),
            (
                "section.toml",
                "[mesh]\nmax_concurrency = 4\n[reapi]\ndata_dir = \"/d\"\n",
                true,
            ),
            ("other.toml", "[reapi]\nmax_concurrency = 4\n", false),
            ("absent.toml", "node_id = \"n\"\n", false),
            ("top.yaml", "max_concurrency: 4\n", true),
            (
                "section.yaml",
                "mesh:\n  max_concurrency: 4\nreapi: {}\n",
                true,
            ),
            ("absent.yaml", "mesh:\n  node_id: n\n", false),
            ("empty.yaml", "", false),
        ];
        for (name, text, set) in cases {
            let path = dir.path().join(name);
            std::fs::write(&path, text).unwrap();
            assert_eq!(
                sets_in_file::<MeshConfig>(&path, "max_concurrency").unwrap(),
                set,
                "{name}"
            );
        }
        let error = sets_in_file::<MeshConfig>(dir.path().join("x.ini"), "max_concurrency")
            .unwrap_err()
            .to_string();
        assert!(error.contains("x.ini"), "{error}");
    }
    use crate::config::text::{DURATION_RULE, one_of};

    #[test]
    fn durations_read_as_in_files() {
        let read = |text: &str| Duration::from_text(text);
        assert_eq!(read("500ms"), Ok(Duration::from_millis(500)));
        assert_eq!(read(" 30s "), Ok(Duration::from_secs(30)));
        assert_eq!(read("5m"), Ok(Duration::from_secs(300)));
        assert_eq!(read("1h"), Ok(Duration::from_secs(3600)));
        assert_eq!(read("1m 30s"), Ok(Duration::from_secs(90)));
        for bad in ["", "-1s", "10 parsecs", "s", "1e400s", "NaNs", "30"] {
            assert_eq!(read(bad), Err(DURATION_RULE.to_owned()), "{bad:?}");
        }
        // Zero reads, and is refused by `resolve` under its key.
        let mut config = MeshConfig {
            node_id: "n".to_owned(),
            bind_addr: "127.0.0.1".to_owned(),
            ..MeshConfig::default()
        };
        config.set("discovery_interval", "0s").unwrap();
        let error = config.resolve().unwrap_err().to_string();
        assert_eq!(
            error,
            format!("invalid discovery_interval \"0s\": {DURATION_RULE}")
        );
    }

    #[test]
    fn choices_are_read_by_their_serde_names() {
        assert_eq!(TimingPreset::from_text(" wan"), Ok(TimingPreset::Wan));
        assert_eq!(
            StrategyKind::from_text("power-of-two"),
            Ok(StrategyKind::PowerOfTwo)
        );
        assert_eq!(
            WhenFullMode::from_text("run-locally"),
            Ok(WhenFullMode::RunLocally)
        );
        assert_eq!(DiscoveryMode::from_text("dns"), Ok(DiscoveryMode::Dns));
        assert_eq!(
            TimingPreset::from_text("Lan"),
            Err("must be \"lan\", \"wan\" or \"local\"".to_owned())
        );
        assert_eq!(
            StrategyKind::from_text("weighted").map(|k| k.strategy().name()),
            Ok("weighted-capacity")
        );
        assert_eq!(WhenFull::from(WhenFullMode::default()), WhenFull::Wait);
        assert_eq!(TimingPreset::Local.timing(), Timing::local());
    }

    #[test]
    fn lists_maps_and_numbers_from_text() {
        assert_eq!(
            Vec::<String>::from_text(" a:1, ,b:2,"),
            Ok(vec!["a:1".to_owned(), "b:2".to_owned()])
        );
        let tags = BTreeMap::<String, String>::from_text("os = linux,pool=gpu").unwrap();
        assert_eq!(tags.get("os").map(String::as_str), Some("linux"));
        assert_eq!(tags.len(), 2);
        assert_eq!(
            u16::from_text("70000"),
            Err("must be a port number (0-65535)".to_owned())
        );
        assert_eq!(u32::from_text(" 16 "), Ok(16));
        assert_eq!(
            bool::from_text("yes"),
            Err("must be true or false".to_owned())
        );
    }

    #[test]
    fn every_key_can_be_set_from_text() {
        let mut config = MeshConfig::default();
        for key in MeshConfig::KEYS {
            // Text every type accepts except the enums, which get their first name.
            let text = match *key {
                "discovery_mode" => "dns",
                "timing" => "local",
                "strategy" => "random",
                "when_full" => "run-locally",
                "enabled" | "dns_srv" | "tls_client_auth" => "true",
                "discovery_interval" => "1s",
                "tags" => "k=v",
                _ if matches!(
                    *key,
                    "bind_port" | "advertise_port" | "grpc_port" | "max_concurrency"
                ) =>
                {
                    "1"
                }
                _ => "x",
            };
            config
                .set(key, text)
                .unwrap_or_else(|rule| panic!("{key}: {rule}"));
        }
        assert_eq!(
            config.set("nope", "1"),
            Err("is not a key of the [mesh] section".to_owned())
        );
        assert_eq!(MeshConfig::KEYS.first(), Some(&"enabled"));
    }

    #[test]
    fn short_lists_are_spelled_out_and_long_ones_listed() {
        assert_eq!(one_of(&["a", "b"]), "\"a\" or \"b\"");
        assert_eq!(one_of(&["a", "b", "c"]), "\"a\", \"b\" or \"c\"");
        assert_eq!(one_of(&["a", "b", "c", "d"]), "one of a, b, c, d");
    }
}
