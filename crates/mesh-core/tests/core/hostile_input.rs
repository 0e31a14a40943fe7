//! Whatever arrives from the network, the decoders answer with a value or an error: never a
//! panic, never more memory than the input justifies, and exactly the answer the documented
//! rules give.
//!
//! Random bytes almost never get past the envelope's magic (one datagram in 65 536), so the
//! datagram generator builds what an attacker or a confused peer would send: valid headers with
//! random bodies (some over the size budget), headers cut short, other versions, unknown kinds;
//! random bytes are only one case among them. Node ids likewise come from the valid alphabet,
//! with near misses (empty, 64 characters, one bad character). The rules are written out here,
//! independently of the code under test.

use mesh_core::{
    Identity, Keyring, MAX_STATE_SIZE, NodeId, NodeState, SecretKey,
    wire::{self, Envelope, Kind},
};
use proptest::{prelude::*, strategy::ValueTree, test_runner::TestRunner};

fn valid_state() -> NodeState {
    let mut state = NodeState::new(NodeId::new("node-1").unwrap(), 1_700_000_000, 42);
    state.grpc_endpoint = Some("http://10.0.0.1:50051".into());
    state.pending = 3;
    state.max_concurrency = 8;
    state.tags.insert("os".into(), "linux".into());
    state.tags.insert("pool".into(), "gpu".into());
    state
}

/// The node-id rule, written independently of the implementation.
fn is_dns_label(text: &str) -> bool {
    (1..=63).contains(&text.len())
        && text
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || c == '.' || c == '_' || c == '-')
}

/// The highest kind byte this build knows: 1 foca, 2 state push, 3 leave, 4 lifeguard.
const LAST_KIND: u8 = 4;

/// A body of `0..max` random bytes.
fn body(max: usize) -> impl Strategy<Value = Vec<u8>> {
    proptest::collection::vec(any::<u8>(), 0..max)
}

/// A kind byte this build knows (foca, state push, leave, lifeguard), with the encrypted bit or
/// not.
fn known_kind() -> impl Strategy<Value = u8> {
    (1u8..=LAST_KIND, any::<bool>())
        .prop_map(|(kind, encrypted)| kind | if encrypted { 0x80 } else { 0 })
}

/// Datagrams that reach each check of the envelope, most of them past the magic.
fn datagram() -> impl Strategy<Value = Vec<u8>> {
    let with_header = |version: u8, kind: u8, body: Vec<u8>| {
        let mut datagram = vec![b'm', b's', version, kind];
        datagram.extend(body);
        datagram
    };
    prop_oneof![
        // A valid header and a random body, some over the 1400-byte budget.
        5 => (known_kind(), body(1500)).prop_map(move |(kind, body)| with_header(1, kind, body)),
        // A valid header cut short.
        1 => (known_kind(), 0usize..4).prop_map(move |(kind, len)| {
            with_header(1, kind, Vec::new())[..len].to_vec()
        }),
        // Another envelope version.
        1 => (any::<u8>().prop_filter("another version", |v| *v != 1), known_kind(), body(64))
            .prop_map(move |(version, kind, body)| with_header(version, kind, body)),
        // A kind this build does not know, with or without the encrypted bit.
        1 => (any::<u8>().prop_filter("an unknown kind", |k| !(1..=LAST_KIND).contains(&(k & 0x7f))), body(64))
            .prop_map(move |(kind, body)| with_header(1, kind, body)),
        // One byte of the magic wrong.
        1 => (known_kind(), any::<bool>(), any::<u8>(), body(64)).prop_map(move |(kind, first, byte, body)| {
            let mut datagram = with_header(1, kind, body);
            let at = usize::from(!first);
            datagram[at] = if byte == datagram[at] { byte.wrapping_add(1) } else { byte };
            datagram
        }),
        // Anything at all.
        1 => body(2000),
    ]
}

/// What the envelope rules say about a datagram: its four header bytes, or why it is refused
/// (as [`wire::WireError::label`] names it).
fn envelope_rule(datagram: &[u8]) -> Result<[u8; 4], &'static str> {
    if datagram.len() > 1400 {
        return Err("too_large");
    }
    let Some(head) = datagram.first_chunk::<4>() else {
        return Err("too_short");
    };
    if head[..2] != *b"ms" {
        return Err("bad_magic");
    }
    if head[2] != 1 {
        return Err("unsupported_version");
    }
    if !(1..=LAST_KIND).contains(&(head[3] & 0x7f)) {
        return Err("unknown_kind");
    }
    Ok(*head)
}

/// Node ids: mostly of the valid alphabet around the length limits, some with one character
/// from outside it.
fn node_id_text() -> impl Strategy<Value = String> {
    prop_oneof![
        4 => "[A-Za-z0-9._-]{0,70}",
        1 => "[A-Za-z0-9._-]{62,65}",
        2 => ("[A-Za-z0-9._-]{0,62}", any::<prop::sample::Index>(), "[^A-Za-z0-9._-]")
            .prop_map(|(mut text, at, bad)| {
                let at = at.index(text.len() + 1);
                text.insert_str(at, &bad);
                text
            }),
    ]
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(2000))]

    #[test]
    fn the_envelope_parser_follows_the_rules(datagram in datagram()) {
        match (wire::parse(&datagram), envelope_rule(&datagram)) {
            (Ok((header, body)), Ok(head)) => {
                prop_assert_eq!(header.to_bytes(), head);
                prop_assert_eq!(header.encrypted, head[3] & 0x80 != 0);
                prop_assert_eq!(body, &datagram[wire::HEADER_LEN..]);
            }
            (Err(error), Err(rule)) => {
                prop_assert_eq!(error.label(), rule);
                prop_assert!(!error.to_string().is_empty());
            }
            (parsed, rule) => prop_assert!(false, "parsed {:?}, the rules say {:?}", parsed, rule),
        }
    }

    #[test]
    fn a_plain_envelope_opens_exactly_the_plain_datagrams_the_rules_allow(datagram in datagram()) {
        let mut scratch = [0; wire::MAX_DATAGRAM];
        let opened = Envelope::plain().open(&datagram, &mut scratch);
        match envelope_rule(&datagram) {
            Ok(head) if head[3] & 0x80 != 0 => {
                prop_assert_eq!(opened.unwrap_err().label(), "unexpected_encryption");
            }
            Ok(_) => prop_assert_eq!(opened.unwrap().1, &datagram[wire::HEADER_LEN..]),
            Err(rule) => prop_assert_eq!(opened.unwrap_err().label(), rule),
        }
    }

    #[test]
    fn an_encrypted_envelope_opens_nothing_it_did_not_seal(datagram in datagram()) {
        let envelope = Envelope::with_keyring(Keyring::new(SecretKey::from_bytes([9; 32])), "c").unwrap();
        let mut scratch = [0; wire::MAX_DATAGRAM];
        let error = envelope.open(&datagram, &mut scratch).unwrap_err();
        let expected = match envelope_rule(&datagram) {
            Ok(head) if head[3] & 0x80 != 0 => "unauthenticated",
            Ok(_) => "missing_encryption",
            Err(rule) => rule,
        };
        prop_assert_eq!(error.label(), expected);
    }

    #[test]
    fn the_body_decoders_never_panic_on_a_valid_header(datagram in datagram()) {
        if let Ok((header, body)) = wire::parse(&datagram) {
            match header.kind {
                Kind::StatePush => {
                    if let Ok(state) = NodeState::decode(body) {
                        prop_assert!(state.encode().map(|b| b.len() <= MAX_STATE_SIZE).unwrap_or(false));
                    }
                }
                Kind::Leave => {
                    if let Ok(identity) = postcard::from_bytes::<Identity>(body) {
                        prop_assert!(is_dns_label(identity.node_id().as_str()));
                    }
                }
                _ => {}
            }
        }
    }

    #[test]
    fn any_change_to_a_sealed_datagram_is_rejected(
        body in proptest::collection::vec(any::<u8>(), 0..1300),
        at in any::<prop::sample::Index>(),
        flip in 1u8..=255,
    ) {
        let envelope = Envelope::with_keyring(Keyring::new(SecretKey::from_bytes([9; 32])), "c").unwrap();
        let mut datagram = Vec::new();
        envelope.seal(Kind::Foca, &body, &mut datagram).unwrap();
        let mut scratch = [0; wire::MAX_DATAGRAM];
        let (kind, opened) = envelope.open(&datagram, &mut scratch).unwrap();
        prop_assert_eq!(kind, Kind::Foca);
        prop_assert_eq!(opened, &body[..]);
        let i = at.index(datagram.len());
        datagram[i] ^= flip;
        prop_assert!(envelope.open(&datagram, &mut scratch).is_err());
    }

    #[test]
    fn the_node_state_decoder_never_panics_on_random_bytes(bytes in proptest::collection::vec(any::<u8>(), 0..1500)) {
        if let Ok(state) = NodeState::decode(&bytes) {
            // Anything accepted re-encodes within the cap: no amplification.
            prop_assert!(state.encode().map(|b| b.len() <= MAX_STATE_SIZE).unwrap_or(false));
        }
    }

    #[test]
    fn the_node_state_decoder_never_panics_on_corrupted_states(
        flips in proptest::collection::vec((any::<prop::sample::Index>(), any::<u8>()), 1..8),
        cut in any::<prop::sample::Index>(),
    ) {
        let mut bytes = valid_state().encode().unwrap();
        for (at, value) in flips {
            let i = at.index(bytes.len());
            bytes[i] = value;
        }
        let keep = cut.index(bytes.len() + 1);
        bytes.truncate(keep);
        if let Ok(state) = NodeState::decode(&bytes) {
            prop_assert!(state.encode().map(|b| b.len() <= MAX_STATE_SIZE).unwrap_or(false));
            prop_assert!(is_dns_label(state.node_id.as_str()));
        }
    }

    #[test]
    fn identities_from_the_network_are_validated(bytes in proptest::collection::vec(any::<u8>(), 0..200)) {
        if let Ok(identity) = postcard::from_bytes::<Identity>(&bytes) {
            prop_assert!(is_dns_label(identity.node_id().as_str()));
        }
    }

    #[test]
    fn node_ids_follow_exactly_the_dns_label_rule(text in node_id_text()) {
        match NodeId::new(&text) {
            Ok(id) => {
                prop_assert!(is_dns_label(&text), "{:?} was accepted", text);
                prop_assert_eq!(id.as_str(), text.as_str());
            }
            Err(error) => {
                prop_assert!(!is_dns_label(&text), "{:?} was refused: {}", text, error);
                prop_assert!(error.to_string().contains("[A-Za-z0-9._-]"), "{}", error);
            }
        }
    }

    #[test]
    fn any_text_is_a_node_id_exactly_when_it_is_a_dns_label(text in "\\PC{0,80}") {
        prop_assert_eq!(NodeId::new(&text).is_ok(), is_dns_label(&text));
    }

    #[test]
    fn node_id_errors_stay_small(text in "\\PC{100,3000}") {
        if let Err(error) = NodeId::new(&text) {
            prop_assert!(error.to_string().len() < 400);
        }
    }
}

/// The generators reach every branch of the rules they test: a property that never sees a
/// valid header, or only valid node ids, would pass whatever the code did.
#[test]
fn the_generators_reach_every_rule() {
    let mut runner = TestRunner::deterministic();
    let mut outcomes = std::collections::HashMap::new();
    for _ in 0..4000 {
        let datagram = datagram().new_tree(&mut runner).unwrap().current();
        let outcome = match envelope_rule(&datagram) {
            Ok(head) if head[3] & 0x80 != 0 => "valid, encrypted",
            Ok(_) => "valid, plain",
            Err(rule) => rule,
        };
        *outcomes.entry(outcome).or_insert(0) += 1;
    }
    for outcome in [
        "valid, encrypted",
        "valid, plain",
        "too_large",
        "too_short",
        "bad_magic",
        "unsupported_version",
        "unknown_kind",
    ] {
        let count = outcomes.get(outcome).copied().unwrap_or(0);
        assert!(
            count >= 100,
            "only {count} datagrams {outcome}: {outcomes:?}"
        );
    }
    let (mut valid, mut invalid, mut longest) = (0, 0, 0);
    for _ in 0..2000 {
        let text = node_id_text().new_tree(&mut runner).unwrap().current();
        if is_dns_label(&text) {
            valid += 1;
            if text.len() == 63 {
                longest += 1;
            }
        } else {
            invalid += 1;
        }
    }
    assert!(
        valid >= 500 && invalid >= 500 && longest >= 20,
        "{valid} {invalid} {longest}"
    );
}
