//! What the route layer's rules will call: the action-cache check before routing, and the
//! route request built from the action.

use tonic::metadata::MetadataMap;

use crate::support::{Cluster, execute, execute_request, finished, shell, upload};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn route_requests_carry_the_platform_as_required_tags() {
    let cluster = Cluster::start(2, |_, _| {}).await;
    let mut action = shell("true").input("src/a.c", b"int a;");
    action.platform = vec![
        ("OSFamily".into(), "Linux".into()),
        ("pool".into(), "default".into()),
    ];
    let built = action.build();
    upload(&cluster, 0, &built.blobs).await;
    // Asked on B, which has to fetch the Action and Command from A.
    let execution = cluster.replicas[1].reapi().execution().clone();
    let route = execution
        .route_request(&execute_request(built.action, false), &MetadataMap::new())
        .await
        .unwrap();
    let tags: Vec<(&str, &str)> = route
        .required_tags()
        .iter()
        .map(|(k, v)| (k.as_str(), v.as_str()))
        .collect();
    assert_eq!(tags, [("OSFamily", "Linux"), ("pool", "default")]);
    let affinity = route.affinity_key().expect("the input root digest");
    assert_eq!(affinity.len(), 32);
    cluster.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_cache_check_before_routing_honours_skip_cache_lookup() {
    let cluster = Cluster::start(2, |_, _| {}).await;
    let built = shell("echo cached").build();
    upload(&cluster, 0, &built.blobs).await;
    let execution = cluster.replicas[1].reapi().execution().clone();
    let metadata = MetadataMap::new();
    assert!(
        execution
            .cached_result(&execute_request(built.action, false), &metadata)
            .await
            .unwrap()
            .is_none(),
        "nothing cached yet"
    );
    let ran = finished(
        &execute(
            &mut cluster.exec(0).await,
            execute_request(built.action, false),
        )
        .await
        .unwrap(),
    );
    // B finds A's result before any routing decision; skip_cache_lookup means "don't".
    let hit = execution
        .cached_result(&execute_request(built.action, false), &metadata)
        .await
        .unwrap();
    assert_eq!(hit, ran.result);
    assert!(
        execution
            .cached_result(&execute_request(built.action, true), &metadata)
            .await
            .unwrap()
            .is_none()
    );
    // Bad input is refused here too.
    let mut bad = execute_request(built.action, false);
    bad.action_digest.as_mut().unwrap().hash = "nope".into();
    let error = execution.cached_result(&bad, &metadata).await.unwrap_err();
    assert_eq!(error.code(), tonic::Code::InvalidArgument);
    cluster.shutdown().await;
}
