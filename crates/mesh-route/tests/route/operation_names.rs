//! Operation names come from clients: the parser accepts exactly the names of the documented
//! form, `{node_id}:{uuid}` after an optional path prefix, and answers everything else with
//! an error naming the expected form, never a panic.
//!
//! The generator builds valid names (node ids of either case, UUIDs of either case, with and
//! without prefixes) and nudges some just over a rule (no separator, an empty or 64-character
//! node id, a bad character, a UUID one character short or long, without hyphens, braced, as
//! a URN, a non-hex digit), besides arbitrary text. The rule is written out here, independently
//! of the parser.

use mesh_core::NodeId;
use mesh_route::OperationId;
use proptest::{prelude::*, strategy::ValueTree, test_runner::TestRunner};

/// A node id: 1–63 characters of `[A-Za-z0-9._-]`, mostly short.
fn node_id() -> impl Strategy<Value = String> {
    prop_oneof![
        6 => "[A-Za-z0-9._-]{1,12}",
        1 => "[A-Z]{1,8}",
        1 => "[A-Za-z0-9._-]{60,63}",
    ]
}

/// A hyphenated UUID, each hex digit in either case.
fn uuid_text() -> impl Strategy<Value = String> {
    (any::<u128>(), any::<u32>(), any::<bool>()).prop_map(|(id, case_mask, upper)| {
        let text = uuid::Uuid::from_u128(id).hyphenated().to_string();
        text.chars()
            .enumerate()
            .map(|(i, c)| {
                if upper || case_mask & (1 << (i % 32)) != 0 {
                    c.to_ascii_uppercase()
                } else {
                    c
                }
            })
            .collect()
    })
}

/// A path prefix: nothing, the REAPI ones, or segments of any text but `/`.
fn prefix() -> impl Strategy<Value = String> {
    prop_oneof![
        3 => Just(String::new()),
        2 => Just("operations/".to_owned()),
        2 => "[a-z0-9-]{1,10}/operations/",
        2 => "([^/]{0,10}/){1,3}",
    ]
}

/// One way to push a valid name just over a rule.
#[derive(Debug, Clone)]
enum Nudge {
    None,
    NoSeparator,
    EmptyNode,
    LongNode,
    BadNodeChar(char),
    UuidShort,
    UuidLong,
    UuidSimple,
    UuidBraced,
    UuidUrn,
    NonHex(prop::sample::Index),
    TrailingSlash,
}

fn nudge() -> impl Strategy<Value = Nudge> {
    prop_oneof![
        10 => Just(Nudge::None),
        1 => Just(Nudge::NoSeparator),
        1 => Just(Nudge::EmptyNode),
        1 => Just(Nudge::LongNode),
        1 => prop::sample::select(vec![' ', '@', ':', '*', 'é', '+']).prop_map(Nudge::BadNodeChar),
        1 => Just(Nudge::UuidShort),
        1 => Just(Nudge::UuidLong),
        1 => Just(Nudge::UuidSimple),
        1 => Just(Nudge::UuidBraced),
        1 => Just(Nudge::UuidUrn),
        1 => any::<prop::sample::Index>().prop_map(Nudge::NonHex),
        1 => Just(Nudge::TrailingSlash),
    ]
}

/// Names of the documented form, some nudged over a rule.
fn name() -> impl Strategy<Value = String> {
    (prefix(), node_id(), uuid_text(), nudge()).prop_map(|(prefix, mut node, mut id, nudge)| {
        let mut separator = ":";
        let mut suffix = "";
        match nudge {
            Nudge::None => {}
            Nudge::NoSeparator => separator = "",
            Nudge::EmptyNode => node.clear(),
            Nudge::LongNode => node = "n".repeat(64),
            Nudge::BadNodeChar(c) => node.insert(node.len() / 2, c),
            Nudge::UuidShort => {
                id.pop();
            }
            Nudge::UuidLong => id.push('0'),
            Nudge::UuidSimple => id.retain(|c| c != '-'),
            Nudge::UuidBraced => id = format!("{{{id}}}"),
            Nudge::UuidUrn => id = format!("urn:uuid:{id}"),
            Nudge::NonHex(at) => {
                let hex: Vec<usize> = id
                    .char_indices()
                    .filter(|(_, c)| *c != '-')
                    .map(|(i, _)| i)
                    .collect();
                let i = hex[at.index(hex.len())];
                id.replace_range(i..=i, "g");
            }
            Nudge::TrailingSlash => suffix = "/",
        }
        format!("{prefix}{node}{separator}{id}{suffix}")
    })
}

/// The documented rule, written out: the last `/`-separated segment is `{node}:{uuid}`, the
/// node a DNS label of `[A-Za-z0-9._-]`, the UUID hyphenated (8-4-4-4-12 hex digits, either
/// case). Returns how the parsed id displays: the node as given, the UUID in lowercase.
fn expected(name: &str) -> Option<String> {
    let last = name.rsplit('/').next()?;
    let (node, id) = last.split_once(':')?;
    let node_ok = (1..=63).contains(&node.len())
        && node
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-'));
    let id_ok = id.len() == 36
        && id.chars().enumerate().all(|(i, c)| match i {
            8 | 13 | 18 | 23 => c == '-',
            _ => c.is_ascii_hexdigit(),
        });
    (node_ok && id_ok).then(|| format!("{node}:{}", id.to_ascii_lowercase()))
}

fn check(name: &str) -> Result<(), TestCaseError> {
    match (name.parse::<OperationId>(), expected(name)) {
        (Ok(id), Some(display)) => {
            prop_assert_eq!(id.to_string(), display);
            // The owner is the node id exactly as written: ids are case-sensitive.
            let last = name.rsplit('/').next().unwrap();
            prop_assert_eq!(id.node().as_str(), last.split_once(':').unwrap().0);
        }
        (Err(error), None) => {
            let message = error.to_string();
            prop_assert!(
                message.contains("expected \"{node_id}:{uuid}\""),
                "{}",
                message
            );
            prop_assert!(message.len() < 800);
        }
        (Ok(id), None) => prop_assert!(false, "{name:?} was accepted as {id}"),
        (Err(error), Some(_)) => prop_assert!(false, "{name:?} was refused: {error}"),
    }
    Ok(())
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(3000))]

    #[test]
    fn names_of_the_form_parse_and_near_misses_are_refused(name in name()) {
        check(&name)?;
    }

    #[test]
    fn any_text_parses_exactly_when_it_follows_the_form(name in "\\PC{0,300}") {
        check(&name)?;
    }

    #[test]
    fn every_valid_id_roundtrips_behind_any_prefix(
        node in "[A-Za-z0-9._-]{1,63}",
        id in any::<u128>(),
        prefix in "([a-z0-9-]{0,12}/){0,4}",
    ) {
        let original = OperationId::from_parts(NodeId::new(&node).unwrap(), uuid::Uuid::from_u128(id));
        let parsed: OperationId = original.with_prefix(&prefix).parse().unwrap();
        prop_assert_eq!(parsed, original);
    }
}

/// The generator reaches both branches, and the cases the old test never produced: valid
/// names with uppercase node ids and behind prefixes.
#[test]
fn the_generator_produces_valid_names_and_near_misses() {
    let mut runner = TestRunner::deterministic();
    let (mut valid, mut invalid, mut uppercase, mut prefixed) = (0, 0, 0, 0);
    for _ in 0..3000 {
        let name = name().new_tree(&mut runner).unwrap().current();
        match expected(&name) {
            Some(display) => {
                valid += 1;
                if display.chars().any(|c| c.is_ascii_uppercase()) {
                    uppercase += 1;
                }
                if name.contains('/') {
                    prefixed += 1;
                }
            }
            None => invalid += 1,
        }
    }
    for (what, count) in [
        ("valid names", valid),
        ("near misses", invalid),
        ("valid names with uppercase node ids", uppercase),
        ("valid names behind a prefix", prefixed),
    ] {
        assert!(count >= 300, "only {count} {what} in 3000");
    }
}
