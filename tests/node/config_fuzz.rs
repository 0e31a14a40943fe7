//! Configuration comes from files and the environment: every key, given a value of its own
//! type or a near miss, is accepted exactly when the documented rules allow it, and refused
//! with an error that names the key, the value and the rule.
//!
//! Values are typed (booleans, numbers in and out of range, strings, lists, tables,
//! durations, enum names) and written the way each source writes them: TOML literals, YAML
//! flow values, `MESH_*` variable text. Each key's type and rules are written out here,
//! independently of the code under test; `resolve` is checked against them too, so a value
//! that loads but is not usable (an address that is not one, a TLS file without its
//! companions, a label without keys) is refused under the right key.

use std::net::{IpAddr, SocketAddr};

use mesh::{ConfigError, MeshConfig};
use proptest::prelude::*;

/// Every key, from the one list that declares them.
const KEYS: &[&str] = MeshConfig::KEYS;

/// A key's type, as the documentation gives it.
#[derive(Debug, Clone, Copy, PartialEq)]
enum Type {
    Bool,
    Port,
    Count,
    Text,
    List,
    Tags,
    Duration,
    Choice(&'static [&'static str]),
}

fn type_of(key: &str) -> Type {
    match key {
        "enabled" | "dns_srv" | "tls_client_auth" => Type::Bool,
        "bind_port" | "advertise_port" | "grpc_port" => Type::Port,
        "max_concurrency" => Type::Count,
        "join_peers" => Type::List,
        "tags" => Type::Tags,
        "discovery_interval" => Type::Duration,
        "discovery_mode" => Type::Choice(&["list", "dns"]),
        "timing" => Type::Choice(&["lan", "wan", "local"]),
        "strategy" => Type::Choice(&[
            "least-loaded",
            "power-of-two",
            "round-robin",
            "random",
            "weighted",
            "affinity",
        ]),
        "when_full" => Type::Choice(&["run-locally", "wait"]),
        "node_id"
        | "bind_addr"
        | "advertise_addr"
        | "dns_service_name"
        | "dns_nameserver"
        | "grpc_advertise_addr"
        | "tls_cert_file"
        | "tls_key_file"
        | "tls_ca_file"
        | "tls_domain"
        | "gossip_keys_file"
        | "gossip_keys_env"
        | "cluster_label" => Type::Text,
        other => panic!("the new key {other} needs a type and rules in this test"),
    }
}

/// A value as a configuration source holds it.
#[derive(Debug, Clone, PartialEq)]
enum Value {
    Bool(bool),
    Int(i64),
    Float(f64),
    Text(String),
    List(Vec<Value>),
    Table(Vec<(String, Value)>),
}

/// A double-quoted string, valid in TOML and in YAML.
fn quoted(text: &str) -> String {
    let mut out = String::from("\"");
    for c in text.chars() {
        match c {
            '"' => out.push_str("\\\""),
            '\\' => out.push_str("\\\\"),
            c if c.is_control() => out.push_str(&format!("\\u{:04X}", u32::from(c))),
            c => out.push(c),
        }
    }
    out.push('"');
    out
}

impl Value {
    fn is_scalar(&self) -> bool {
        !matches!(self, Value::List(_) | Value::Table(_))
    }

    /// A TOML literal; a YAML flow value (`yaml`) differs only in how tables are written.
    fn literal(&self, yaml: bool) -> String {
        match self {
            Value::Bool(b) => b.to_string(),
            Value::Int(i) => i.to_string(),
            Value::Float(f) => format!("{f:?}"),
            Value::Text(t) => quoted(t),
            Value::List(items) => {
                let items: Vec<String> = items.iter().map(|v| v.literal(yaml)).collect();
                format!("[{}]", items.join(", "))
            }
            Value::Table(entries) => {
                let separator = if yaml { ": " } else { " = " };
                let entries: Vec<String> = entries
                    .iter()
                    .map(|(k, v)| format!("{}{separator}{}", quoted(k), v.literal(yaml)))
                    .collect();
                format!("{{ {} }}", entries.join(", "))
            }
        }
    }

    /// The text of a `MESH_*` variable: lists comma-separated, tables as `k=v,k=v`.
    fn env(&self) -> String {
        match self {
            Value::Bool(b) => b.to_string(),
            Value::Int(i) => i.to_string(),
            Value::Float(f) => format!("{f:?}"),
            Value::Text(t) => t.clone(),
            Value::List(items) => items.iter().map(Value::env).collect::<Vec<_>>().join(","),
            Value::Table(entries) => entries
                .iter()
                .map(|(k, v)| format!("{k}={}", v.env()))
                .collect::<Vec<_>>()
                .join(","),
        }
    }
}

fn is_duration(text: &str) -> bool {
    humantime::parse_duration(text).is_ok()
}

/// Whether a TOML file may hold `value` under a key of type `ty`.
fn toml_accepts(ty: Type, value: &Value) -> bool {
    match (ty, value) {
        (Type::Bool, Value::Bool(_)) | (Type::Text, Value::Text(_)) => true,
        (Type::Port, Value::Int(i)) => (0..=i64::from(u16::MAX)).contains(i),
        (Type::Count, Value::Int(i)) => (0..=i64::from(u32::MAX)).contains(i),
        (Type::List, Value::List(items)) => items.iter().all(|v| matches!(v, Value::Text(_))),
        (Type::Tags, Value::Table(entries)) => {
            entries.iter().all(|(_, v)| matches!(v, Value::Text(_)))
        }
        (Type::Duration, Value::Text(t)) => is_duration(t),
        (Type::Choice(names), Value::Text(t)) => names.contains(&t.as_str()),
        _ => false,
    }
}

/// Whether a YAML file may: like TOML, except that a plain scalar (a number, a boolean) is a
/// string wherever a string is expected.
fn yaml_accepts(ty: Type, value: &Value) -> bool {
    match (ty, value) {
        (Type::Text, v) => v.is_scalar(),
        (Type::List, Value::List(items)) => items.iter().all(Value::is_scalar),
        (Type::Tags, Value::Table(entries)) => entries.iter().all(|(_, v)| v.is_scalar()),
        (Type::Duration, v) => v.is_scalar() && is_duration(&v.env()),
        (Type::Choice(names), v) => v.is_scalar() && names.contains(&v.env().as_str()),
        _ => toml_accepts(ty, value),
    }
}

/// Whether a `MESH_*` variable may hold `text`, and if not, words of the rule its error gives.
fn env_rule(ty: Type, text: &str) -> Result<(), String> {
    let trimmed = text.trim();
    let ok = match ty {
        Type::Bool => trimmed.parse::<bool>().is_ok(),
        Type::Port => trimmed.parse::<u16>().is_ok(),
        Type::Count => trimmed.parse::<u32>().is_ok(),
        Type::Text | Type::List => true,
        Type::Tags => text
            .split(',')
            .map(str::trim)
            .filter(|item| !item.is_empty())
            .all(|item| item.contains('=')),
        Type::Duration => is_duration(trimmed),
        Type::Choice(names) => names.contains(&trimmed),
    };
    if ok {
        return Ok(());
    }
    Err(match ty {
        Type::Bool => "must be true or false".to_owned(),
        Type::Port => "must be a port number (0-65535)".to_owned(),
        Type::Count => "must be a whole number".to_owned(),
        Type::Tags => "must be key=value".to_owned(),
        Type::Duration => "must be a positive duration".to_owned(),
        Type::Choice(names) => names[0].to_owned(),
        Type::Text | Type::List => unreachable!("always accepted"),
    })
}

fn is_host_port(value: &str) -> bool {
    value
        .rsplit_once(':')
        .is_some_and(|(host, port)| !host.is_empty() && port.parse::<u16>().is_ok())
}

/// What `resolve` says of a configuration that is the defaults, node id `n` and bind address
/// 127.0.0.1, plus `key` set to `config`'s value: `Ok`, or the key its error names. `None`
/// when the answer depends on the machine (an empty node id means the hostname; binding to an
/// unspecified address makes the node advertise the address of its default route, if any).
fn resolve_rule(key: &str, config: &MeshConfig) -> Option<Result<(), &'static str>> {
    let fails = |key: &'static str, broken: bool| Some(if broken { Err(key) } else { Ok(()) });
    let ip = |text: &str| text.parse::<IpAddr>();
    match key {
        // Empty means the machine's hostname.
        "node_id" if config.node_id.is_empty() => None,
        "node_id" => fails("node_id", mesh::NodeId::new(&config.node_id).is_err()),
        "bind_addr" => match ip(&config.bind_addr) {
            Ok(addr) if addr.is_unspecified() => None,
            Ok(_) => Some(Ok(())),
            Err(_) => Some(Err("bind_addr")),
        },
        "advertise_addr" => fails(
            "advertise_addr",
            !config.advertise_addr.is_empty()
                && ip(&config.advertise_addr).map_or(true, |a| a.is_unspecified()),
        ),
        "join_peers" => fails(
            "join_peers",
            !config.join_peers.iter().all(|p| is_host_port(p)),
        ),
        "discovery_mode" => fails(
            "dns_service_name",
            config.discovery_mode == mesh::DiscoveryMode::Dns,
        ),
        "dns_nameserver" => fails(
            "dns_nameserver",
            !config.dns_nameserver.is_empty()
                && config.dns_nameserver.parse::<SocketAddr>().is_err(),
        ),
        "discovery_interval" => fails("discovery_interval", config.discovery_interval.is_zero()),
        "grpc_advertise_addr" => fails(
            "grpc_advertise_addr",
            !config.grpc_advertise_addr.is_empty() && !is_host_port(&config.grpc_advertise_addr),
        ),
        // One TLS file alone: the first missing companion is named (cert, key, ca).
        "tls_cert_file" => fails("tls_key_file", !config.tls_cert_file.trim().is_empty()),
        "tls_key_file" => fails("tls_cert_file", !config.tls_key_file.trim().is_empty()),
        "tls_ca_file" => fails("tls_cert_file", !config.tls_ca_file.trim().is_empty()),
        "tls_client_auth" => fails("tls_client_auth", config.tls_client_auth),
        "tls_domain" => fails("tls_domain", !config.tls_domain.trim().is_empty()),
        // No generated file or variable holds keys.
        "gossip_keys_file" => fails("gossip_keys_file", !config.gossip_keys_file.is_empty()),
        "gossip_keys_env" => fails("gossip_keys_env", !config.gossip_keys_env.is_empty()),
        "cluster_label" => fails("cluster_label", !config.cluster_label.is_empty()),
        _ => Some(Ok(())),
    }
}

fn any_text() -> impl Strategy<Value = String> {
    "[a-zA-Z0-9 .:/_-]{0,12}"
}

/// Strings that matter for `key`: valid ones and the near misses around its rule.
fn text_for(key: &str) -> BoxedStrategy<String> {
    let pick = |values: &[&str]| {
        let values: Vec<String> = values.iter().map(|v| (*v).to_owned()).collect();
        prop::sample::select(values).boxed()
    };
    let domain = match key {
        "node_id" => prop_oneof!["[A-Za-z0-9._-]{1,63}", "[A-Za-z0-9._:@ -]{0,64}"].boxed(),
        "bind_addr" | "advertise_addr" => pick(&[
            "127.0.0.1",
            "10.1.2.3",
            "::1",
            "0.0.0.0",
            "::",
            "",
            "localhost",
            "300.1.1.1",
            "10.0.0.1:80",
        ]),
        "dns_nameserver" => pick(&[
            "",
            "127.0.0.1:53",
            "[::1]:53",
            "127.0.0.1",
            "dns:53",
            "127.0.0.1:99999",
        ]),
        "grpc_advertise_addr" => pick(&[
            "",
            "node-1:50051",
            "10.0.0.1:50051",
            "node-1",
            ":50051",
            "node-1:http",
        ]),
        "tls_cert_file" | "tls_key_file" | "tls_ca_file" => {
            pick(&["", " ", "/nonexistent/tls.pem", "tls.key"])
        }
        "tls_domain" => pick(&["", " ", "mesh.test", "10.0.0.1", "bad domain"]),
        "gossip_keys_file" => pick(&["", "/nonexistent/gossip.keys"]),
        "gossip_keys_env" => pick(&["", "MESH_TEST_NO_SUCH_VARIABLE"]),
        "cluster_label" => prop_oneof![pick(&["", "prod"]), "x{250,260}"].boxed(),
        "dns_service_name" => pick(&["", "mesh.build.svc.cluster.local."]),
        _ => any_text().boxed(),
    };
    prop_oneof![4 => domain, 1 => any_text()].boxed()
}

fn peer() -> impl Strategy<Value = String> {
    prop::sample::select(vec![
        "10.0.0.1:7946",
        "node-1:7946",
        "[::1]:7946",
        "node-1",
        ":7946",
        "node:x",
    ])
    .prop_map(str::to_owned)
}

/// A value of `key`'s type, or a near miss: out of range, the wrong type, a bad spelling.
fn value_for(key: &'static str) -> BoxedStrategy<Value> {
    let text = |s: &str| Value::Text(s.to_owned());
    let wrong_type = prop_oneof![
        any::<bool>().prop_map(Value::Bool),
        (-3i64..100).prop_map(Value::Int),
        Just(Value::Float(1.5)),
        any_text().prop_map(Value::Text),
        Just(Value::List(vec![Value::Text("a".to_owned())])),
        Just(Value::Table(vec![(
            "a".to_owned(),
            Value::Text("b".to_owned())
        )])),
    ];
    // Each type's valid values, then its near misses.
    let (valid, near): (BoxedStrategy<Value>, BoxedStrategy<Value>) = match type_of(key) {
        Type::Bool => (
            any::<bool>().prop_map(Value::Bool).boxed(),
            prop::sample::select(vec!["true", "false", "yes", "1", " true "])
                .prop_map(text)
                .boxed(),
        ),
        Type::Port => (
            (0i64..=65535).prop_map(Value::Int).boxed(),
            prop_oneof![
                (65536i64..70000).prop_map(Value::Int),
                Just(Value::Int(-1)),
                prop::sample::select(vec!["7946", "70000", "http"]).prop_map(text),
            ]
            .boxed(),
        ),
        Type::Count => (
            prop_oneof![
                (0i64..=64).prop_map(Value::Int),
                Just(Value::Int(i64::from(u32::MAX)))
            ]
            .boxed(),
            prop_oneof![
                Just(Value::Int(i64::from(u32::MAX) + 1)),
                Just(Value::Int(-1)),
                prop::sample::select(vec!["16", "-1", "lots"]).prop_map(text),
            ]
            .boxed(),
        ),
        Type::Text => (
            text_for(key).prop_map(Value::Text).boxed(),
            prop_oneof![
                Just(Value::List(vec![Value::Text("a".to_owned())])),
                (0i64..100).prop_map(Value::Int),
            ]
            .boxed(),
        ),
        Type::List => (
            prop::collection::vec(peer().prop_map(Value::Text), 0..3)
                .prop_map(Value::List)
                .boxed(),
            prop_oneof![
                Just(Value::List(vec![Value::Int(7946)])),
                peer().prop_map(Value::Text),
            ]
            .boxed(),
        ),
        Type::Tags => (
            // Distinct keys: a file with a key twice is not a table.
            prop::collection::btree_map("[a-z]{1,5}", "[a-z0-9_]{0,5}", 0..3)
                .prop_map(|pairs| {
                    Value::Table(
                        pairs
                            .into_iter()
                            .map(|(k, v)| (k, Value::Text(v)))
                            .collect(),
                    )
                })
                .boxed(),
            prop_oneof![
                Just(Value::Table(vec![("cores".to_owned(), Value::Int(8))])),
                Just(Value::List(vec![Value::Text("os".to_owned())])),
                Just(text("os")),
            ]
            .boxed(),
        ),
        Type::Duration => (
            prop_oneof![
                (0u32..1000, prop::sample::select(vec!["ms", "s", "m", "h"]))
                    .prop_map(|(n, unit)| Value::Text(format!("{n}{unit}"))),
                Just(text("1m 30s")),
            ]
            .boxed(),
            prop_oneof![
                prop::sample::select(vec!["30", "-1s", "10 parsecs", ""]).prop_map(text),
                (1i64..100).prop_map(Value::Int),
            ]
            .boxed(),
        ),
        Type::Choice(names) => (
            prop::sample::select(names.to_vec()).prop_map(text).boxed(),
            prop_oneof![
                prop::sample::select(names.to_vec()).prop_map(|n| Value::Text(n.to_uppercase())),
                Just(text("fastest")),
            ]
            .boxed(),
        ),
    };
    prop_oneof![5 => valid, 2 => near, 1 => wrong_type].boxed()
}

fn key_and_value() -> impl Strategy<Value = (&'static str, Value)> {
    prop::sample::select(KEYS.to_vec()).prop_flat_map(|key| (Just(key), value_for(key)))
}

/// A file-loading error names the key, the rule, and a scalar value.
fn check_file_error(
    source: &str,
    key: &str,
    value: &Value,
    message: &str,
) -> Result<(), TestCaseError> {
    prop_assert!(
        message.contains(key),
        "{source}: {message:?} does not name {key}"
    );
    prop_assert!(
        message.contains("expected") || message.contains("unknown variant"),
        "{source}: {message:?} gives no rule"
    );
    if let Value::Int(i) = value {
        // As a number, or (YAML, which read it as text first) as a string.
        prop_assert!(
            message.contains(&format!("`{i}`")) || message.contains(&format!("\"{i}\"")),
            "{source}: {message:?} does not name {i}"
        );
    }
    Ok(())
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(3000))]

    #[test]
    fn every_key_loads_exactly_the_values_its_rules_allow((key, value) in key_and_value()) {
        let ty = type_of(key);

        let toml = format!("{key} = {}\n", value.literal(false));
        match MeshConfig::from_toml_str(&toml) {
            Ok(_) => prop_assert!(toml_accepts(ty, &value), "TOML {toml:?} was accepted"),
            Err(message) => {
                prop_assert!(!toml_accepts(ty, &value), "TOML {toml:?} was refused: {message}");
                check_file_error("TOML", key, &value, &message)?;
            }
        }

        let yaml = format!("mesh:\n  {key}: {}\n", value.literal(true));
        match MeshConfig::from_yaml_str(&yaml) {
            Ok(_) => prop_assert!(yaml_accepts(ty, &value), "YAML {yaml:?} was accepted"),
            Err(message) => {
                prop_assert!(!yaml_accepts(ty, &value), "YAML {yaml:?} was refused: {message}");
                check_file_error("YAML", key, &value, &message)?;
            }
        }

        let mut config = MeshConfig::default();
        config.set("node_id", "n").unwrap();
        config.set("bind_addr", "127.0.0.1").unwrap();
        let var = format!("MESH_{}", key.to_ascii_uppercase());
        let text = value.env();
        match (config.apply_vars([(var.clone(), text.clone())]), env_rule(ty, &text)) {
            (Ok(()), Ok(())) => {}
            (Err(error), Err(rule)) => {
                let message = error.to_string();
                let named = format!("invalid {var} {:?}: ", mesh::core::abbreviate(&text));
                prop_assert!(message.starts_with(&named), "{message:?} should start {named:?}");
                prop_assert!(message.contains(&rule), "{message:?} should say {rule:?}");
                return Ok(());
            }
            (Ok(()), Err(rule)) => prop_assert!(false, "{var}={text:?} was accepted ({rule})"),
            (Err(error), Ok(())) => prop_assert!(false, "{var}={text:?} was refused: {error}"),
        }

        // A file and a variable with the same scalar value give the same configuration.
        if value.is_scalar() && toml_accepts(ty, &value) {
            let mut from_file = MeshConfig::from_toml_str(&toml).unwrap();
            for (base, base_value) in [("node_id", "n"), ("bind_addr", "127.0.0.1")] {
                if key != base {
                    from_file.set(base, base_value).unwrap();
                }
            }
            prop_assert_eq!(&from_file, &config);
        }

        // Loaded is not yet usable: `resolve` checks the rest, under the key at fault.
        let resolved = config.resolve();
        if let Some(rule) = resolve_rule(key, &config) {
            match (resolved, rule) {
                (Ok(_), Ok(())) => {}
                (Err(ConfigError::Invalid { key: named, value, rule: why }), Err(expected)) => {
                    prop_assert_eq!(named.as_str(), expected, "{}={:?}: {}", key, text, why);
                    prop_assert!(!why.is_empty());
                    let message = ConfigError::Invalid { key: named, value: value.clone(), rule: why.clone() }.to_string();
                    prop_assert_eq!(message, format!("invalid {expected} {value:?}: {why}"));
                }
                (Ok(_), Err(expected)) => prop_assert!(false, "{key}={text:?} resolved; expected an error about {expected}"),
                (Err(error), _) => prop_assert!(false, "{key}={text:?}: {error}"),
            }
        }
    }

    #[test]
    fn any_environment_text_is_applied_or_rejected_naming_the_variable(
        key in prop::sample::select(KEYS.to_vec()),
        value in "\\PC{0,60}",
    ) {
        let mut config = MeshConfig::default();
        let var = format!("MESH_{}", key.to_ascii_uppercase());
        match config.apply_vars([(var.clone(), value)]) {
            Ok(()) => { let _ = config.resolve(); }
            Err(error) => prop_assert!(error.to_string().contains(&var)),
        }
    }

    #[test]
    fn toml_and_yaml_loaders_never_panic(text in "\\PC{0,400}") {
        let _ = MeshConfig::from_toml_str(&text);
        let _ = MeshConfig::from_yaml_str(&text);
    }
}

/// Every key has a type here, and the generator reaches every key with accepted and refused
/// values alike.
#[test]
fn every_key_is_generated_with_valid_values_and_near_misses() {
    use proptest::{strategy::ValueTree, test_runner::TestRunner};
    assert_eq!(KEYS.len(), 27);
    let mut runner = TestRunner::deterministic();
    for &key in KEYS {
        let (mut accepted, mut refused) = (0, 0);
        for _ in 0..200 {
            let value = value_for(key).new_tree(&mut runner).unwrap().current();
            if toml_accepts(type_of(key), &value) {
                accepted += 1;
            } else {
                refused += 1;
            }
        }
        assert!(
            accepted >= 40 && refused >= 20,
            "{key}: {accepted} accepted, {refused} refused of 200"
        );
    }
}
