//! Peer entries and DNS names come from configuration: every input is accepted exactly when it
//! follows the documented rule, and refused with an error that names it otherwise.
//!
//! The inputs are built from the valid alphabet (most of them valid), then some are nudged
//! just over a rule (an empty or 64-character label, a leading or trailing hyphen, one bad
//! character, a name one byte too long, a bad port), so both sides of every rule are reached.
//! The rules are written out here, independently of the code under test.

use std::{net::IpAddr, time::Duration};

use mesh_discovery::{DiscoveryError, Dns, Static};
use proptest::{prelude::*, strategy::ValueTree, test_runner::TestRunner};

/// A label of the valid alphabet, 1–63 characters, mostly short.
fn label() -> impl Strategy<Value = String> {
    prop_oneof![
        8 => "[A-Za-z0-9][A-Za-z0-9_-]{0,10}[A-Za-z0-9]",
        1 => "[A-Za-z0-9]",
        1 => "[A-Za-z0-9][A-Za-z0-9_-]{50,61}[A-Za-z0-9]",
    ]
}

/// One way to push a valid name just over a rule.
#[derive(Debug, Clone)]
enum Nudge {
    None,
    EmptyLabel(prop::sample::Index),
    LongLabel(prop::sample::Index),
    LeadingHyphen(prop::sample::Index),
    TrailingHyphen(prop::sample::Index),
    BadChar(prop::sample::Index, char),
    Pad(usize),
}

fn nudge() -> impl Strategy<Value = Nudge> {
    let at = any::<prop::sample::Index>;
    prop_oneof![
        6 => Just(Nudge::None),
        1 => at().prop_map(Nudge::EmptyLabel),
        1 => at().prop_map(Nudge::LongLabel),
        1 => at().prop_map(Nudge::LeadingHyphen),
        1 => at().prop_map(Nudge::TrailingHyphen),
        1 => (at(), prop::sample::select(vec![' ', '*', '@', ':', '/', 'é', '\t', '!']))
            .prop_map(|(i, c)| Nudge::BadChar(i, c)),
        2 => (248usize..262).prop_map(Nudge::Pad),
    ]
}

/// A host name: 1–5 labels, maybe a trailing dot, maybe nudged over a rule.
fn name() -> impl Strategy<Value = String> {
    (
        prop::collection::vec(label(), 1..=5),
        any::<bool>(),
        nudge(),
    )
        .prop_map(|(mut labels, fqdn, nudge)| {
            match nudge {
                Nudge::None => {}
                Nudge::EmptyLabel(i) => labels.insert(i.index(labels.len() + 1), String::new()),
                Nudge::LongLabel(i) => {
                    let i = i.index(labels.len());
                    labels[i] = "a".repeat(64);
                }
                Nudge::LeadingHyphen(i) => {
                    let i = i.index(labels.len());
                    labels[i].insert(0, '-');
                }
                Nudge::TrailingHyphen(i) => {
                    let i = i.index(labels.len());
                    labels[i].push('-');
                }
                Nudge::BadChar(i, c) => {
                    let i = i.index(labels.len());
                    let at = labels[i].len() / 2;
                    labels[i].insert(at, c);
                }
                Nudge::Pad(total) => {
                    // Labels appended until the name is `total` bytes long (around the limits).
                    let mut len = labels.join(".").len();
                    while len < total {
                        let next = (total - len - 1).clamp(1, 63);
                        labels.push("b".repeat(next));
                        len += next + 1;
                    }
                }
            }
            let mut name = labels.join(".");
            if fqdn {
                name.push('.');
            }
            name
        })
}

/// The host rule of static entries: RFC 1123 names relaxed to allow `_` (as Kubernetes names
/// do), an optional trailing dot, at most 253 characters; or an IP address.
fn is_host(host: &str) -> bool {
    if host.parse::<IpAddr>().is_ok() {
        return true;
    }
    let host = host.strip_suffix('.').unwrap_or(host);
    !host.is_empty()
        && host.len() <= 253
        && host.split('.').all(|label| {
            (1..=63).contains(&label.len())
                && !label.starts_with('-')
                && !label.ends_with('-')
                && label
                    .chars()
                    .all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_')
        })
}

/// A port field: `1`–`65535`, sometimes one of the near misses around it.
fn port() -> impl Strategy<Value = String> {
    prop_oneof![
        8 => (1u32..=65535).prop_map(|p| p.to_string()),
        1 => prop::sample::select(vec!["0", "65536", "", "http", "-1", "99999"])
            .prop_map(str::to_owned),
    ]
}

fn is_port(port: &str) -> bool {
    port.parse::<u16>().is_ok_and(|p| p != 0)
}

/// The structural limits of DNS (RFC 1035): labels of 1–63 bytes, at most 255 bytes on the
/// wire; and no whitespace or control characters in the text. Which other characters a
/// resolver takes is its business (hickory's is lenient); what matters here is that every host
/// name a static list accepts is a DNS name too, and that nothing over the limits is.
fn within_dns_limits(name: &str) -> bool {
    if name.chars().any(|c| c.is_whitespace() || c.is_control()) {
        return false;
    }
    let trimmed = name.strip_suffix('.').unwrap_or(name);
    let labels: Vec<&str> = trimmed.split('.').collect();
    let wire_len: usize = labels.iter().map(|l| l.len() + 1).sum::<usize>() + 1;
    !trimmed.is_empty() && labels.iter().all(|l| (1..=63).contains(&l.len())) && wire_len <= 255
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(2000))]

    #[test]
    fn a_static_entry_is_accepted_exactly_when_host_and_port_follow_the_rule(
        host in name(),
        port in port(),
    ) {
        let entry = format!("{host}:{port}");
        // Surrounding whitespace is ignored (documented).
        let host = host.trim_start();
        let valid = is_host(host) && !host.contains(':') && is_port(&port);
        match Static::new([entry.as_str()]) {
            Ok(_) => prop_assert!(valid, "{entry:?} was accepted"),
            Err(DiscoveryError::InvalidAddress { value, reason }) => {
                prop_assert!(!valid, "{entry:?} was refused: {reason}");
                prop_assert_eq!(value, entry, "the error names the entry as given");
            }
            Err(other) => prop_assert!(false, "{entry:?}: unexpected error {other}"),
        }
    }

    #[test]
    fn a_dns_name_builds_when_it_is_a_host_name_and_never_beyond_the_dns_limits(name in name()) {
        let built = Dns::builder(name.clone())
            .nameserver("127.0.0.1:53".parse().unwrap())
            .query_timeout(Duration::from_secs(1))
            .build();
        let host_name = is_host(&name) && name.parse::<IpAddr>().is_err();
        match built {
            Ok(dns) => {
                prop_assert!(within_dns_limits(&name), "{name:?} was accepted");
                prop_assert_eq!(dns.name(), name.as_str());
            }
            Err(DiscoveryError::InvalidConfig { name: named, reason, .. }) => {
                prop_assert!(!host_name, "the host name {name:?} was refused: {reason}");
                prop_assert_eq!(named, name);
            }
            Err(other) => prop_assert!(false, "{name:?}: unexpected error {other}"),
        }
    }
}

/// The generators reach both sides of every rule: a property that only ever saw valid (or
/// only invalid) input would pass whatever the code did.
#[test]
fn the_generators_produce_valid_names_and_every_kind_of_near_miss() {
    let mut runner = TestRunner::deterministic();
    let (mut hosts, mut not_hosts, mut within, mut beyond) = (0, 0, 0, 0);
    let (mut long_names, mut bad_ports) = (0, 0);
    for _ in 0..2000 {
        let host = name().new_tree(&mut runner).unwrap().current();
        let port = port().new_tree(&mut runner).unwrap().current();
        if is_host(&host) && !host.contains(':') {
            hosts += 1;
        } else {
            not_hosts += 1;
        }
        if within_dns_limits(&host) {
            within += 1;
        } else {
            beyond += 1;
        }
        if (252..=256).contains(&host.len()) {
            long_names += 1;
        }
        if !is_port(&port) {
            bad_ports += 1;
        }
    }
    for (what, count) in [
        ("valid hosts", hosts),
        ("invalid hosts", not_hosts),
        ("names within the dns limits", within),
        ("names beyond them", beyond),
        ("names at the length limits", long_names),
        ("bad ports", bad_ports),
    ] {
        assert!(count >= 50, "only {count} {what} in 2000");
    }
}
