//! The seed server's configuration keys load from TOML and YAML, environment variables override
//! them, and every invalid value is reported with its key, the value and the rule.

use std::{io::Write, time::Duration};

use mesh::{
    ConfigError, DiscoveryMode, MeshConfig,
    config::{StrategyKind, TimingPreset, WhenFullMode},
};
use mesh_reapi::ReapiSettings;

const SEED_TOML: &str = r#"
[mesh]
enabled = true
node_id = "build-0"
bind_addr = "127.0.0.1"
bind_port = 7946
advertise_addr = ""
discovery_mode = "list"
join_peers = ["127.0.0.1:7947", "localhost:7948"]
dns_service_name = ""
timing = "local"
grpc_port = 50051
max_concurrency = 8
tags = { os = "linux", arch = "x86_64" }
"#;

const SEED_YAML: &str = r#"
mesh:
  enabled: true
  node_id: build-1
  bind_addr: 0.0.0.0
  bind_port: 7946
  advertise_addr: 10.1.2.3
  discovery_mode: dns
  join_peers: []
  dns_service_name: mesh.build.svc.cluster.local
  dns_srv: true
  discovery_interval: 15s
"#;

fn file(extension: &str, text: &str) -> tempfile_path::TempFile {
    tempfile_path::TempFile::new(extension, text)
}

/// A file in the target directory's temp area, removed on drop (no extra dependency).
mod tempfile_path {
    use std::path::PathBuf;

    pub(crate) struct TempFile(pub(crate) PathBuf);

    impl TempFile {
        pub(crate) fn new(extension: &str, text: &str) -> Self {
            let path = std::env::temp_dir().join(format!(
                "mesh-config-test-{}-{}.{extension}",
                std::process::id(),
                uuid::Uuid::now_v7()
            ));
            let mut file = std::fs::File::create(&path).unwrap();
            super::Write::write_all(&mut file, text.as_bytes()).unwrap();
            Self(path)
        }
    }

    impl Drop for TempFile {
        fn drop(&mut self) {
            let _ = std::fs::remove_file(&self.0);
        }
    }
}

fn invalid_key(error: &ConfigError) -> &str {
    match error {
        ConfigError::Invalid { key, .. } => key,
        other => panic!("expected an invalid value, got {other}"),
    }
}

#[test]
fn the_seed_toml_keys_load() {
    let f = file("toml", SEED_TOML);
    let config = MeshConfig::from_file(&f.0).unwrap();
    assert!(config.enabled);
    assert_eq!(config.node_id, "build-0");
    assert_eq!(config.bind_port, 7946);
    assert_eq!(config.discovery_mode, DiscoveryMode::List);
    assert_eq!(config.join_peers, ["127.0.0.1:7947", "localhost:7948"]);
    assert_eq!(config.max_concurrency, 8);
    assert_eq!(config.tags.get("os").map(String::as_str), Some("linux"));

    let resolved = config.resolve().unwrap();
    assert_eq!(resolved.node_id.as_str(), "build-0");
    assert_eq!(resolved.gossip_advertise, "127.0.0.1:7946".parse().unwrap());
    assert_eq!(
        resolved.grpc_endpoint.as_deref(),
        Some("http://127.0.0.1:50051")
    );
    assert_eq!(resolved.timing, mesh::Timing::local().tap_interval());
}

/// The local preset with the default discovery interval applied.
trait TapInterval {
    fn tap_interval(self) -> Self;
}

impl TapInterval for mesh::Timing {
    fn tap_interval(mut self) -> Self {
        self.discovery_interval = Duration::from_secs(30);
        self
    }
}

#[test]
fn the_seed_yaml_keys_load() {
    let f = file("yaml", SEED_YAML);
    let config = MeshConfig::from_file(&f.0).unwrap();
    assert_eq!(config.node_id, "build-1");
    assert_eq!(config.discovery_mode, DiscoveryMode::Dns);
    assert!(config.dns_srv);
    let resolved = config.resolve().unwrap();
    assert_eq!(resolved.gossip_bind, "0.0.0.0:7946".parse().unwrap());
    assert_eq!(resolved.gossip_advertise, "10.1.2.3:7946".parse().unwrap());
    assert_eq!(
        resolved.timing.discovery_interval,
        std::time::Duration::from_secs(15)
    );
    // Top-level keys without a `mesh:` section work too.
    let flat = MeshConfig::from_yaml_str("node_id: flat\nbind_port: 1234\n").unwrap();
    assert_eq!((flat.node_id.as_str(), flat.bind_port), ("flat", 1234));
    // And an empty file is the defaults.
    assert_eq!(
        MeshConfig::from_yaml_str("").unwrap(),
        MeshConfig::default()
    );
    assert_eq!(
        MeshConfig::from_toml_str("").unwrap(),
        MeshConfig::default()
    );
}

/// Every documented default, against literal values: the test fails if a default drifts
/// from what README.md and the key docs say.
#[test]
fn documented_defaults_are_pinned() {
    let config = MeshConfig::default();
    assert!(config.enabled);
    assert_eq!(config.node_id, "");
    assert_eq!(config.bind_addr, "0.0.0.0");
    assert_eq!(config.bind_port, 7946);
    assert_eq!(config.advertise_addr, "");
    assert_eq!(config.advertise_port, 0);
    assert_eq!(config.discovery_mode, DiscoveryMode::List);
    assert!(config.join_peers.is_empty());
    assert_eq!(config.dns_service_name, "");
    assert!(!config.dns_srv);
    assert_eq!(config.dns_nameserver, "");
    assert_eq!(config.discovery_interval, Duration::from_secs(30));
    assert_eq!(config.timing, TimingPreset::Lan);
    assert_eq!(config.grpc_advertise_addr, "");
    assert_eq!(config.grpc_port, 50051);
    assert_eq!(config.max_concurrency, 16);
    assert!(config.tags.is_empty());
    assert_eq!(config.strategy, StrategyKind::LeastLoaded);
    assert_eq!(config.when_full, WhenFullMode::Wait);
    assert_eq!(config.tls_cert_file, "");
    assert_eq!(config.tls_key_file, "");
    assert_eq!(config.tls_ca_file, "");
    assert!(!config.tls_client_auth);
    assert_eq!(config.tls_domain, "");
    assert_eq!(config.gossip_keys_file, "");
    assert_eq!(config.gossip_keys_env, "");
    assert_eq!(config.cluster_label, "");
    assert_eq!(
        MeshConfig::KEYS.len(),
        27,
        "a new key needs its default pinned here"
    );
    assert_eq!(mesh::core::DEFAULT_MAX_CONCURRENCY, 16);
}

/// The configuration block in README.md shows the defaults: it parses, and is exactly
/// `MeshConfig::default()`.
#[test]
fn the_readme_configuration_block_is_the_defaults() {
    let readme = include_str!("../../README.md");
    let section = &readme[readme
        .find("## Configuration")
        .expect("a configuration section")..];
    let start = section.find("```toml\n").expect("a TOML block") + "```toml\n".len();
    let block = &section[start..start + section[start..].find("```").unwrap()];
    let config = MeshConfig::from_toml_str(block).unwrap_or_else(|e| panic!("{e}\n{block}"));
    assert_eq!(config, MeshConfig::default(), "{block}");
    let reapi: ReapiSettings =
        mesh::config::from_toml_str(block).unwrap_or_else(|e| panic!("{e}\n{block}"));
    assert_eq!(reapi, ReapiSettings::default(), "{block}");
    let reapi_block = &block[block.find("[reapi]").expect("a [reapi] section")..];
    for key in ReapiSettings::KEYS {
        assert!(
            reapi_block.contains(&format!("\n{key} = ")),
            "README's [reapi] block lacks {key}"
        );
    }
}

/// `[reapi]` keys come from the same file as `[mesh]` (TOML or YAML), then from
/// `MESH_REAPI_*` variables, which the mesh section leaves alone.
#[test]
fn the_reapi_section_shares_the_file_and_has_its_own_variables() {
    let toml =
        "[mesh]\nnode_id = \"r0\"\n\n[reapi]\ndata_dir = \"/data\"\ncas_max_bytes = \"2GiB\"\n";
    let mesh = MeshConfig::from_toml_str(toml).unwrap();
    assert_eq!(mesh.node_id, "r0");
    let mut reapi: ReapiSettings = mesh::config::from_toml_str(toml).unwrap();
    assert_eq!(reapi.data_dir, "/data");
    assert_eq!(reapi.cas_max_bytes.as_u64(), 2 << 30);
    let yaml = "mesh:\n  node_id: r0\nreapi:\n  sandbox: \"off\"\n  max_action_memory: 1GiB\n";
    let from_yaml: ReapiSettings = mesh::config::from_yaml_str(yaml).unwrap();
    assert_eq!(from_yaml.sandbox, mesh_reapi::SandboxMode::Off);
    assert_eq!(from_yaml.max_action_memory.as_u64(), 1 << 30);
    assert_eq!(MeshConfig::from_yaml_str(yaml).unwrap().node_id, "r0");
    // A file of mesh keys only gives the [reapi] defaults; a misspelled section is refused.
    let flat: ReapiSettings = mesh::config::from_toml_str("node_id = \"r0\"\n").unwrap();
    assert_eq!(flat, ReapiSettings::default());
    let error = MeshConfig::from_toml_str("[mesh]\n[reapl]\n").unwrap_err();
    assert!(
        error.contains("reapl") && error.contains("`reapi`"),
        "{error}"
    );

    let vars = [
        ("MESH_REAPI_REPLICATION_FACTOR", "3"),
        ("MESH_REAPI_OPERATION_RETENTION", "1m"),
        ("MESH_NODE_ID", "r1"),
    ]
    .map(|(k, v)| (k.to_owned(), v.to_owned()));
    mesh::config::apply_vars(&mut reapi, vars.clone()).unwrap();
    assert_eq!(reapi.replication_factor, 3);
    assert_eq!(reapi.operation_retention, Duration::from_secs(60));
    let mut mesh = mesh;
    mesh.apply_vars(vars).unwrap();
    assert_eq!(mesh.node_id, "r1");

    let error = mesh::config::apply_vars(
        &mut reapi,
        [("MESH_REAPI_CAS_MAX_BYTE".to_owned(), "1GiB".to_owned())],
    )
    .unwrap_err()
    .to_string();
    assert_eq!(
        error,
        "invalid MESH_REAPI_CAS_MAX_BYTE \"1GiB\": is not a key of the [reapi] section"
    );
}

/// Builders started without a concurrency limit get the documented one.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_node_started_without_a_limit_runs_the_default_sixteen_tasks() {
    let node = mesh::Node::builder()
        .node_id("defaults")
        .unwrap()
        .gossip_bind("127.0.0.1:0".parse().unwrap())
        .timing(mesh::Timing::local())
        .start()
        .await
        .unwrap();
    assert_eq!(node.load().max_concurrency(), 16);
    let view = node
        .membership()
        .wait_until(|v| v.local().state().is_some())
        .await;
    assert_eq!(view.local().state().unwrap().max_concurrency, 16);
    node.shutdown().await;
}

#[test]
fn environment_variables_override_the_file() {
    let mut config = MeshConfig::from_toml_str(SEED_TOML).unwrap();
    config
        .apply_vars([
            ("MESH_NODE_ID".to_owned(), "from-env".to_owned()),
            ("MESH_BIND_PORT".to_owned(), "8000".to_owned()),
            (
                "MESH_JOIN_PEERS".to_owned(),
                "10.0.0.1:7946, 10.0.0.2:7946".to_owned(),
            ),
            ("MESH_TAGS".to_owned(), "pool=gpu,os=linux".to_owned()),
            ("MESH_DISCOVERY_MODE".to_owned(), "dns".to_owned()),
            ("MESH_DNS_SERVICE_NAME".to_owned(), "mesh.local".to_owned()),
            ("PATH".to_owned(), "/usr/bin".to_owned()),
        ])
        .unwrap();
    assert_eq!(config.node_id, "from-env");
    assert_eq!(config.bind_port, 8000);
    assert_eq!(config.join_peers, ["10.0.0.1:7946", "10.0.0.2:7946"]);
    assert_eq!(config.tags.get("pool").map(String::as_str), Some("gpu"));
    assert_eq!(config.discovery_mode, DiscoveryMode::Dns);
    config.resolve().unwrap();
}

#[test]
fn bad_environment_variables_name_the_variable_and_the_rule() {
    let cases = [
        ("MESH_BIND_PORT", "99999", "must be a port number (0-65535)"),
        ("MESH_ENABLED", "yes", "must be true or false"),
        (
            "MESH_DISCOVERY_MODE",
            "consul",
            "must be \"list\" or \"dns\"",
        ),
        ("MESH_TAGS", "gpu", "tag \"gpu\" must be key=value"),
        ("MESH_BIND_PROT", "1", "is not a key of the [mesh] section"),
    ];
    for (var, value, rule) in cases {
        let mut config = MeshConfig::default();
        let error = config
            .apply_vars([(var.to_owned(), value.to_owned())])
            .unwrap_err();
        assert_eq!(invalid_key(&error), var);
        let message = error.to_string();
        assert!(
            message.contains(value) && message.contains(rule),
            "{message}"
        );
    }
}

#[test]
fn every_invalid_value_is_named_with_its_rule() {
    let cases: &[(&str, &str, &str)] = &[
        ("node_id = \"bad:id\"", "node_id", "[A-Za-z0-9._-]"),
        (
            "bind_addr = \"localhost\"",
            "bind_addr",
            "must be an IP address",
        ),
        (
            "advertise_addr = \"pod-ip\"",
            "advertise_addr",
            "must be an IP address",
        ),
        (
            "advertise_addr = \"0.0.0.0\"",
            "advertise_addr",
            "not an unspecified one",
        ),
        (
            "join_peers = [\"10.0.0.1\"]",
            "join_peers",
            "must be host:port",
        ),
        (
            "discovery_mode = \"dns\"",
            "dns_service_name",
            "is required when discovery_mode is \"dns\"",
        ),
        (
            "discovery_interval = \"0s\"",
            "discovery_interval",
            "must be a positive duration",
        ),
        (
            "grpc_advertise_addr = \"nohost\"",
            "grpc_advertise_addr",
            "must be host:port",
        ),
        (
            "dns_nameserver = \"8.8.8.8\"",
            "dns_nameserver",
            "must be an ip:port address",
        ),
    ];
    for (line, key, rule) in cases {
        let mut config = MeshConfig::from_toml_str(line).unwrap_or_else(|e| panic!("{line}: {e}"));
        // Everything else valid and independent of the machine.
        if config.node_id.is_empty() {
            config.node_id = "n".to_owned();
        }
        if config.bind_addr == MeshConfig::default().bind_addr {
            config.bind_addr = "127.0.0.1".to_owned();
        }
        let error = config.resolve().unwrap_err();
        assert_eq!(invalid_key(&error), *key, "{line}");
        let message = error.to_string();
        assert!(message.contains(rule), "{line}: {message}");
        assert!(message.starts_with(&format!("invalid {key} ")), "{message}");
    }
}

/// Keys whose values are typed (enums, durations) refuse a bad value as soon as it is read:
/// from a file, the parser names the key, the value and what was expected; from a variable
/// or a flag, the error is the key, the value and the rule.
#[test]
fn typed_values_are_refused_when_read_naming_the_key_the_value_and_the_rule() {
    // (key, bad value, the names a file's error lists, the rule of a variable's error)
    let cases: [(&str, &str, &[&str], &str); 5] = [
        (
            "timing",
            "fast",
            &["lan", "wan", "local"],
            "must be \"lan\", \"wan\" or \"local\"",
        ),
        (
            "strategy",
            "fastest",
            &[
                "least-loaded",
                "power-of-two",
                "round-robin",
                "random",
                "weighted",
                "affinity",
            ],
            "must be one of least-loaded, power-of-two, round-robin, random, weighted, affinity",
        ),
        (
            "when_full",
            "panic",
            &["run-locally", "wait"],
            "must be \"run-locally\" or \"wait\"",
        ),
        (
            "discovery_mode",
            "consul",
            &["list", "dns"],
            "must be \"list\" or \"dns\"",
        ),
        (
            "discovery_interval",
            "soon",
            &[],
            "must be a positive duration",
        ),
    ];
    for (key, value, expected, rule) in cases {
        for error in [
            MeshConfig::from_toml_str(&format!("{key} = {value:?}")).unwrap_err(),
            MeshConfig::from_yaml_str(&format!("mesh:\n  {key}: {value}\n")).unwrap_err(),
        ] {
            assert!(error.contains(key) && error.contains(value), "{error}");
            for name in expected {
                assert!(error.contains(&format!("`{name}`")), "{name}: {error}");
            }
        }

        let var = format!("MESH_{}", key.to_ascii_uppercase());
        let error = MeshConfig::default()
            .apply_vars([(var.clone(), value.to_owned())])
            .unwrap_err();
        assert_eq!(invalid_key(&error), var);
        let message = error.to_string();
        assert!(
            message.starts_with(&format!("invalid {var} {value:?}: {rule}")),
            "{message}"
        );
    }
}

#[test]
fn type_errors_and_unknown_keys_name_the_key() {
    let error = MeshConfig::from_toml_str("bind_port = \"seventy\"").unwrap_err();
    assert!(error.contains("bind_port"), "{error}");
    let error = MeshConfig::from_toml_str("bind_port = 70000").unwrap_err();
    assert!(error.contains("bind_port"), "{error}");
    let error = MeshConfig::from_toml_str("join_peer = []").unwrap_err();
    assert!(error.contains("join_peer"), "{error}");
    let error = MeshConfig::from_yaml_str("mesh:\n  bind_port: lots\n").unwrap_err();
    assert!(error.contains("bind_port"), "{error}");

    let f = file("json", "{}");
    let error = MeshConfig::from_file(&f.0).unwrap_err();
    assert!(
        error
            .to_string()
            .contains("use a .toml, .yaml or .yml file"),
        "{error}"
    );
    let f = file("toml", "bind_port = [");
    let error = MeshConfig::from_file(&f.0).unwrap_err();
    assert!(matches!(error, ConfigError::Parse { .. }), "{error}");
    assert!(error.to_string().contains(&f.0.display().to_string()));
    let error = MeshConfig::from_file("/nonexistent/mesh.toml").unwrap_err();
    assert!(
        error
            .to_string()
            .starts_with("reading /nonexistent/mesh.toml"),
        "{error}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_nodes_started_from_configuration_find_each_other() {
    let first_text = "node_id = \"cfg-0\"\nbind_addr = \"127.0.0.1\"\nbind_port = 0\ngrpc_port = 0\ntiming = \"local\"\nmax_concurrency = 2\n";
    let (builder, resolved) = MeshConfig::from_toml_str(first_text)
        .unwrap()
        .node_builder()
        .unwrap();
    assert!(
        resolved.grpc_endpoint.is_none(),
        "ephemeral gRPC port: filled in at start"
    );
    let first = builder.start().await.unwrap();

    let mut second = MeshConfig::from_toml_str(first_text).unwrap();
    second.set("node_id", "cfg-1").unwrap();
    second
        .set("join_peers", &first.gossip_addr().to_string())
        .unwrap();
    let (builder, _) = second.node_builder().unwrap();
    let second = builder.start().await.unwrap();
    tokio::time::timeout(
        std::time::Duration::from_secs(30),
        first.membership().wait_until(|v| v.get("cfg-1").is_some()),
    )
    .await
    .unwrap();
    assert_eq!(
        second.view().local().identity().addr(),
        second.gossip_addr()
    );
    second.leave().await.unwrap();
    first.shutdown().await;
}

/// A CA and two certificates it signed, as PEM files: (ca, cert, key, another cert's key).
fn tls_files() -> [tempfile_path::TempFile; 4] {
    use rcgen::{BasicConstraints, CertificateParams, IsCa, Issuer, KeyPair};
    let mut ca_params = CertificateParams::new(Vec::<String>::new()).unwrap();
    ca_params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    let ca_key = KeyPair::generate().unwrap();
    let ca_pem = ca_params.self_signed(&ca_key).unwrap().pem();
    let issuer = Issuer::new(ca_params, ca_key);
    let leaf = || {
        let key = KeyPair::generate().unwrap();
        let cert = CertificateParams::new(vec!["127.0.0.1".to_owned()])
            .unwrap()
            .signed_by(&key, &issuer)
            .unwrap();
        (cert.pem(), key.serialize_pem())
    };
    let (cert, key) = leaf();
    let (_, other_key) = leaf();
    [
        file("pem", &ca_pem),
        file("pem", &cert),
        file("pem", &key),
        file("pem", &other_key),
    ]
}

#[test]
fn tls_keys_turn_tls_on_for_the_server_and_the_forwarding_channels() {
    let [ca, cert, key, _] = tls_files();
    let mut config =
        MeshConfig::from_toml_str("node_id = \"n\"\nbind_addr = \"127.0.0.1\"\n").unwrap();
    config
        .set("tls_cert_file", &cert.0.display().to_string())
        .unwrap();
    config
        .set("tls_key_file", &key.0.display().to_string())
        .unwrap();
    config
        .set("tls_ca_file", &ca.0.display().to_string())
        .unwrap();
    let resolved = config.resolve().unwrap();
    assert_eq!(
        resolved.grpc_endpoint.as_deref(),
        Some("https://127.0.0.1:50051")
    );
    let tls = resolved.tls.unwrap();
    assert!(tls.server.client_ca().is_none());
    assert!(tls.peers.client_identity().is_none());
    assert_eq!(tls.peers.domain_name(), None);

    config
        .apply_vars([
            ("MESH_TLS_CLIENT_AUTH".to_owned(), "true".to_owned()),
            ("MESH_TLS_DOMAIN".to_owned(), "mesh.build.svc".to_owned()),
        ])
        .unwrap();
    let tls = config.resolve().unwrap().tls.unwrap();
    assert!(
        tls.server.client_ca().is_some(),
        "client certificates required"
    );
    assert!(tls.peers.client_identity().is_some(), "and presented");
    assert_eq!(tls.peers.domain_name().as_deref(), Some("mesh.build.svc"));

    let error = config
        .apply_vars([("MESH_TLS_CLIENT_AUTH".to_owned(), "maybe".to_owned())])
        .unwrap_err();
    assert_eq!(
        error.to_string(),
        "invalid MESH_TLS_CLIENT_AUTH \"maybe\": must be true or false"
    );
}

#[test]
fn bad_tls_settings_are_named_by_their_key() {
    let [ca, cert, key, other_key] = tls_files();
    let path = |f: &tempfile_path::TempFile| f.0.display().to_string();
    let no_files = [
        ("tls_cert_file", String::new()),
        ("tls_key_file", String::new()),
        ("tls_ca_file", String::new()),
    ];
    // (keys to change, the key the error names, part of its rule)
    type Case = (Vec<(&'static str, String)>, &'static str, String);
    let cases: Vec<Case> = vec![
        (
            vec![("tls_key_file", path(&other_key))],
            "tls_key_file",
            format!(
                "it does not belong to the certificate in file {}",
                path(&cert)
            ),
        ),
        (
            vec![("tls_ca_file", "/nonexistent/ca.pem".to_owned())],
            "tls_ca_file",
            "cannot be read: ".to_owned(),
        ),
        (
            vec![("tls_cert_file", path(&key))],
            "tls_cert_file",
            "no PEM certificate found".to_owned(),
        ),
        (
            vec![("tls_key_file", String::new())],
            "tls_key_file",
            "is required when any of tls_cert_file, tls_key_file and tls_ca_file is set".to_owned(),
        ),
        (
            vec![("tls_domain", "not a name".to_owned())],
            "tls_domain",
            "must be a DNS name or an IP address".to_owned(),
        ),
        (
            [
                no_files.to_vec(),
                vec![("tls_client_auth", "true".to_owned())],
            ]
            .concat(),
            "tls_client_auth",
            "needs tls_cert_file, tls_key_file and tls_ca_file".to_owned(),
        ),
        (
            [
                no_files.to_vec(),
                vec![("tls_domain", "mesh.svc".to_owned())],
            ]
            .concat(),
            "tls_domain",
            "needs tls_cert_file, tls_key_file and tls_ca_file".to_owned(),
        ),
    ];
    for (changes, expected, rule) in cases {
        let mut config =
            MeshConfig::from_toml_str("node_id = \"n\"\nbind_addr = \"127.0.0.1\"\n").unwrap();
        config.set("tls_cert_file", &path(&cert)).unwrap();
        config.set("tls_key_file", &path(&key)).unwrap();
        config.set("tls_ca_file", &path(&ca)).unwrap();
        for (name, value) in &changes {
            config.set(name, value).unwrap();
        }
        let error = config.resolve().unwrap_err();
        assert_eq!(invalid_key(&error), expected, "{error}");
        let message = error.to_string();
        assert!(
            message.starts_with(&format!("invalid {expected} ")),
            "{message}"
        );
        assert!(message.contains(&rule), "{message}");
    }
}

#[test]
fn gossip_keys_load_from_a_file_or_a_variable_and_errors_never_show_a_key() {
    let key = "AQEBAQEBAQEBAQEBAQEBAQEBAQEBAQEBAQEBAQEBAQE=";
    let keys = file("keys", &format!("# primary\n{key}\n"));
    let mut config =
        MeshConfig::from_toml_str("node_id = \"n\"\nbind_addr = \"127.0.0.1\"").unwrap();
    config
        .set("gossip_keys_file", &keys.0.display().to_string())
        .unwrap();
    config.set("cluster_label", "prod").unwrap();
    let resolved = config.resolve().unwrap();
    assert_eq!(resolved.keyring.unwrap().keys().len(), 1);

    let bad = file("keys", "not-a-key-at-all\n");
    config
        .set("gossip_keys_file", &bad.0.display().to_string())
        .unwrap();
    let error = config.resolve().unwrap_err().to_string();
    assert!(error.starts_with("invalid gossip_keys_file"), "{error}");
    assert!(error.contains("line 1"), "{error}");
    assert!(
        !error.contains("not-a-key-at-all"),
        "never echo key material: {error}"
    );

    config.set("gossip_keys_env", "SOME_VAR").unwrap();
    let error = config.resolve().unwrap_err();
    assert_eq!(invalid_key(&error), "gossip_keys_env");
    assert!(
        error
            .to_string()
            .contains("not be set together with gossip_keys_file")
    );

    let mut unkeyed = MeshConfig::from_toml_str(
        "node_id = \"n\"\nbind_addr = \"127.0.0.1\"\ncluster_label = \"prod\"",
    )
    .unwrap();
    let error = unkeyed.resolve().unwrap_err();
    assert_eq!(invalid_key(&error), "cluster_label");
    unkeyed
        .set("gossip_keys_env", "MESH_TEST_UNSET_VARIABLE_FOR_KEYS")
        .unwrap();
    let error = unkeyed.resolve().unwrap_err();
    assert_eq!(invalid_key(&error), "gossip_keys_env");
    assert!(
        error
            .to_string()
            .contains("MESH_TEST_UNSET_VARIABLE_FOR_KEYS"),
        "{error}"
    );
}

/// A value of the wrong type for a choice names the value and says a name is expected (TOML's
/// own words for it were "invalid type: unit variant, expected string only").
#[test]
fn a_number_given_for_a_choice_is_reported_with_its_value() {
    assert_eq!(
        MeshConfig::from_toml_str("timing = 5").unwrap_err(),
        "invalid type: integer `5`, expected the name of a choice\nin `timing`\n"
    );
    let error = MeshConfig::from_yaml_str("mesh:\n  strategy: [a]\n").unwrap_err();
    assert!(
        error.starts_with("mesh.strategy: invalid type: sequence, expected the name of a choice"),
        "{error}"
    );
    // Unknown names keep serde's list of the known ones, under their key.
    let error = MeshConfig::from_yaml_str("mesh:\n  timing: Lan\n").unwrap_err();
    assert!(
        error.starts_with(
            "mesh.timing: unknown variant `Lan`, expected one of `lan`, `wan`, `local`"
        ),
        "{error}"
    );
}
