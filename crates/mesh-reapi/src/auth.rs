//! Who may call the build cluster: bearer tokens with rights, and the cluster's own token.
//!
//! # The model
//!
//! A client presents a bearer token (`authorization: Bearer …`; Bazel sends one with
//! `--remote_header=authorization=Bearer …`). The token file gives each token a name and its
//! rights, as BuildBuddy's API keys carry capabilities and Buildbarn's authorizers allow
//! methods per instance:
//!
//! | right | methods |
//! |---|---|
//! | `read` | `GetCapabilities`, `FindMissingBlobs`, `BatchReadBlobs`, `GetTree`, ByteStream `Read`, `GetActionResult` |
//! | `write-cas` | `BatchUpdateBlobs`, ByteStream `Write` and `QueryWriteStatus` |
//! | `write-ac` | `UpdateActionResult` |
//! | `execute` | `Execute`, `WaitExecution` |
//! | `admin` | `mesh.admin.v1.MeshAdmin` (`meshctl`: members, stats, drain) |
//!
//! `grpc.health.v1` is open (load balancers and Kubernetes probes carry no token). A missing or
//! unknown token is answered `UNAUTHENTICATED`, a token without the right `PERMISSION_DENIED`;
//! both name the method and what was missing, never a secret. A read-only client (a
//! developer's machine) reads cached results and cannot `UpdateActionResult`: Bazel with
//! `--remote_upload_local_results` warns and goes on.
//!
//! Replicas call each other (blob fetches, action-cache lookups, forwarded calls, and the
//! cluster-only `mesh.reapi.v1.Claims` and `Presence`) as the cluster: every call to a peer
//! carries the cluster token in [`CLUSTER_TOKEN_HEADER`]
//! ([`mesh::route::PeerCredential`]), never the client's token, which the replica that
//! checked it removes before the call goes anywhere.
//!
//! # Files
//!
//! The token file has one token per line: a name, its rights (comma-separated), and the
//! SHA-256 of the token in hex, so the file itself holds no usable secret:
//!
//! ```text
//! # name   rights                           sha256 of the token (printf %s TOKEN | sha256sum)
//! ci       read,write-cas,write-ac,execute  2bb80d537b1da3e38bd30361aa855686bde0eacd7162fef6a25fe97bf527a25b
//! laptop   read                             fcde2b2edba56bf408601fb721fe9b5c338d10ee429ea04fae5511b68fbf8fb9
//! ```
//!
//! The cluster token file holds secrets, one per line: replicas send the first and accept any.
//! Both files are read again when they change (checked every [`RELOAD_INTERVAL`]), so tokens
//! are added, rotated (a new line, then the old one removed once clients moved) and revoked
//! without a restart; a file that no longer parses keeps the last good tokens and logs why.

use std::{
    collections::HashMap,
    path::{Path, PathBuf},
    sync::{Arc, RwLock},
    time::{Duration, SystemTime},
};

use sha2::{Digest as _, Sha256};
use tonic::Status;

/// The header replicas send the cluster token in.
pub const CLUSTER_TOKEN_HEADER: &str = "x-mesh-cluster-token";

/// How often the token files are checked for changes.
pub const RELOAD_INTERVAL: Duration = Duration::from_secs(2);

/// What a token allows.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Right {
    /// Read blobs and cached results.
    Read,
    /// Upload blobs.
    WriteCas,
    /// Store action results.
    WriteActionCache,
    /// Run actions and follow their operations.
    Execute,
    /// The mesh's admin API.
    Admin,
}

impl Right {
    /// Every right.
    pub const ALL: [Right; 5] = [
        Right::Read,
        Right::WriteCas,
        Right::WriteActionCache,
        Right::Execute,
        Right::Admin,
    ];

    /// Its name in the token file and in errors.
    pub fn name(self) -> &'static str {
        match self {
            Right::Read => "read",
            Right::WriteCas => "write-cas",
            Right::WriteActionCache => "write-ac",
            Right::Execute => "execute",
            Right::Admin => "admin",
        }
    }

    fn parse(text: &str) -> Option<Self> {
        Self::ALL.into_iter().find(|right| right.name() == text)
    }
}

/// What a method needs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Needs {
    /// Nothing (health checks).
    Nothing,
    /// A token with this right.
    Right(Right),
    /// The cluster token: a replica's call.
    Cluster,
}

/// What a call to `path` needs. Unknown methods need a valid token of any right (they are then
/// answered `UNIMPLEMENTED` by the server).
fn needs(path: &str) -> Option<Needs> {
    let (service, method) = path.strip_prefix('/')?.split_once('/')?;
    Some(match (service, method) {
        ("grpc.health.v1.Health", _) => Needs::Nothing,
        ("mesh.reapi.v1.Claims" | "mesh.reapi.v1.Presence", _) => Needs::Cluster,
        ("mesh.admin.v1.MeshAdmin", _) => Needs::Right(Right::Admin),
        ("build.bazel.remote.execution.v2.Execution", _) => Needs::Right(Right::Execute),
        ("build.bazel.remote.execution.v2.ActionCache", "UpdateActionResult") => {
            Needs::Right(Right::WriteActionCache)
        }
        ("build.bazel.remote.execution.v2.ContentAddressableStorage", "BatchUpdateBlobs")
        | ("google.bytestream.ByteStream", "Write" | "QueryWriteStatus") => {
            Needs::Right(Right::WriteCas)
        }
        _ => Needs::Right(Right::Read),
    })
}

/// A token file or cluster token file could not be used.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum AuthError {
    /// The file could not be read.
    #[error("reading the token file {path}: {source}")]
    Read {
        /// The file.
        path: PathBuf,
        /// The cause.
        #[source]
        source: std::io::Error,
    },
    /// A line breaks the format.
    #[error("{path}:{line}: {rule}")]
    Invalid {
        /// The file.
        path: PathBuf,
        /// The line number, from 1.
        line: usize,
        /// What is wrong (never the line's secret).
        rule: String,
    },
}

/// One client token's name and rights.
#[derive(Debug)]
struct Grant {
    name: String,
    rights: Vec<Right>,
}

/// The tokens in force.
#[derive(Debug, Default)]
struct Tokens {
    /// Client tokens by the SHA-256 of the token.
    clients: HashMap<[u8; 32], Arc<Grant>>,
    /// The SHA-256 of every accepted cluster token.
    cluster: Vec<[u8; 32]>,
}

fn sha256(text: &str) -> [u8; 32] {
    Sha256::digest(text.as_bytes()).into()
}

/// Parses a token file: `name rights sha256-hex` per line.
fn parse_tokens(path: &Path, text: &str) -> Result<HashMap<[u8; 32], Arc<Grant>>, AuthError> {
    let mut clients = HashMap::new();
    for (index, line) in text.lines().enumerate() {
        let invalid = |rule: String| AuthError::Invalid {
            path: path.to_owned(),
            line: index + 1,
            rule,
        };
        let line = line.trim();
        if line.is_empty() || line.starts_with('#') {
            continue;
        }
        let fields: Vec<&str> = line.split_whitespace().collect();
        let [name, rights, hash] = fields[..] else {
            return Err(invalid(format!(
                "expected `name rights sha256` (3 fields), found {} fields",
                fields.len()
            )));
        };
        let rights = rights
            .split(',')
            .map(|right| {
                Right::parse(right).ok_or_else(|| {
                    invalid(format!(
                        "token {name:?} has the unknown right {right:?}; rights are {}",
                        Right::ALL.map(Right::name).join(", ")
                    ))
                })
            })
            .collect::<Result<Vec<_>, _>>()?;
        let parsed = crate::digest::parse_hash(hash);
        let Ok(digest) = parsed else {
            return Err(invalid(format!(
                "token {name:?}: the third field must be the token's SHA-256 in hex (64 \
                 characters), e.g. from `printf %s TOKEN | sha256sum`"
            )));
        };
        let grant = Arc::new(Grant {
            name: name.to_owned(),
            rights,
        });
        if clients.insert(digest, grant).is_some() {
            return Err(invalid(format!(
                "token {name:?} has the same secret as an earlier line"
            )));
        }
    }
    Ok(clients)
}

/// Parses a cluster token file: one secret per line, the first one sent.
fn parse_cluster(path: &Path, text: &str) -> Result<Vec<String>, AuthError> {
    let secrets: Vec<String> = text
        .lines()
        .map(str::trim)
        .filter(|line| !line.is_empty() && !line.starts_with('#'))
        .map(str::to_owned)
        .collect();
    if let Some(index) = secrets.iter().position(|secret| {
        secret.len() < 16 || mesh_route::PeerCredential::new(CLUSTER_TOKEN_HEADER, secret).is_none()
    }) {
        return Err(AuthError::Invalid {
            path: path.to_owned(),
            line: index + 1,
            rule: "a cluster token must be at least 16 visible ASCII characters".to_owned(),
        });
    }
    if secrets.is_empty() {
        return Err(AuthError::Invalid {
            path: path.to_owned(),
            line: 1,
            rule: "the cluster token file has no token".to_owned(),
        });
    }
    Ok(secrets)
}

fn read(path: &Path) -> Result<(String, Option<SystemTime>), AuthError> {
    let error = |source| AuthError::Read {
        path: path.to_owned(),
        source,
    };
    let modified = std::fs::metadata(path).map_err(error)?.modified().ok();
    let text = std::fs::read_to_string(path).map_err(error)?;
    Ok((text, modified))
}

/// Bearer-token authorization for a REAPI replica: the token files, checked on every call
/// ([`Authorization::check`]). Cheap to clone.
#[derive(Debug, Clone)]
pub struct Authorization {
    inner: Arc<AuthInner>,
}

#[derive(Debug)]
struct AuthInner {
    tokens_file: PathBuf,
    cluster_file: PathBuf,
    tokens: RwLock<Tokens>,
    /// The cluster token this replica sends to its peers.
    sent: mesh_route::PeerCredential,
    seen: RwLock<(Option<SystemTime>, Option<SystemTime>)>,
}

impl Authorization {
    /// Reads the client token file and the cluster token file.
    pub fn from_files(
        tokens_file: impl Into<PathBuf>,
        cluster_file: impl Into<PathBuf>,
    ) -> Result<Self, AuthError> {
        let tokens_file = tokens_file.into();
        let cluster_file = cluster_file.into();
        let (text, tokens_modified) = read(&tokens_file)?;
        let clients = parse_tokens(&tokens_file, &text)?;
        let (text, cluster_modified) = read(&cluster_file)?;
        let secrets = parse_cluster(&cluster_file, &text)?;
        let sent = mesh_route::PeerCredential::new(CLUSTER_TOKEN_HEADER, &secrets[0]).ok_or_else(
            || AuthError::Invalid {
                path: cluster_file.clone(),
                line: 1,
                rule: "a cluster token must be visible ASCII".to_owned(),
            },
        )?;
        Ok(Self {
            inner: Arc::new(AuthInner {
                tokens_file,
                cluster_file,
                tokens: RwLock::new(Tokens {
                    clients,
                    cluster: secrets.iter().map(|secret| sha256(secret)).collect(),
                }),
                sent,
                seen: RwLock::new((tokens_modified, cluster_modified)),
            }),
        })
    }

    /// The credential this replica's calls to peers carry: give it to the node
    /// ([`mesh::NodeBuilder::peer_credential`]).
    pub fn peer_credential(&self) -> mesh_route::PeerCredential {
        self.inner.sent.clone()
    }

    /// Reads the files again if they changed since the last reading; keeps the tokens in force
    /// when a file no longer parses. Returns the error, if any, for the caller to log.
    pub fn reload(&self) -> Result<bool, AuthError> {
        let modified = |path: &Path| std::fs::metadata(path).ok().and_then(|m| m.modified().ok());
        let now = (
            modified(&self.inner.tokens_file),
            modified(&self.inner.cluster_file),
        );
        if *self.inner.seen.read().unwrap_or_else(|p| p.into_inner()) == now {
            return Ok(false);
        }
        let (text, _) = read(&self.inner.tokens_file)?;
        let clients = parse_tokens(&self.inner.tokens_file, &text)?;
        let (text, _) = read(&self.inner.cluster_file)?;
        let secrets = parse_cluster(&self.inner.cluster_file, &text)?;
        *self.inner.tokens.write().unwrap_or_else(|p| p.into_inner()) = Tokens {
            clients,
            cluster: secrets.iter().map(|secret| sha256(secret)).collect(),
        };
        *self.inner.seen.write().unwrap_or_else(|p| p.into_inner()) = now;
        Ok(true)
    }

    /// Reloads the files every [`RELOAD_INTERVAL`] until `self` is the last handle left.
    pub(crate) fn watch(&self) {
        let weak = Arc::downgrade(&self.inner);
        tokio::spawn(async move {
            loop {
                tokio::time::sleep(RELOAD_INTERVAL).await;
                let Some(inner) = weak.upgrade() else { return };
                match (Authorization { inner }).reload() {
                    Ok(true) => tracing::info!("token files changed: tokens reloaded"),
                    Ok(false) => {}
                    Err(error) => {
                        tracing::error!(%error, "token files changed and cannot be used; keeping the tokens in force")
                    }
                }
            }
        });
    }

    /// Checks one call's headers against what `path` needs; on success, removes the client's
    /// token so it never travels further. [`crate::Reapi::layer`] runs it on every call
    /// ([`mesh_route::layer::RouteLayer::check_calls`]).
    pub fn check(&self, path: &str, headers: &mut http::HeaderMap) -> Result<(), Status> {
        let needs = needs(path).unwrap_or(Needs::Right(Right::Read));
        let tokens = self.inner.tokens.read().unwrap_or_else(|p| p.into_inner());
        if let Some(presented) = headers.get(CLUSTER_TOKEN_HEADER) {
            let presented = presented.to_str().map(sha256).ok();
            return match presented {
                Some(hash) if tokens.cluster.contains(&hash) => Ok(()),
                _ => Err(Status::unauthenticated(format!(
                    "{path}: the {CLUSTER_TOKEN_HEADER} sent is not one of this cluster's tokens"
                ))),
            };
        }
        let right = match needs {
            Needs::Nothing => return Ok(()),
            Needs::Cluster => {
                return Err(Status::permission_denied(format!(
                    "{path} is for the cluster's replicas only (they authenticate with \
                     {CLUSTER_TOKEN_HEADER})"
                )));
            }
            Needs::Right(right) => right,
        };
        // The scheme is case-insensitive (RFC 9110): `Bearer`, `bearer`, …
        let token = headers
            .get(http::header::AUTHORIZATION)
            .and_then(|value| value.to_str().ok())
            .and_then(|value| value.split_once(' '))
            .filter(|(scheme, _)| scheme.eq_ignore_ascii_case("bearer"))
            .map(|(_, token)| token.trim());
        let Some(token) = token else {
            return Err(Status::unauthenticated(format!(
                "{path} needs a bearer token with the right {:?} (header `authorization: Bearer \
                 TOKEN`; Bazel: --remote_header=authorization=Bearer TOKEN); none was sent",
                right.name()
            )));
        };
        let Some(grant) = tokens.clients.get(&sha256(token)) else {
            return Err(Status::unauthenticated(format!(
                "{path}: the bearer token sent is not one of this cluster's tokens"
            )));
        };
        if !grant.rights.contains(&right) {
            tracing::debug!(token = %grant.name, path, right = right.name(), "permission denied");
            return Err(Status::permission_denied(format!(
                "{path} needs the right {:?}, which the token {:?} does not have (it has {})",
                right.name(),
                grant.name,
                grant
                    .rights
                    .iter()
                    .map(|right| right.name())
                    .collect::<Vec<_>>()
                    .join(", ")
            )));
        }
        headers.remove(http::header::AUTHORIZATION);
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn hex(bytes: [u8; 32]) -> String {
        bytes.iter().map(|b| format!("{b:02x}")).collect()
    }

    fn files(dir: &Path, tokens: &str) -> Authorization {
        std::fs::write(dir.join("tokens"), tokens).unwrap();
        std::fs::write(dir.join("cluster"), "cluster-secret-0123456789\n").unwrap();
        Authorization::from_files(dir.join("tokens"), dir.join("cluster")).unwrap()
    }

    fn bearer(token: &str) -> http::HeaderMap {
        let mut headers = http::HeaderMap::new();
        headers.insert(
            http::header::AUTHORIZATION,
            format!("Bearer {token}").parse().unwrap(),
        );
        headers
    }

    const UPDATE: &str = "/build.bazel.remote.execution.v2.ActionCache/UpdateActionResult";
    const GET: &str = "/build.bazel.remote.execution.v2.ActionCache/GetActionResult";

    #[test]
    fn rights_are_checked_per_method_and_errors_name_what_is_missing() {
        let dir = tempfile::tempdir().unwrap();
        let auth = files(
            dir.path(),
            &format!(
                "# comment\nlaptop read {}\nci read,write-ac {}\n",
                hex(sha256("laptop-secret")),
                hex(sha256("ci-secret"))
            ),
        );
        let mut headers = bearer("laptop-secret");
        auth.check(GET, &mut headers).unwrap();
        let mut lower = http::HeaderMap::new();
        lower.insert(
            http::header::AUTHORIZATION,
            "bearer laptop-secret".parse().unwrap(),
        );
        auth.check(GET, &mut lower).unwrap();
        assert!(
            headers.get("authorization").is_none(),
            "removed once checked"
        );
        let error = auth
            .check(UPDATE, &mut bearer("laptop-secret"))
            .unwrap_err();
        assert_eq!(error.code(), tonic::Code::PermissionDenied);
        assert!(error.message().contains("write-ac") && error.message().contains("laptop"));
        assert!(!error.message().contains("laptop-secret"));
        auth.check(UPDATE, &mut bearer("ci-secret")).unwrap();

        let error = auth.check(GET, &mut http::HeaderMap::new()).unwrap_err();
        assert_eq!(error.code(), tonic::Code::Unauthenticated);
        assert!(
            error.message().contains("none was sent"),
            "{}",
            error.message()
        );
        let error = auth.check(GET, &mut bearer("wrong")).unwrap_err();
        assert_eq!(error.code(), tonic::Code::Unauthenticated);
        assert!(!error.message().contains("wrong"));

        // Health is open; the replicas' own services are not, even with a full token.
        auth.check("/grpc.health.v1.Health/Check", &mut http::HeaderMap::new())
            .unwrap();
        let error = auth
            .check("/mesh.reapi.v1.Presence/Has", &mut bearer("ci-secret"))
            .unwrap_err();
        assert_eq!(error.code(), tonic::Code::PermissionDenied);
        let mut cluster = http::HeaderMap::new();
        cluster.insert(
            CLUSTER_TOKEN_HEADER,
            "cluster-secret-0123456789".parse().unwrap(),
        );
        auth.check("/mesh.reapi.v1.Presence/Has", &mut cluster)
            .unwrap();
        let mut forged = http::HeaderMap::new();
        forged.insert(CLUSTER_TOKEN_HEADER, "guess".parse().unwrap());
        let error = auth.check(GET, &mut forged).unwrap_err();
        assert_eq!(error.code(), tonic::Code::Unauthenticated);
    }

    #[test]
    fn bad_files_name_the_file_the_line_and_the_rule() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("cluster"), "cluster-secret-0123456789\n").unwrap();
        for (text, expected) in [
            ("ci read\n", "3 fields"),
            ("ci fly 00\n", "unknown right \"fly\""),
            ("ci read zz\n", "SHA-256 in hex"),
        ] {
            std::fs::write(dir.path().join("tokens"), text).unwrap();
            let error =
                Authorization::from_files(dir.path().join("tokens"), dir.path().join("cluster"))
                    .unwrap_err()
                    .to_string();
            assert!(
                error.contains("tokens:1:") && error.contains(expected),
                "{error}"
            );
        }
        std::fs::write(dir.path().join("tokens"), "").unwrap();
        std::fs::write(dir.path().join("cluster"), "short\n").unwrap();
        let error =
            Authorization::from_files(dir.path().join("tokens"), dir.path().join("cluster"))
                .unwrap_err()
                .to_string();
        assert!(error.contains("at least 16"), "{error}");
    }

    #[test]
    fn a_changed_file_is_read_again_and_a_broken_one_keeps_the_tokens_in_force() {
        let dir = tempfile::tempdir().unwrap();
        let auth = files(
            dir.path(),
            &format!("old read {}\n", hex(sha256("old-secret"))),
        );
        auth.check(GET, &mut bearer("old-secret")).unwrap();
        let rotate = format!("new read {}\n", hex(sha256("new-secret")));
        std::fs::write(dir.path().join("tokens"), rotate).unwrap();
        // A file system with coarse timestamps may not show the change: force one.
        *auth.inner.seen.write().unwrap() = (None, None);
        assert!(auth.reload().unwrap());
        auth.check(GET, &mut bearer("new-secret")).unwrap();
        assert_eq!(
            auth.check(GET, &mut bearer("old-secret"))
                .unwrap_err()
                .code(),
            tonic::Code::Unauthenticated,
            "revoked"
        );
        std::fs::write(dir.path().join("tokens"), "broken\n").unwrap();
        *auth.inner.seen.write().unwrap() = (None, None);
        assert!(auth.reload().is_err());
        auth.check(GET, &mut bearer("new-secret")).unwrap();
    }
}
