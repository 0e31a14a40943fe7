//! The `[reapi]` section of a server's configuration file: the REAPI replica's keys, read by
//! the mesh's loader ([`mesh::config`]) from the same TOML or YAML file as `[mesh]`, then
//! overridden by `MESH_REAPI_<KEY>` environment variables, then by flags. Every key has a
//! default ([`ReapiSettings::default`]); [`ReapiSettings::reapi_config`] checks every value
//! and makes the [`ReapiConfig`] a [`ReapiServer`](crate::ReapiServer) starts from. Errors
//! name the key, the value and the rule.
//!
//! ```toml
//! [mesh]
//! discovery_mode = "dns"
//! dns_service_name = "reapi.build.svc.cluster.local."
//!
//! [reapi]
//! data_dir = "/var/lib/mesh-reapi"
//! cas_max_bytes = "50GiB"
//! sandbox = "required"
//! ```

use std::{path::PathBuf, time::Duration};

use mesh::config::{ByteSize, ConfigError, choice};
use serde::Deserialize;

use crate::{
    ActionLimits, Authorization, PeerConfig, ReapiConfig, ReplicationConfig, ResourceLimits,
    SandboxMode, SchedulerConfig,
};

impl mesh::config::Choice for SandboxMode {}

mesh::config_section! {
    /// The `[reapi]` section: where a replica keeps its data, how much, how many actions it
    /// runs, how they run, and how long things may take. The defaults are
    /// [`ReapiConfig::new`]'s.
    #[derive(Debug, Clone, PartialEq, Deserialize)]
    #[serde(default, deny_unknown_fields)]
    #[non_exhaustive]
    pub struct ReapiSettings in "reapi" {
        /// Where the replica keeps its CAS, action cache and the directories actions run in.
        /// Empty (the default): `mesh-reapi-<node id>` in the system's temporary directory,
        /// which does not survive a reboot; a deployment sets a volume here.
        data_dir: String = String::new(),
        /// The CAS's bound; least recently used blobs are evicted beyond it. Default 10 GiB.
        #[serde(deserialize_with = "mesh::config::size")]
        cas_max_bytes: ByteSize = ByteSize::gib(10),
        /// The action cache's bound. Default 256 MiB.
        #[serde(deserialize_with = "mesh::config::size")]
        action_cache_max_bytes: ByteSize = ByteSize::mib(256),
        /// How many actions run at once, gossiped as the node's capacity. 0 (the default):
        /// the `[mesh]` section's `max_concurrency` where that is set, otherwise one per CPU
        /// (actions are mostly compilers: more at once than CPUs only makes each slower).
        max_concurrency: u32 = 0,
        /// Whether actions run in the sandbox (bubblewrap): `auto` (the default: where it
        /// works, with a warning where it does not), `required` or `off`.
        #[serde(deserialize_with = "choice")]
        sandbox: SandboxMode = SandboxMode::Auto,
        /// How many replicas own each blob and each action result. At least 1; the default
        /// 2 keeps everything through the loss of a replica.
        replication_factor: u32 = 2,
        /// How long the members must stay unchanged before handoff copies data to new
        /// owners. Default 1 s.
        #[serde(with = "humantime_serde")]
        handoff_delay: Duration = Duration::from_secs(1),
        /// The timeout of an action that sets none. Default 1 h.
        #[serde(with = "humantime_serde")]
        action_timeout: Duration = Duration::from_secs(3600),
        /// The longest timeout an action may ask for. Default 3 h.
        #[serde(with = "humantime_serde")]
        max_action_timeout: Duration = Duration::from_secs(3 * 3600),
        /// How long a finished operation can still be followed with `WaitExecution`.
        /// Default 10 min.
        #[serde(with = "humantime_serde")]
        operation_retention: Duration = Duration::from_secs(600),
        /// Deadline of a small call to a peer (`FindMissingBlobs`, `GetActionResult`, …).
        /// Default 10 s.
        #[serde(with = "humantime_serde")]
        peer_call_timeout: Duration = Duration::from_secs(10),
        /// Longest silence within a blob streamed from a peer. Default 30 s.
        #[serde(with = "humantime_serde")]
        peer_stream_idle_timeout: Duration = Duration::from_secs(30),
        /// The most processes an action may have at once; 0 means no limit. Default 4096.
        max_action_processes: u64 = 4096,
        /// The most memory an action's processes may use together; 0 (the default) means no
        /// limit.
        #[serde(deserialize_with = "mesh::config::size")]
        max_action_memory: ByteSize = ByteSize::b(0),
        /// The bearer tokens clients must present (see [`crate::auth`]); empty (the default):
        /// every client may do everything. Needs `cluster_token_file`.
        tokens_file: String = String::new(),
        /// The token replicas authenticate to each other with. Needs `tokens_file`.
        cluster_token_file: String = String::new(),
    }
}

impl ReapiSettings {
    /// Reads the `[reapi]` section of a TOML or YAML file (its defaults if it has none).
    pub fn from_file(path: impl AsRef<std::path::Path>) -> Result<Self, ConfigError> {
        mesh::config::from_file(path)
    }

    /// Overrides keys from `MESH_REAPI_<KEY>` environment variables.
    pub fn apply_env(&mut self) -> Result<(), ConfigError> {
        mesh::config::apply_vars(self, std::env::vars())
    }

    /// Checks every value and makes the replica's configuration: `node_id` names the default
    /// data directory, `mesh_max_concurrency` is the `[mesh]` section's `max_concurrency` if
    /// it was set (used when `max_concurrency` is 0; `None`: one action per CPU,
    /// [`ReapiConfig::new`]'s default). Reads the token files when they are set.
    pub fn reapi_config(
        &self,
        node_id: &str,
        mesh_max_concurrency: Option<u32>,
    ) -> Result<ReapiConfig, ConfigError> {
        let data_dir = if self.data_dir.is_empty() {
            std::env::temp_dir().join(format!("mesh-reapi-{node_id}"))
        } else {
            PathBuf::from(&self.data_dir)
        };
        let mut config = ReapiConfig::new(data_dir);
        config.cas_max_bytes = positive_size("cas_max_bytes", self.cas_max_bytes)?;
        config.action_cache_max_bytes =
            positive_size("action_cache_max_bytes", self.action_cache_max_bytes)?;
        config.max_concurrency = match (self.max_concurrency, mesh_max_concurrency) {
            (0, Some(mesh)) => mesh,
            // ReapiConfig::new's: one per CPU.
            (0, None) => config.max_concurrency,
            (n, _) => n,
        };
        if config.max_concurrency == 0 {
            return Err(invalid(
                "max_concurrency",
                "0",
                "must be at least 1 (here or in [mesh])",
            ));
        }
        config.sandbox = self.sandbox;
        if self.replication_factor == 0 {
            return Err(invalid(
                "replication_factor",
                "0",
                "must be at least 1 (2 keeps every blob through the loss of a replica)",
            ));
        }
        config.replication = ReplicationConfig {
            factor: usize::try_from(self.replication_factor).unwrap_or(usize::MAX),
            handoff_delay: self.handoff_delay,
        };
        let limits = ActionLimits {
            default_timeout: positive("action_timeout", self.action_timeout)?,
            max_timeout: positive("max_action_timeout", self.max_action_timeout)?,
        };
        if limits.max_timeout < limits.default_timeout {
            return Err(invalid(
                "max_action_timeout",
                &humantime::format_duration(limits.max_timeout).to_string(),
                &format!(
                    "must be at least action_timeout ({})",
                    humantime::format_duration(limits.default_timeout)
                ),
            ));
        }
        config.limits = limits;
        config.scheduler = SchedulerConfig {
            retention: positive("operation_retention", self.operation_retention)?,
        };
        config.peers = PeerConfig {
            call_timeout: positive("peer_call_timeout", self.peer_call_timeout)?,
            stream_idle_timeout: positive(
                "peer_stream_idle_timeout",
                self.peer_stream_idle_timeout,
            )?,
        };
        config.resources = ResourceLimits {
            max_processes: Some(self.max_action_processes).filter(|&n| n > 0),
            max_memory_bytes: Some(self.max_action_memory.as_u64()).filter(|&n| n > 0),
        };
        config.authorization = match (self.tokens_file.as_str(), self.cluster_token_file.as_str()) {
            ("", "") => None,
            ("", _) => {
                return Err(invalid(
                    "tokens_file",
                    "",
                    "must be set with cluster_token_file",
                ));
            }
            (_, "") => {
                return Err(invalid(
                    "cluster_token_file",
                    "",
                    "must be set with tokens_file",
                ));
            }
            (tokens, cluster) => Some(
                Authorization::from_files(tokens, cluster)
                    .map_err(|error| invalid("tokens_file", tokens, &error.to_string()))?,
            ),
        };
        Ok(config)
    }
}

fn invalid(key: &str, value: &str, rule: &str) -> ConfigError {
    ConfigError::Invalid {
        key: format!("reapi.{key}"),
        value: value.to_owned(),
        rule: rule.to_owned(),
    }
}

fn positive(key: &str, value: Duration) -> Result<Duration, ConfigError> {
    if value.is_zero() {
        Err(invalid(key, "0s", "must be longer than zero"))
    } else {
        Ok(value)
    }
}

fn positive_size(key: &str, value: ByteSize) -> Result<u64, ConfigError> {
    match value.as_u64() {
        0 => Err(invalid(key, "0", "must be larger than zero")),
        bytes => Ok(bytes),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The section's defaults make the configuration `ReapiConfig::new` documents.
    #[test]
    fn the_defaults_are_the_servers_defaults() {
        let made = ReapiSettings::default().reapi_config("r0", None).unwrap();
        let new = ReapiConfig::new(std::env::temp_dir().join("mesh-reapi-r0"));
        assert_eq!(made.data_dir, new.data_dir);
        assert_eq!(made.cas_max_bytes, new.cas_max_bytes);
        assert_eq!(made.action_cache_max_bytes, new.action_cache_max_bytes);
        assert_eq!(
            made.max_concurrency, new.max_concurrency,
            "one per CPU when neither section sets it"
        );
        assert_eq!(
            ReapiSettings::default()
                .reapi_config("r0", Some(7))
                .unwrap()
                .max_concurrency,
            7,
            "0 takes [mesh] max_concurrency where it is set"
        );
        assert_eq!(made.limits, new.limits);
        assert_eq!(made.scheduler.retention, new.scheduler.retention);
        assert_eq!(made.peers.call_timeout, new.peers.call_timeout);
        assert_eq!(
            made.peers.stream_idle_timeout,
            new.peers.stream_idle_timeout
        );
        assert_eq!(made.replication.factor, new.replication.factor);
        assert_eq!(
            made.replication.handoff_delay,
            new.replication.handoff_delay
        );
        assert_eq!(made.sandbox, new.sandbox);
        assert_eq!(made.resources, new.resources);
        assert!(made.authorization.is_none());
    }

    #[test]
    fn values_apply_and_bad_ones_are_refused_naming_key_value_and_rule() {
        let mut settings = ReapiSettings::default();
        for (key, value) in [
            ("data_dir", "/data"),
            ("cas_max_bytes", "2GiB"),
            ("max_concurrency", "3"),
            ("sandbox", "off"),
            ("replication_factor", "3"),
            ("action_timeout", "5m"),
            ("max_action_processes", "0"),
            ("max_action_memory", "512MiB"),
        ] {
            settings
                .set(key, value)
                .unwrap_or_else(|e| panic!("{key}: {e}"));
        }
        let config = settings.reapi_config("r0", Some(16)).unwrap();
        assert_eq!(config.data_dir, PathBuf::from("/data"));
        assert_eq!(config.cas_max_bytes, 2 << 30);
        assert_eq!(config.max_concurrency, 3);
        assert_eq!(config.sandbox, SandboxMode::Off);
        assert_eq!(config.replication.factor, 3);
        assert_eq!(config.limits.default_timeout, Duration::from_secs(300));
        assert_eq!(config.resources.max_processes, None);
        assert_eq!(config.resources.max_memory_bytes, Some(512 << 20));

        let refused = |key: &str, value: &str| {
            let mut settings = ReapiSettings::default();
            settings.set(key, value).unwrap();
            settings
                .reapi_config("r0", Some(16))
                .unwrap_err()
                .to_string()
        };
        assert_eq!(
            refused("replication_factor", "0"),
            "invalid reapi.replication_factor \"0\": must be at least 1 (2 keeps every blob \
             through the loss of a replica)"
        );
        assert_eq!(
            refused("max_action_timeout", "1m"),
            "invalid reapi.max_action_timeout \"1m\": must be at least action_timeout (1h)"
        );
        assert_eq!(
            refused("cas_max_bytes", "0"),
            "invalid reapi.cas_max_bytes \"0\": must be larger than zero"
        );
        assert_eq!(
            refused("tokens_file", "/tokens"),
            "invalid reapi.cluster_token_file \"\": must be set with tokens_file"
        );
        let mut settings = ReapiSettings::default();
        assert_eq!(
            settings.set("sandbox", "maybe").unwrap_err(),
            "must be one of auto, on, required, off"
        );
        assert_eq!(
            settings.set("cas_max_bytes", "much").unwrap_err(),
            "must be a size such as \"512MiB\", \"10GiB\" or a number of bytes"
        );
    }
}
