//! Configuration comes from files and the environment: the loaders answer every input with a
//! configuration or an error, never a panic.

use mesh::MeshConfig;
use proptest::prelude::*;

/// Every key, from the one list that declares them.
const KEYS: &[&str] = MeshConfig::KEYS;

proptest! {
    #![proptest_config(ProptestConfig::with_cases(1000))]

    #[test]
    fn toml_and_yaml_loaders_never_panic(text in "\\PC{0,400}") {
        let _ = MeshConfig::from_toml_str(&text);
        let _ = MeshConfig::from_yaml_str(&text);
    }

    #[test]
    fn key_shaped_documents_load_or_fail_cleanly(
        key in prop::sample::select(KEYS.to_vec()),
        value in "\\PC{0,40}",
    ) {
        let toml = format!("{key} = {value:?}\n");
        if let Ok(config) = MeshConfig::from_toml_str(&toml) {
            let _ = config.resolve();
        }
        let yaml = format!("mesh:\n  {key}: {value:?}\n");
        if let Ok(config) = MeshConfig::from_yaml_str(&yaml) {
            let _ = config.resolve();
        }
    }

    #[test]
    fn any_environment_value_is_applied_or_rejected_naming_the_variable(
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
}
