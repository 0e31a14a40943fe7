//! Who may talk to the cluster: TLS and mutual TLS for clients and between replicas, bearer
//! tokens with rights, and the cluster's own token — through a client built from the bindings.

use mesh::{
    route::ChannelConfig,
    tls::{PeerTls, ServerTls},
};
use mesh_reapi::{
    Authorization, Digest,
    proto::build::bazel::remote::execution::v2::{
        ActionResult, FindMissingBlobsRequest, GetActionResultRequest, UpdateActionResultRequest,
        action_cache_client::ActionCacheClient,
        content_addressable_storage_client::ContentAddressableStorageClient,
    },
};
use sha2::{Digest as _, Sha256};
use tonic::{
    Code, Request, Status,
    metadata::MetadataValue,
    service::interceptor::InterceptedService,
    transport::{Channel, Endpoint},
};

use crate::support::{Cluster, upload_with};

#[path = "../../../../tests/node/support/pki.rs"]
mod pki;
use pki::Pki;

type Authed = InterceptedService<Channel, Bearer>;

/// Adds `authorization: Bearer …` to every call.
#[derive(Clone)]
struct Bearer(Option<String>);

impl tonic::service::Interceptor for Bearer {
    fn call(&mut self, mut request: Request<()>) -> Result<Request<()>, Status> {
        if let Some(token) = &self.0 {
            let value: MetadataValue<_> = format!("Bearer {token}").parse().unwrap();
            request.metadata_mut().insert("authorization", value);
        }
        Ok(request)
    }
}

fn hex(text: &str) -> String {
    Sha256::digest(text.as_bytes())
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
}

/// Token files in `dir`: `ci` may do everything but admin, `laptop` may only read.
fn authorization(dir: &std::path::Path) -> Authorization {
    let tokens = format!(
        "ci read,write-cas,write-ac,execute {}\nlaptop read {}\n",
        hex("ci-token"),
        hex("laptop-token")
    );
    std::fs::write(dir.join("tokens"), tokens).unwrap();
    std::fs::write(dir.join("cluster"), "the-cluster-token-0123456789\n").unwrap();
    Authorization::from_files(dir.join("tokens"), dir.join("cluster")).unwrap()
}

async fn channel(url: String, tls: Option<&PeerTls>) -> Result<Channel, String> {
    let mut endpoint = Endpoint::from_shared(url).unwrap();
    if let Some(tls) = tls {
        endpoint = endpoint.tls_config(tls.client_config()).unwrap();
    }
    endpoint.connect().await.map_err(|error| {
        let mut text = error.to_string();
        let mut source = std::error::Error::source(&error);
        while let Some(cause) = source {
            text = format!("{text}: {cause}");
            source = cause.source();
        }
        text
    })
}

fn cas(channel: Channel, token: Option<&str>) -> ContentAddressableStorageClient<Authed> {
    ContentAddressableStorageClient::with_interceptor(channel, Bearer(token.map(str::to_owned)))
}

fn ac(channel: Channel, token: Option<&str>) -> ActionCacheClient<Authed> {
    ActionCacheClient::with_interceptor(channel, Bearer(token.map(str::to_owned)))
}

async fn missing(
    client: &mut ContentAddressableStorageClient<Authed>,
    digests: &[Digest],
) -> Result<usize, Status> {
    let response = client
        .find_missing_blobs(FindMissingBlobsRequest {
            blob_digests: digests.iter().map(Digest::to_proto).collect(),
            ..Default::default()
        })
        .await?;
    Ok(response.into_inner().missing_blob_digests.len())
}

/// TLS for `replicas` replicas from `pki`: the servers' certificates, peers verified against
/// the CA, and with `mutual` client certificates required and presented.
async fn tls_cluster(pki: &Pki, replicas: usize, mutual: bool) -> Cluster {
    Cluster::start_with(
        replicas,
        |i, config| {
            let identity = pki.identity(&format!("r{i}"));
            let mut server = ServerTls::new(identity);
            if mutual {
                server = server.require_client_certificates(pki.ca());
            }
            config.tls = Some(server);
        },
        |i, node| {
            let mut peers = PeerTls::new(pki.ca());
            if mutual {
                peers = peers.identity(pki.identity(&format!("r{i}")));
            }
            node.channel_config(ChannelConfig::default().tls(peers))
        },
    )
    .await
}

fn https(cluster: &Cluster, i: usize) -> String {
    format!("https://{}", cluster.replicas[i].addr())
}

/// A blob uploaded through one replica over TLS is found and read through the other: the
/// replicas asked each other over TLS (a TLS node never dials a plaintext endpoint). A client
/// that trusts another CA, or speaks plaintext, gets nowhere.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn clients_and_replicas_talk_over_tls() {
    let pki = Pki::new("build-ca");
    let cluster = tls_cluster(&pki, 2, false).await;
    assert!(cluster.replicas[0].endpoint().starts_with("grpcs://"));
    for replica in &cluster.replicas {
        let view = replica.node().view();
        for peer in view.peers() {
            let endpoint = peer.state().and_then(|s| s.grpc_endpoint.clone()).unwrap();
            assert!(endpoint.starts_with("https://"), "{endpoint}");
        }
    }
    let client_tls = PeerTls::new(pki.ca());
    let blobs: Vec<(Digest, Vec<u8>)> = (0..8)
        .map(|i| {
            let data = format!("blob {i} over tls").into_bytes();
            (Digest::of(&data), data)
        })
        .collect();
    let mut first = ContentAddressableStorageClient::new(
        channel(https(&cluster, 0), Some(&client_tls))
            .await
            .unwrap(),
    );
    upload_with(&mut first, &blobs).await;
    let digests: Vec<Digest> = blobs.iter().map(|(d, _)| *d).collect();
    let mut second = cas(
        channel(https(&cluster, 1), Some(&client_tls))
            .await
            .unwrap(),
        None,
    );
    assert_eq!(missing(&mut second, &digests).await.unwrap(), 0);

    let stranger = PeerTls::new(Pki::new("another-ca").ca());
    let error = channel(https(&cluster, 0), Some(&stranger))
        .await
        .unwrap_err();
    assert!(error.contains("certificate"), "{error}");
    let plaintext = format!("http://{}", cluster.replicas[0].addr());
    let refused = match channel(plaintext, None).await {
        Err(_) => true,
        Ok(channel) => missing(&mut cas(channel, None), &digests).await.is_err(),
    };
    assert!(refused, "a plaintext client was served by a TLS replica");
    cluster.shutdown().await;
}

/// With mutual TLS only clients with a certificate from the CA get in: not one without, not
/// one from another CA, not one whose certificate expired. The replicas present theirs to
/// each other.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mutual_tls_admits_only_current_certificates_from_the_ca() {
    let pki = Pki::new("build-ca");
    let cluster = tls_cluster(&pki, 2, true).await;
    let data = b"mutual".to_vec();
    let digest = Digest::of(&data);
    let bazel = PeerTls::new(pki.ca()).identity(pki.identity("bazel"));
    let mut client = ContentAddressableStorageClient::new(
        channel(https(&cluster, 0), Some(&bazel)).await.unwrap(),
    );
    upload_with(&mut client, &[(digest, data)]).await;
    let mut other = cas(
        channel(https(&cluster, 1), Some(&bazel)).await.unwrap(),
        None,
    );
    assert_eq!(
        missing(&mut other, &[digest]).await.unwrap(),
        0,
        "r1 asked r0"
    );

    let other_ca = Pki::new("another-ca");
    for (what, tls) in [
        ("no certificate", PeerTls::new(pki.ca())),
        (
            "a certificate from another CA",
            PeerTls::new(pki.ca()).identity(other_ca.identity("intruder")),
        ),
        (
            "an expired certificate",
            PeerTls::new(pki.ca()).identity(pki.expired_identity("old")),
        ),
    ] {
        // The handshake completes from the client's side before the server checks its
        // certificate: the refusal shows on the first call, or on connecting.
        let refused = match channel(https(&cluster, 0), Some(&tls)).await {
            Err(_) => true,
            Ok(channel) => missing(&mut cas(channel, None), &[digest]).await.is_err(),
        };
        assert!(refused, "a client with {what} was served");
    }
    cluster.shutdown().await;
}

/// Tokens: none or an unknown one is UNAUTHENTICATED, one without the right PERMISSION_DENIED,
/// each naming what was missing and never the secret; a read-only token reads and cannot
/// store results; the replicas' own services refuse clients; replicas still serve each other
/// (with the cluster token).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tokens_grant_rights_and_replicas_use_the_cluster_token() {
    let files = tempfile::tempdir_in(env!("CARGO_TARGET_TMPDIR")).unwrap();
    let auth = authorization(files.path());
    let cluster = Cluster::start(2, |_, config| config.authorization = Some(auth.clone())).await;
    let url = |i| cluster.url(i);
    let blobs: Vec<(Digest, Vec<u8>)> = (0..8)
        .map(|i| {
            let data = format!("token blob {i}").into_bytes();
            (Digest::of(&data), data)
        })
        .collect();
    let digests: Vec<Digest> = blobs.iter().map(|(d, _)| *d).collect();

    let mut anonymous = cas(channel(url(0), None).await.unwrap(), None);
    let status = missing(&mut anonymous, &digests).await.unwrap_err();
    assert_eq!(status.code(), Code::Unauthenticated, "{status:?}");
    assert!(
        status.message().contains("none was sent"),
        "{}",
        status.message()
    );
    let mut forger = cas(channel(url(0), None).await.unwrap(), Some("guessed"));
    let status = missing(&mut forger, &digests).await.unwrap_err();
    assert_eq!(status.code(), Code::Unauthenticated);
    assert!(!status.message().contains("guessed"));

    // The CI token uploads through r0; r1 finds every blob by asking the owners (Presence,
    // as the cluster).
    let channel_0 = channel(url(0), None).await.unwrap();
    let mut ci = ContentAddressableStorageClient::with_interceptor(
        channel_0.clone(),
        Bearer(Some("ci-token".to_owned())),
    );
    let response = ci
        .batch_update_blobs(
            mesh_reapi::proto::build::bazel::remote::execution::v2::BatchUpdateBlobsRequest {
                requests: blobs
                    .iter()
                    .map(|(digest, data)| {
                        mesh_reapi::proto::build::bazel::remote::execution::v2::batch_update_blobs_request::Request {
                            digest: Some(digest.to_proto()),
                            data: data.clone(),
                            compressor: 0,
                        }
                    })
                    .collect(),
                ..Default::default()
            },
        )
        .await
        .unwrap();
    assert!(
        response
            .into_inner()
            .responses
            .iter()
            .all(|r| r.status.clone().unwrap_or_default().code == 0)
    );
    let mut laptop_1 = cas(channel(url(1), None).await.unwrap(), Some("laptop-token"));
    assert_eq!(missing(&mut laptop_1, &digests).await.unwrap(), 0);
    // A large upload is passed on to r1 as it arrives, with the cluster's token.
    let large: Vec<u8> = (0..2 * 1024 * 1024 + 9)
        .map(|i: u32| (i % 239) as u8)
        .collect();
    let large_digest = Digest::of(&large);
    let pieces: Vec<_> = large
        .chunks(1024 * 1024)
        .enumerate()
        .map(
            |(i, piece)| mesh_reapi::proto::google::bytestream::WriteRequest {
                resource_name: if i == 0 {
                    format!("uploads/t/blobs/{large_digest}")
                } else {
                    String::new()
                },
                write_offset: (i * 1024 * 1024) as i64,
                finish_write: (i + 1) * 1024 * 1024 >= large.len(),
                data: piece.to_vec(),
            },
        )
        .collect();
    let written = mesh_reapi::proto::google::bytestream::byte_stream_client::ByteStreamClient::with_interceptor(
        channel_0.clone(),
        Bearer(Some("ci-token".to_owned())),
    )
    .write(futures::stream::iter(pieces))
    .await
    .unwrap();
    assert_eq!(written.into_inner().committed_size, large.len() as i64);
    assert!(
        cluster.holds(1, &large_digest),
        "r1 took the passed-on upload"
    );
    assert_eq!(cluster.replicas[0].stats().blobs_passed_on, 1);

    // Read-only: reads cached results, cannot store one.
    let action = Digest::of(b"an action");
    let mut laptop_ac = ac(channel_0.clone(), Some("laptop-token"));
    let status = laptop_ac
        .get_action_result(GetActionResultRequest {
            action_digest: Some(action.to_proto()),
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert_eq!(
        status.code(),
        Code::NotFound,
        "read allowed, nothing there: {status:?}"
    );
    let update = UpdateActionResultRequest {
        action_digest: Some(action.to_proto()),
        action_result: Some(ActionResult::default()),
        ..Default::default()
    };
    let status = laptop_ac
        .update_action_result(update.clone())
        .await
        .unwrap_err();
    assert_eq!(status.code(), Code::PermissionDenied);
    assert!(
        status.message().contains("write-ac") && status.message().contains("laptop"),
        "{}",
        status.message()
    );
    assert!(!status.message().contains("laptop-token"));
    ac(channel_0.clone(), Some("ci-token"))
        .update_action_result(update)
        .await
        .unwrap();
    let fetched = ac(channel(url(1), None).await.unwrap(), Some("laptop-token"))
        .get_action_result(GetActionResultRequest {
            action_digest: Some(action.to_proto()),
            ..Default::default()
        })
        .await;
    assert!(
        fetched.is_ok(),
        "r1 reads the result r0 stored: {fetched:?}"
    );

    // The replicas' own services are for replicas, whatever the client's token.
    let mut presence = mesh_proto::reapi::v1::presence_client::PresenceClient::with_interceptor(
        channel_0,
        Bearer(Some("ci-token".to_owned())),
    );
    let status = presence
        .has(mesh_proto::reapi::v1::HasRequest::default())
        .await
        .unwrap_err();
    assert_eq!(status.code(), Code::PermissionDenied, "{status:?}");

    // The admin API (meshctl) needs the admin right; health stays open for probes.
    let mut admin = mesh::proto::admin::v1::mesh_admin_client::MeshAdminClient::with_interceptor(
        channel(url(1), None).await.unwrap(),
        Bearer(Some("ci-token".to_owned())),
    );
    let status = admin
        .list_members(mesh::proto::admin::v1::ListMembersRequest::default())
        .await
        .unwrap_err();
    assert_eq!(status.code(), Code::PermissionDenied, "{status:?}");
    assert!(status.message().contains("admin"), "{}", status.message());
    cluster.shutdown().await;
}

/// A client refuses a replica whose certificate expired, or names another host.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_replica_with_an_expired_or_misnamed_certificate_is_refused() {
    let pki = Pki::new("build-ca");
    let client_tls = PeerTls::new(pki.ca());
    for (what, identity, expected) in [
        ("expired", pki.expired_identity("old"), "expired"),
        (
            "for another host",
            pki.identity_for("elsewhere", &["build.example.com"]),
            "not valid for",
        ),
    ] {
        let cluster = Cluster::start(1, |_, config| {
            config.tls = Some(ServerTls::new(identity.clone()));
        })
        .await;
        let refused = match channel(https(&cluster, 0), Some(&client_tls)).await {
            Err(error) => error,
            Ok(channel) => missing(&mut cas(channel, None), &[Digest::of(b"x")])
                .await
                .map(|_| String::new())
                .unwrap_or_else(|status| format!("{status:?}")),
        };
        assert!(
            refused.to_lowercase().contains(expected),
            "a replica with a certificate {what}: {refused:?}"
        );
        cluster.shutdown().await;
    }
}
