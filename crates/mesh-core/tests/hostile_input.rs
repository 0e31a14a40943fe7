//! Whatever arrives from the network, the decoders answer with a value or an error: never a
//! panic, never more memory than the input justifies.

use mesh_core::{
    Identity, Keyring, MAX_STATE_SIZE, NodeId, NodeState, SecretKey,
    wire::{self, Envelope, Kind},
};
use proptest::prelude::*;

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

proptest! {
    #![proptest_config(ProptestConfig::with_cases(2000))]

    #[test]
    fn the_envelope_parser_never_panics(datagram in proptest::collection::vec(any::<u8>(), 0..2000)) {
        match wire::parse(&datagram) {
            Ok((_, body)) => {
                prop_assert!(datagram.len() <= wire::MAX_DATAGRAM);
                prop_assert_eq!(body.len(), datagram.len() - wire::HEADER_LEN);
                prop_assert_eq!(&datagram[..2], &wire::MAGIC[..]);
            }
            Err(error) => prop_assert!(!error.to_string().is_empty()),
        }
    }

    #[test]
    fn an_encrypted_envelope_opens_nothing_it_did_not_seal(
        datagram in proptest::collection::vec(any::<u8>(), 0..1500),
        header in any::<bool>(),
    ) {
        let envelope = Envelope::with_keyring(Keyring::new(SecretKey::from_bytes([9; 32])), "c").unwrap();
        let mut datagram = datagram;
        if header && datagram.len() >= 4 {
            datagram[..4].copy_from_slice(b"ms\x01\x81");
        }
        let mut scratch = [0; wire::MAX_DATAGRAM];
        prop_assert!(envelope.open(&datagram, &mut scratch).is_err());
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
    fn node_ids_follow_exactly_the_dns_label_rule(text in "\\PC{0,80}") {
        prop_assert_eq!(NodeId::new(&text).is_ok(), is_dns_label(&text));
    }

    #[test]
    fn node_id_errors_stay_small(text in "\\PC{100,3000}") {
        if let Err(error) = NodeId::new(&text) {
            prop_assert!(error.to_string().len() < 400);
        }
    }
}
