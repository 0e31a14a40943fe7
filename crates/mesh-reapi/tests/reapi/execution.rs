//! The executor and the scheduler on one replica.

use std::time::Duration;

use mesh_reapi::{
    Digest,
    proto::build::bazel::remote::execution::v2::{
        ExecuteOperationMetadata, GetActionResultRequest, execution_stage::Value as Stage,
    },
};
use prost::Message as _;
use tonic::Code;

use crate::support::{
    Cluster, Gate, bounded, eventually, execute, execute_request, finished, processes_with, read,
    shell, sleep_token, upload, wait_execution,
};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn commands_run_with_their_environment_directory_and_inputs() {
    let cluster = Cluster::start(1, |_, _| {}).await;
    let mut action = shell(
        "printf '%s|%s|%s' \"$GREETING\" \"$(pwd | sed 's|.*/||')\" \"$(cat ../data/input)\" > out/env.txt; ./tool.sh > out/tool.txt; echo to-stderr >&2; exit 3",
    );
    action.environment.push(("GREETING".into(), "hello".into()));
    action.working_directory = "wd".into();
    action
        .inputs
        .insert("data/input".into(), (b"input bytes".to_vec(), false));
    action.inputs.insert(
        "wd/tool.sh".into(),
        (b"#!/bin/sh\necho tool ran".to_vec(), true),
    );
    let action = action
        .output_file("out/env.txt")
        .output_file("out/tool.txt")
        .build();
    upload(&cluster, 0, &action.blobs).await;
    let operations = execute(
        &mut cluster.exec(0).await,
        execute_request(action.action, false),
    )
    .await
    .unwrap();
    // Latest state first, then changes; the last one is done, with the response.
    let stages: Vec<i32> = operations
        .iter()
        .map(|op| {
            ExecuteOperationMetadata::decode(op.metadata.as_ref().unwrap().value.as_slice())
                .unwrap()
                .stage
        })
        .collect();
    assert_eq!(
        *stages.last().unwrap(),
        Stage::Completed as i32,
        "{stages:?}"
    );
    assert!(operations[..operations.len() - 1].iter().all(|op| !op.done));
    let result = finished(&operations).result.unwrap();
    assert_eq!(
        result.exit_code, 3,
        "a failing command is a result, not an error"
    );
    let mut bytestream = cluster.bytestream(0).await;
    let file = |path: &str| {
        let file = result.output_files.iter().find(|f| f.path == path).unwrap();
        Digest::from_proto(
            file.digest.as_ref().unwrap(),
            "d",
            mesh_reapi::DigestFunction::Sha256,
        )
        .unwrap()
    };
    let env = file("out/env.txt");
    let tool = file("out/tool.txt");
    assert_eq!(
        read(&mut bytestream, &env).await.unwrap().0,
        b"hello|wd|input bytes"
    );
    assert_eq!(read(&mut bytestream, &tool).await.unwrap().0, b"tool ran\n");
    let stderr = Digest::from_proto(
        result.stderr_digest.as_ref().unwrap(),
        "e",
        mesh_reapi::DigestFunction::Sha256,
    )
    .unwrap();
    assert_eq!(
        read(&mut bytestream, &stderr).await.unwrap().0,
        b"to-stderr\n"
    );
    // A failed action is not cached.
    let lookup = cluster
        .ac(0)
        .await
        .get_action_result(GetActionResultRequest {
            action_digest: Some(action.action.to_proto()),
            ..Default::default()
        })
        .await;
    assert_eq!(lookup.unwrap_err().code(), Code::NotFound);
    cluster.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn actions_cannot_change_the_cas_through_their_inputs() {
    let cluster = Cluster::start(1, |_, _| {}).await;
    let action = shell("chmod u+w input; echo changed > input; cat input > out")
        .input("input", b"original")
        .output_file("out")
        .build();
    upload(&cluster, 0, &action.blobs).await;
    let result = finished(
        &execute(
            &mut cluster.exec(0).await,
            execute_request(action.action, false),
        )
        .await
        .unwrap(),
    )
    .result
    .unwrap();
    assert_eq!(result.exit_code, 0);
    let (data, _) = read(&mut cluster.bytestream(0).await, &Digest::of(b"original"))
        .await
        .unwrap();
    assert_eq!(data, b"original");
    cluster.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_timeout_kills_the_process_group_and_is_deadline_exceeded() {
    let cluster = Cluster::start(1, |_, _| {}).await;
    // A background child; both it and the shell must die.
    let token = sleep_token();
    let action = shell(&format!("sleep {token} & echo $!; echo started >&2; wait"))
        // Long enough for the shell to print its child's pid on a loaded machine.
        .timeout(Duration::from_secs(2))
        .build();
    upload(&cluster, 0, &action.blobs).await;
    let response = finished(
        &execute(
            &mut cluster.exec(0).await,
            execute_request(action.action, false),
        )
        .await
        .unwrap(),
    );
    let status = response.status.clone().unwrap();
    assert_eq!(status.code, Code::DeadlineExceeded as i32, "{status:?}");
    assert!(status.message.contains("timeout"), "{}", status.message);
    let result = response.result.expect("the partial result");
    assert_eq!(result.exit_code, 128 + 9, "killed by SIGKILL");
    let stdout = Digest::from_proto(
        result.stdout_digest.as_ref().unwrap(),
        "o",
        mesh_reapi::DigestFunction::Sha256,
    )
    .unwrap();
    let (pid, _) = read(&mut cluster.bytestream(0).await, &stdout)
        .await
        .unwrap();
    let pid = String::from_utf8(pid).unwrap().trim().to_owned();
    assert!(!pid.is_empty(), "the child had started");
    eventually("the background child to be gone", async || {
        processes_with(&token).is_empty()
    })
    .await;
    // Not cached.
    let again = finished(
        &execute(
            &mut cluster.exec(0).await,
            execute_request(action.action, false),
        )
        .await
        .unwrap(),
    );
    assert!(!again.cached_result);
    cluster.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn identical_actions_in_flight_are_merged() {
    let cluster = Cluster::start(1, |_, _| {}).await;
    let gate = Gate::new();
    let action = shell(&format!("{}; date +%s%N > out", gate.wait()))
        .output_file("out")
        .build();
    upload(&cluster, 0, &action.blobs).await;
    let mut calls = Vec::new();
    for _ in 0..3 {
        let mut client = cluster.exec(0).await;
        let request = execute_request(action.action, true);
        calls.push(tokio::spawn(
            async move { execute(&mut client, request).await },
        ));
    }
    let reapi = cluster.replicas[0].reapi().clone();
    eventually("two callers to join the first", async || {
        reapi.stats().merged == 2
    })
    .await;
    gate.open();
    let mut names = Vec::new();
    let mut results = Vec::new();
    for call in calls {
        let operations = call.await.unwrap().unwrap();
        names.push(operations.last().unwrap().name.clone());
        results.push(finished(&operations).result.unwrap());
    }
    names.dedup();
    assert_eq!(names.len(), 1, "every caller follows one operation");
    assert!(results.windows(2).all(|w| w[0] == w[1]));
    let stats = cluster.replicas[0].stats();
    assert_eq!(stats.executed, 1, "{stats:?}");
    assert_eq!(stats.merged, 2, "{stats:?}");
    cluster.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn load_is_held_from_queueing_until_the_slot_is_given_back_within_max_concurrency() {
    let cluster = Cluster::start(1, |_, config| config.max_concurrency = 1).await;
    let load = cluster.replicas[0].node().load().clone();
    assert_eq!(load.max_concurrency(), 1);
    let gate = Gate::new();
    let mut calls = Vec::new();
    for i in 0..3 {
        let action = shell(&gate.wait()).salt(&i.to_string()).build();
        upload(&cluster, 0, &action.blobs).await;
        let mut client = cluster.exec(0).await;
        let request = execute_request(action.action, true);
        calls.push(tokio::spawn(
            async move { execute(&mut client, request).await },
        ));
    }
    // One runs; the router holds the other two until the slot frees (the cluster is full).
    let router = cluster.replicas[0].node().router().clone();
    eventually("one running, two held", async || {
        load.pending() == 1 && router.held_calls() == 2
    })
    .await;
    gate.open();
    let mut spans = Vec::new();
    for call in calls {
        let result = finished(&call.await.unwrap().unwrap()).result.unwrap();
        let metadata = result.execution_metadata.unwrap();
        let start = metadata.execution_start_timestamp.unwrap();
        let end = metadata.execution_completed_timestamp.unwrap();
        spans.push(((start.seconds, start.nanos), (end.seconds, end.nanos)));
    }
    spans.sort();
    for pair in spans.windows(2) {
        assert!(pair[0].1 <= pair[1].0, "one at a time: {spans:?}");
    }
    eventually("the load to drop to zero", async || load.pending() == 0).await;
    assert_eq!(
        load.peak_pending(),
        1,
        "never more than its one slot of work"
    );
    cluster.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn finished_operations_are_forgotten_after_their_retention_even_when_idle() {
    let cluster = Cluster::start(1, |_, config| {
        // Long enough to follow the operation right after it finished on a loaded machine.
        config.scheduler.retention = Duration::from_secs(2);
    })
    .await;
    let action = shell("true").build();
    upload(&cluster, 0, &action.blobs).await;
    let operations = execute(
        &mut cluster.exec(0).await,
        execute_request(action.action, false),
    )
    .await
    .unwrap();
    let name = operations.last().unwrap().name.clone();
    let followed = wait_execution(&mut cluster.exec(0).await, &name)
        .await
        .unwrap();
    assert!(followed[0].done, "still followable right after");
    let reapi = cluster.replicas[0].reapi().clone();
    eventually("the idle replica to forget the operation", async || {
        reapi.known_operations() == 0
    })
    .await;
    let error = wait_execution(&mut cluster.exec(0).await, &name)
        .await
        .unwrap_err();
    assert_eq!(error.code(), Code::NotFound);
    assert!(
        error.message().contains("Execute again"),
        "{}",
        error.message()
    );
    cluster.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn do_not_cache_keeps_results_out_of_the_cache() {
    let cluster = Cluster::start(1, |_, _| {}).await;
    let mut action = shell("echo once");
    action.do_not_cache = true;
    let action = action.build();
    upload(&cluster, 0, &action.blobs).await;
    for _ in 0..2 {
        let response = finished(
            &execute(
                &mut cluster.exec(0).await,
                execute_request(action.action, false),
            )
            .await
            .unwrap(),
        );
        assert!(!response.cached_result);
    }
    assert_eq!(cluster.replicas[0].stats().executed, 2);
    cluster.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn output_paths_are_typed_when_collected() {
    let cluster = Cluster::start(1, |_, _| {}).await;
    let mut action = shell("mkdir -p d && echo f > d/f && echo g > g && ln -s g link");
    action.output_paths = vec!["d".into(), "g".into(), "link".into(), "absent".into()];
    let action = action.build();
    upload(&cluster, 0, &action.blobs).await;
    let result = bounded(
        "the action",
        execute(
            &mut cluster.exec(0).await,
            execute_request(action.action, false),
        ),
    )
    .await
    .map(|ops| finished(&ops).result.unwrap())
    .unwrap();
    assert_eq!(result.output_files.len(), 1);
    assert_eq!(result.output_files[0].path, "g");
    assert_eq!(result.output_directories.len(), 1);
    assert_eq!(result.output_directories[0].path, "d");
    assert_eq!(result.output_symlinks.len(), 1);
    assert_eq!(result.output_symlinks[0].target, "g");
    cluster.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_program_that_does_not_exist_is_invalid_argument() {
    let cluster = Cluster::start(1, |_, _| {}).await;
    let mut action = shell("unused");
    action.arguments = vec!["/no/such/program".into()];
    let action = action.build();
    upload(&cluster, 0, &action.blobs).await;
    let response = finished(
        &execute(
            &mut cluster.exec(0).await,
            execute_request(action.action, false),
        )
        .await
        .unwrap(),
    );
    let status = response.status.unwrap();
    assert_eq!(status.code, Code::InvalidArgument as i32);
    assert!(
        status.message.contains("/no/such/program"),
        "{}",
        status.message
    );
    cluster.shutdown().await;
}

/// Each instance name has its own action cache and operations: a result cached in `ci` is not
/// seen by `dev` (through either replica, so not only on the replica that ran it), a result
/// written into `dev` does not replace `ci`'s, and `dev` runs the action itself. The CAS is
/// shared: `dev` needed no upload of its own.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn instances_keep_their_own_results_and_operations() {
    use mesh_reapi::proto::build::bazel::remote::execution::v2::{
        ActionResult, UpdateActionResultRequest,
    };

    let cluster = Cluster::start(2, |_, _| {}).await;
    let action = shell("echo built").build();
    upload(&cluster, 0, &action.blobs).await;
    let in_instance = |instance: &str| {
        let mut request = execute_request(action.action, false);
        request.instance_name = instance.to_owned();
        request
    };
    let lookup = |instance: &str| GetActionResultRequest {
        instance_name: instance.to_owned(),
        action_digest: Some(action.action.to_proto()),
        ..Default::default()
    };

    let ci = execute(&mut cluster.exec(0).await, in_instance("ci"))
        .await
        .unwrap();
    assert!(ci.last().unwrap().name.starts_with("ci/operations/"));
    let ci_result = finished(&ci).result.unwrap();
    assert_eq!(ci_result.exit_code, 0);
    for replica in 0..2 {
        let mut ac = cluster.ac(replica).await;
        let found = ac
            .get_action_result(lookup("ci"))
            .await
            .unwrap()
            .into_inner();
        assert_eq!(found, ci_result, "ci's result through replica {replica}");
        for other in ["dev", ""] {
            let error = ac.get_action_result(lookup(other)).await.unwrap_err();
            assert_eq!(
                error.code(),
                Code::NotFound,
                "instance {other:?} through replica {replica} sees ci's result"
            );
        }
    }

    // A result written into dev (as a developer's machine uploads one) stays dev's.
    let poisoned = ActionResult {
        exit_code: 42,
        ..Default::default()
    };
    cluster
        .ac(1)
        .await
        .update_action_result(UpdateActionResultRequest {
            instance_name: "dev".to_owned(),
            action_digest: Some(action.action.to_proto()),
            action_result: Some(poisoned.clone()),
            ..Default::default()
        })
        .await
        .unwrap();
    let mut ac = cluster.ac(0).await;
    let dev = ac
        .get_action_result(lookup("dev"))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(dev.exit_code, 42);
    let ci_again = ac
        .get_action_result(lookup("ci"))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(ci_again, ci_result, "dev's write replaced ci's result");
    let ci_cached = finished(
        &execute(&mut cluster.exec(1).await, in_instance("ci"))
            .await
            .unwrap(),
    );
    assert!(ci_cached.cached_result);
    assert_eq!(ci_cached.result.unwrap().exit_code, 0);

    // A third instance finds nothing cached and runs the action itself.
    let executed = cluster.replicas[0].stats().executed + cluster.replicas[1].stats().executed;
    let team = execute(&mut cluster.exec(1).await, in_instance("team/b"))
        .await
        .unwrap();
    assert!(team.last().unwrap().name.starts_with("team/b/operations/"));
    let team = finished(&team);
    assert!(!team.cached_result);
    assert_eq!(team.result.unwrap().exit_code, 0);
    assert_eq!(
        cluster.replicas[0].stats().executed + cluster.replicas[1].stats().executed,
        executed + 1
    );
    cluster.shutdown().await;
}

/// A peer whose `UpdateActionResult` never answers: it says when the call arrived.
mod staller {
    use std::sync::{
        Arc,
        atomic::{AtomicUsize, Ordering},
    };

    use mesh_reapi::proto::build::bazel::remote::execution::v2::{
        ActionResult, GetActionResultRequest, UpdateActionResultRequest,
        action_cache_server::{ActionCache, ActionCacheServer},
    };
    use tokio::sync::Notify;
    use tonic::{Request, Response, Status};

    #[derive(Clone, Default)]
    pub(super) struct Staller {
        pub(super) arrived: Arc<Notify>,
        /// `UpdateActionResult` calls received so far.
        pub(super) calls: Arc<AtomicUsize>,
    }

    impl Staller {
        pub(super) fn routes(self) -> tonic::service::Routes {
            tonic::service::Routes::new(ActionCacheServer::new(self))
        }
    }

    #[tonic::async_trait]
    impl ActionCache for Staller {
        async fn get_action_result(
            &self,
            _: Request<GetActionResultRequest>,
        ) -> Result<Response<ActionResult>, Status> {
            Err(Status::not_found("a staller keeps no results"))
        }

        async fn update_action_result(
            &self,
            _: Request<UpdateActionResultRequest>,
        ) -> Result<Response<ActionResult>, Status> {
            self.calls.fetch_add(1, Ordering::SeqCst);
            self.arrived.notify_one();
            std::future::pending().await
        }
    }
}

/// Once an action gives back its slot it is no longer its replica's load: placing its result
/// on its owners is calls to peers, and the route layer may send the replica its next action
/// meanwhile. A drain still waits for that placement, also when the client went away: here
/// the owner never answers, so the drain is cut at its grace period instead of reporting
/// that everything finished.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_action_placing_its_result_is_not_load_and_a_drain_waits_for_it() {
    let mut cluster = Cluster::start(1, |_, config| config.max_concurrency = 1).await;
    let staller = staller::Staller::default();
    let arrived = staller.arrived.clone();
    // The staller is the only other member: it owns the result's copy.
    let member = cluster.join_fake("staller", staller.routes()).await;
    let action = shell("true").salt("placing").build();
    upload(&cluster, 0, &action.blobs).await;
    let mut client = cluster.exec(0).await;
    let request = execute_request(action.action, true);
    let call = tokio::spawn(async move { execute(&mut client, request).await });
    bounded("the result to be placed on the staller", arrived.notified()).await;
    let r0 = cluster.replicas.remove(0);
    assert_eq!(
        r0.node().load().pending(),
        0,
        "an action placing its result holds no load"
    );
    assert!(!call.is_finished(), "the operation is still placing");
    // The client goes away; the operation goes on placing its result.
    call.abort();
    let mut config = mesh_reapi::DrainConfig::default();
    config.grace = Duration::from_secs(2);
    let report = r0.drain(config).await;
    assert!(
        !report.drained.finished,
        "the drain waited for the placement, and was cut: {report:?}"
    );
    assert_eq!(report.drained.pending, 0, "{report:?}");
    member.shutdown().await;
    cluster.shutdown().await;
}

/// Placements that do not count as load are bounded: four a slot. Past that, an action stays
/// its replica's load until its own placement is done, so owners that do not answer slow the
/// route layer down instead of letting finished actions pile up.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn past_four_placements_a_slot_an_action_placing_its_result_is_load_again() {
    let cluster = Cluster::start(1, |_, config| config.max_concurrency = 1).await;
    let staller = staller::Staller::default();
    let calls = staller.calls.clone();
    let member = cluster.join_fake("staller", staller.routes()).await;
    let mut running = Vec::new();
    for i in 0..5 {
        let action = shell("true").salt(&format!("pile-{i}")).build();
        upload(&cluster, 0, &action.blobs).await;
        let mut client = cluster.exec(0).await;
        // Marked as forwarded, so it runs on r0: the route layer would send the actions that
        // find r0 busy to the staller, a member with room.
        let mut request = tonic::Request::new(execute_request(action.action, true));
        request.metadata_mut().insert(
            mesh_route::FORWARDED_BY,
            tonic::metadata::AsciiMetadataValue::from_static("staller"),
        );
        running.push(tokio::spawn(
            async move { execute(&mut client, request).await },
        ));
    }
    let load = cluster.replicas[0].node().load().clone();
    eventually(
        "five results stuck on their way to the staller",
        async || calls.load(std::sync::atomic::Ordering::SeqCst) == 5,
    )
    .await;
    assert_eq!(
        load.pending(),
        1,
        "the fifth placement at once is load again (one slot: four are not)"
    );
    for call in running {
        call.abort();
    }
    member.shutdown().await;
    cluster.shutdown().await;
}
