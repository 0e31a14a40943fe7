//! Reading an `Action` at the edge: digests, timeout, platform properties.
//!
//! An `Action` is checked once, when `Execute` accepts it, into an [`ActionSpec`]; the
//! executor never sees a malformed one. Its platform properties become the mesh tags a node
//! must carry to run it ([`platform_tags`]), which is how the route layer spreads `Execute`
//! only over replicas that can run it.

use std::time::Duration;

use bazel_remote_apis::build::bazel::remote::execution::v2::{Action, Command, Platform};
use mesh_core::Tags;

use crate::Digest;

/// How long actions may run.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub struct ActionLimits {
    /// The timeout of an action that sets none. Default 1 hour.
    pub default_timeout: Duration,
    /// The longest timeout an action may ask for; longer is `INVALID_ARGUMENT` (REAPI: the
    /// server MUST reject a timeout over its maximum). Default 3 hours.
    pub max_timeout: Duration,
}

impl Default for ActionLimits {
    fn default() -> Self {
        Self {
            default_timeout: Duration::from_secs(3600),
            max_timeout: Duration::from_secs(3 * 3600),
        }
    }
}

/// An `Action` that cannot run: `INVALID_ARGUMENT`, naming the field and the rule.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("invalid action {action}: {reason}")]
pub struct InvalidAction {
    action: Digest,
    reason: String,
}

/// A validated action, ready to run.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ActionSpec {
    /// The action's digest.
    pub action_digest: Digest,
    /// Its `Command`.
    pub command_digest: Digest,
    /// Its input root `Directory`.
    pub input_root_digest: Digest,
    /// How long the command may run.
    pub timeout: Duration,
    /// Whether the result must stay out of the action cache.
    pub do_not_cache: bool,
    /// Whether the action's platform lets it reach the network
    /// ([`crate::sandbox::NETWORK_PROPERTY`]); its `Command`'s platform may say so too.
    pub network: bool,
}

impl ActionSpec {
    /// Checks `action` (stored under `digest`) against `limits`.
    pub fn parse(
        digest: Digest,
        action: &Action,
        limits: &ActionLimits,
    ) -> Result<Self, InvalidAction> {
        let invalid = |reason: String| InvalidAction {
            action: digest,
            reason,
        };
        let command_digest = Digest::from_required(
            action.command_digest.as_ref(),
            "command_digest",
            digest.function(),
        )
        .map_err(|e| invalid(e.to_string()))?;
        let input_root_digest = Digest::from_required(
            action.input_root_digest.as_ref(),
            "input_root_digest",
            digest.function(),
        )
        .map_err(|e| invalid(e.to_string()))?;
        let timeout = match action.timeout {
            None => limits.default_timeout,
            Some(timeout) => {
                if timeout.seconds < 0 || timeout.nanos < 0 || timeout.nanos >= 1_000_000_000 {
                    return Err(invalid(format!(
                        "timeout {}s {}ns is not a valid non-negative duration",
                        timeout.seconds, timeout.nanos
                    )));
                }
                let timeout = Duration::new(timeout.seconds as u64, timeout.nanos as u32);
                if timeout.is_zero() {
                    limits.default_timeout
                } else if timeout > limits.max_timeout {
                    return Err(invalid(format!(
                        "timeout {timeout:?} exceeds this server's maximum of {:?}",
                        limits.max_timeout
                    )));
                } else {
                    timeout
                }
            }
        };
        Ok(Self {
            action_digest: digest,
            command_digest,
            input_root_digest,
            timeout,
            do_not_cache: action.do_not_cache,
            network: action.platform.as_ref().is_some_and(wants_network),
        })
    }
}

/// Whether a platform lets the action reach the network ([`crate::sandbox::NETWORK_PROPERTY`]
/// set to `on`).
pub(crate) fn wants_network(platform: &Platform) -> bool {
    platform
        .properties
        .iter()
        .any(|p| p.name == crate::sandbox::NETWORK_PROPERTY && p.value == "on")
}

/// The mesh tags a replica must carry to run `action`: its platform properties, one value per
/// name. REAPI v2.2 moved the platform from the `Command` to the `Action`; Bazel 4.2.3 still
/// sets only `Command.platform`, so the command's is used when the action has none. A name
/// given twice with different values cannot be matched by tags (which hold one value per
/// name) and is refused, naming both values. The property the sandbox interprets,
/// [`NETWORK_PROPERTY`](crate::sandbox::NETWORK_PROPERTY), is not a tag: any replica can give
/// an action the network.
///
/// ```
/// use bazel_remote_apis::build::bazel::remote::execution::v2::{Action, Platform, platform::Property};
///
/// let action = Action {
///     platform: Some(Platform {
///         properties: vec![Property { name: "os".into(), value: "linux".into() }],
///     }),
///     ..Default::default()
/// };
/// let tags = mesh_reapi::platform_tags(&action, None)?;
/// assert_eq!(tags.get("os").map(String::as_str), Some("linux"));
/// # Ok::<(), mesh_reapi::PlatformError>(())
/// ```
pub fn platform_tags(action: &Action, command: Option<&Command>) -> Result<Tags, PlatformError> {
    #[allow(deprecated)] // Command.platform: what Bazel 4.2.3 sets.
    let platform = action
        .platform
        .as_ref()
        .filter(|p| !p.properties.is_empty())
        .or_else(|| command.and_then(|c| c.platform.as_ref()));
    let mut tags = Tags::new();
    for property in platform.iter().flat_map(|p| p.properties.iter()) {
        if property.name == crate::sandbox::NETWORK_PROPERTY {
            // Interpreted by the sandbox of whichever replica runs it, not a routing tag.
            continue;
        }
        if let Some(previous) = tags.get(&property.name) {
            if previous != &property.value {
                return Err(PlatformError {
                    name: property.name.clone(),
                    first: previous.clone(),
                    second: property.value.clone(),
                });
            }
            continue;
        }
        tags.insert(property.name.clone(), property.value.clone());
    }
    Ok(tags)
}

/// A platform property is given twice with different values (`INVALID_ARGUMENT`).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error(
    "platform property {name:?} is given twice, as {first:?} and {second:?}; mesh tags hold one value per name"
)]
pub struct PlatformError {
    name: String,
    first: String,
    second: String,
}

#[cfg(test)]
mod tests {
    use bazel_remote_apis::{
        build::bazel::remote::execution::v2::{Platform, platform::Property},
        google::protobuf,
    };

    use super::*;

    fn action() -> Action {
        Action {
            command_digest: Some(Digest::of(b"command").to_proto()),
            input_root_digest: Some(Digest::EMPTY.to_proto()),
            ..Default::default()
        }
    }

    #[test]
    fn timeouts_default_and_are_bounded() {
        let limits = ActionLimits::default();
        let digest = Digest::of(b"action");
        let spec = ActionSpec::parse(digest, &action(), &limits).unwrap();
        assert_eq!(spec.timeout, limits.default_timeout);
        let mut long = action();
        long.timeout = Some(protobuf::Duration {
            seconds: 4 * 3600,
            nanos: 0,
        });
        let error = ActionSpec::parse(digest, &long, &limits)
            .unwrap_err()
            .to_string();
        assert!(error.contains("exceeds this server's maximum"), "{error}");
        let mut negative = action();
        negative.timeout = Some(protobuf::Duration {
            seconds: -1,
            nanos: 0,
        });
        let error = ActionSpec::parse(digest, &negative, &limits)
            .unwrap_err()
            .to_string();
        assert!(
            error.contains("not a valid non-negative duration"),
            "{error}"
        );
        let mut short = action();
        short.timeout = Some(protobuf::Duration {
            seconds: 2,
            nanos: 500_000_000,
        });
        let spec = ActionSpec::parse(digest, &short, &limits).unwrap();
        assert_eq!(spec.timeout, Duration::from_millis(2500));
    }

    #[test]
    fn required_digests_are_named() {
        let mut bad = action();
        bad.command_digest = None;
        let error = ActionSpec::parse(Digest::of(b"a"), &bad, &ActionLimits::default())
            .unwrap_err()
            .to_string();
        assert!(error.contains("command_digest"), "{error}");
        assert!(error.contains("required"), "{error}");
    }

    #[test]
    fn platform_properties_become_tags() {
        let property = |name: &str, value: &str| Property {
            name: name.to_owned(),
            value: value.to_owned(),
        };
        let mut action = action();
        action.platform = Some(Platform {
            properties: vec![
                property("arch", "x86_64"),
                property("os", "linux"),
                property("os", "linux"),
            ],
        });
        let tags = platform_tags(&action, None).unwrap();
        assert_eq!(tags.len(), 2);
        #[allow(deprecated)]
        let command = Command {
            platform: Some(Platform {
                properties: vec![property("pool", "gpu")],
            }),
            ..Default::default()
        };
        let tags = platform_tags(&action, Some(&command)).unwrap();
        assert_eq!(
            tags.get("arch").map(String::as_str),
            Some("x86_64"),
            "the action's wins"
        );
        let tags = platform_tags(&Action::default(), Some(&command)).unwrap();
        assert_eq!(
            tags.get("pool").map(String::as_str),
            Some("gpu"),
            "Bazel 4.2.3's place"
        );
        action.platform = Some(Platform {
            properties: vec![property("os", "linux"), property("os", "windows")],
        });
        let error = platform_tags(&action, None).unwrap_err().to_string();
        assert!(error.contains("\"linux\" and \"windows\""), "{error}");
    }
}
