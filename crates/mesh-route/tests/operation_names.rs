//! Operation names come from clients: the parser answers every input with an id or an error
//! naming the expected form, never a panic.

use mesh_core::NodeId;
use mesh_route::OperationId;
use proptest::prelude::*;

proptest! {
    #![proptest_config(ProptestConfig::with_cases(3000))]

    #[test]
    fn any_text_parses_or_is_rejected_with_the_expected_form(name in "\\PC{0,300}") {
        match name.parse::<OperationId>() {
            Ok(id) => {
                // What was accepted is exactly the last path segment.
                let last = name.rsplit('/').next().unwrap();
                prop_assert_eq!(id.to_string(), last.to_ascii_lowercase());
            }
            Err(error) => {
                let message = error.to_string();
                prop_assert!(message.contains("expected \"{node_id}:{uuid}\""), "{}", message);
                prop_assert!(message.len() < 800);
            }
        }
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
