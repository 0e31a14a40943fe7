//! Actions touch only their own tree: the server's file work stays beneath the action's
//! directory, and the sandbox keeps the action itself away from the data directory, the
//! network and the host, with nothing outliving it.
//!
//! Tests marked "sandbox" need bubblewrap; they skip with a message where it is missing,
//! unless `SANDBOX_TEST_REQUIRED=1` (which `.ci/run` sets after installing it).

use std::time::Duration;

use mesh_reapi::{
    Digest,
    proto::build::bazel::remote::execution::v2::{
        Directory, DirectoryNode, ExecuteResponse, FileNode, SymlinkNode,
    },
};
use prost::Message as _;
use tonic::Code;

use crate::support::{
    Built, Cluster, TestAction, eventually, execute, execute_request, finished, processes_with,
    read, shell, sleep_token, upload,
};

async fn run(cluster: &Cluster, action: &TestAction) -> ExecuteResponse {
    run_built(cluster, action.build()).await
}

async fn run_over(
    cluster: &Cluster,
    action: &TestAction,
    root: impl FnOnce(&mut dyn FnMut(Vec<u8>) -> Digest) -> Digest,
) -> ExecuteResponse {
    run_built(cluster, action.build_with(root)).await
}

/// Uploads a built action to replica 0 and runs it there, uncached.
async fn run_built(cluster: &Cluster, built: Built) -> ExecuteResponse {
    upload(cluster, 0, &built.blobs).await;
    finished(
        &execute(
            &mut cluster.exec(0).await,
            execute_request(built.action, true),
        )
        .await
        .unwrap(),
    )
}

fn refused(response: &ExecuteResponse, code: Code, needles: &[&str]) {
    let status = response
        .status
        .as_ref()
        .unwrap_or_else(|| panic!("refused with {code:?}, got {response:?}"));
    assert_eq!(status.code, code as i32, "{status:?}");
    for needle in needles {
        assert!(
            status.message.contains(needle),
            "{needle:?} in {}",
            status.message
        );
    }
}

fn stdout(cluster: &Cluster, response: &ExecuteResponse) -> String {
    let digest = Digest::from_proto(
        response
            .result
            .as_ref()
            .unwrap()
            .stdout_digest
            .as_ref()
            .unwrap(),
        "stdout",
        mesh_reapi::DigestFunction::Sha256,
    )
    .unwrap();
    let path = cluster.replicas[0]
        .reapi()
        .cluster()
        .local()
        .path_of(&digest);
    String::from_utf8(std::fs::read(path).unwrap_or_default()).unwrap()
}

/// Whether the replicas run actions sandboxed; `false` (and a message) means: skip.
fn sandboxed(cluster: &Cluster, test: &str) -> bool {
    available(
        cluster.replicas[0].reapi().sandboxed(),
        "SANDBOX_TEST_REQUIRED",
        test,
        "actions run without a sandbox here (install bubblewrap)",
    )
}

/// Whether the replicas set process and memory limits; `false` (and a message) means: skip.
fn limited(cluster: &Cluster, test: &str) -> bool {
    available(
        cluster.replicas[0].reapi().limits_resources(),
        "CGROUP_TEST_REQUIRED",
        test,
        "no control groups for actions here",
    )
}

/// `here`, or a skip with `why`; a panic instead if `required` (an environment variable) is 1.
fn available(here: bool, required: &str, test: &str, why: &str) -> bool {
    if here {
        return true;
    }
    assert!(
        std::env::var_os(required).is_none_or(|v| v != "1"),
        "{test}: required ({required}=1), but {why}"
    );
    eprintln!("{test}: skipped, {why}");
    false
}

/// A directory outside every action, visible (read-only) inside the sandbox.
fn host_dir() -> tempfile::TempDir {
    tempfile::tempdir_in(env!("CARGO_TARGET_TMPDIR")).unwrap()
}

fn file(add: &mut dyn FnMut(Vec<u8>) -> Digest, name: &str, content: &[u8]) -> FileNode {
    FileNode {
        name: name.to_owned(),
        digest: Some(add(content.to_vec()).to_proto()),
        is_executable: false,
        node_properties: None,
    }
}

fn symlink(name: &str, target: &str) -> SymlinkNode {
    SymlinkNode {
        name: name.to_owned(),
        target: target.to_owned(),
        node_properties: None,
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn input_names_must_be_single_components_each_once() {
    let cluster = Cluster::start(1, |_, _| {}).await;
    for (i, name) in ["..", ".", "", "a/b"].into_iter().enumerate() {
        let response = run_over(&cluster, &shell("true").salt(&i.to_string()), |add| {
            let f = file(add, name, b"x");
            add(Directory {
                files: vec![f],
                ..Default::default()
            }
            .encode_to_vec())
        })
        .await;
        refused(
            &response,
            Code::InvalidArgument,
            &[&format!("{name:?}"), "one non-empty path component"],
        );
    }
    // The same name twice: as two files, and as a file and a directory.
    let response = run_over(&cluster, &shell("true").salt("dup files"), |add| {
        let (a, b) = (file(add, "x", b"1"), file(add, "x", b"2"));
        add(Directory {
            files: vec![a, b],
            ..Default::default()
        }
        .encode_to_vec())
    })
    .await;
    refused(&response, Code::InvalidArgument, &["\"x\" twice"]);
    let response = run_over(&cluster, &shell("true").salt("dup kinds"), |add| {
        let f = file(add, "x", b"1");
        let sub = add(Directory::default().encode_to_vec());
        add(Directory {
            files: vec![f],
            directories: vec![DirectoryNode {
                name: "x".into(),
                digest: Some(sub.to_proto()),
            }],
            ..Default::default()
        }
        .encode_to_vec())
    })
    .await;
    refused(&response, Code::InvalidArgument, &["\"x\" twice"]);
    cluster.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn output_paths_and_working_directories_stay_relative() {
    let cluster = Cluster::start(1, |_, _| {}).await;
    for (i, path) in ["/etc/passwd", "../escape", "a/../../escape", "./a"]
        .into_iter()
        .enumerate()
    {
        let response = run(
            &cluster,
            &shell("true").salt(&format!("file {i}")).output_file(path),
        )
        .await;
        refused(
            &response,
            Code::InvalidArgument,
            &["output file", &format!("{path:?}")],
        );
        let mut paths = shell("true").salt(&format!("path {i}"));
        paths.output_paths = vec![path.to_owned()];
        refused(
            &run(&cluster, &paths).await,
            Code::InvalidArgument,
            &["output path"],
        );
        let mut wd = shell("true").salt(&format!("wd {i}"));
        wd.working_directory = path.to_owned();
        refused(
            &run(&cluster, &wd).await,
            Code::InvalidArgument,
            &["the working directory"],
        );
    }
    cluster.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_input_symlink_out_of_the_root_never_leads_the_server_out() {
    let cluster = Cluster::start(1, |_, _| {}).await;
    let host = host_dir();
    let absolute = host.path().display().to_string();
    // The same host folder, reached from the input root with `..`.
    let relative = format!("{}{}", "../".repeat(40), absolute.trim_start_matches('/'));
    for (i, target) in [absolute.as_str(), relative.as_str()]
        .into_iter()
        .enumerate()
    {
        let root = |add: &mut dyn FnMut(Vec<u8>) -> Digest| {
            add(Directory {
                symlinks: vec![symlink("d", target)],
                ..Default::default()
            }
            .encode_to_vec())
        };
        // As the parent of an output: the server would create `d/x` on the host.
        let response = run_over(
            &cluster,
            &shell("true")
                .salt(&format!("parent {i}"))
                .output_file("d/x/f"),
            root,
        )
        .await;
        refused(&response, Code::InvalidArgument, &["leads out", "symlink"]);
        // As the working directory.
        let mut wd = shell("touch planted").salt(&format!("wd {i}"));
        wd.working_directory = "d/w".into();
        refused(
            &run_over(&cluster, &wd, root).await,
            Code::InvalidArgument,
            &["the working directory", "leads out"],
        );
        assert_eq!(
            std::fs::read_dir(host.path()).unwrap().count(),
            0,
            "nothing was created on the host through {target}"
        );
    }
    cluster.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn outputs_are_collected_beneath_the_root_and_symlinks_are_not_followed() {
    let cluster = Cluster::start(1, |_, _| {}).await;
    let host = host_dir();
    let secret = b"a host file no action may return";
    std::fs::write(host.path().join("secret.txt"), secret).unwrap();
    let h = host.path().display();
    // The parent the server made for an output, turned by the action into a link out: the
    // output is refused, not read.
    let response = run(
        &cluster,
        &shell(&format!("rmdir d && ln -s {h} d")).output_file("d/secret.txt"),
    )
    .await;
    refused(
        &response,
        Code::FailedPrecondition,
        &["\"d/secret.txt\"", "leads out"],
    );
    let response = run(
        &cluster,
        &shell(&format!("rmdir tree && ln -s {h} tree"))
            .salt("dir")
            .output_directory("tree/sub"),
    )
    .await;
    refused(&response, Code::FailedPrecondition, &["leads out"]);
    // An output that is itself a link out is returned as a link.
    let response = run(
        &cluster,
        &shell(&format!("ln -s {h}/secret.txt out")).output_file("out"),
    )
    .await;
    assert!(
        response.status.as_ref().is_none_or(|s| s.code == 0),
        "{response:?}"
    );
    let result = response.result.unwrap();
    assert!(result.output_files.is_empty(), "{result:?}");
    #[allow(deprecated)]
    let links = &result.output_file_symlinks;
    assert_eq!(links.len(), 1);
    assert_eq!(links[0].target, format!("{h}/secret.txt"));
    // A link inside an output directory stays a link too.
    let response = run(
        &cluster,
        &shell(&format!("mkdir tree && ln -s {h}/secret.txt tree/l")).output_directory("tree"),
    )
    .await;
    let result = response.result.unwrap();
    assert_eq!(result.output_directories.len(), 1);
    assert!(
        !cluster.replicas[0]
            .reapi()
            .cluster()
            .local()
            .contains(&Digest::of(secret)),
        "the host file never entered the CAS"
    );
    cluster.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_action_can_neither_see_nor_change_the_data_directory() {
    let cluster = Cluster::start(1, |_, _| {}).await;
    if !sandboxed(&cluster, "data directory") {
        return cluster.shutdown().await;
    }
    let blob = b"a stored blob an action must not poison".to_vec();
    let digest = Digest::of(&blob);
    upload(&cluster, 0, &[(digest, blob.clone())]).await;
    let path = cluster.replicas[0]
        .reapi()
        .cluster()
        .local()
        .path_of(&digest);
    let data = cluster.dirs[0].path().display().to_string();
    let script = format!(
        "test -e '{data}/cas' && echo visible || echo hidden; \
         printf tampered > '{p}' 2>/dev/null && echo wrote || echo blocked; \
         mkdir -p '{data}/cas' && printf x > '{p}' 2>/dev/null; true",
        p = path.display()
    );
    let response = run(&cluster, &shell(&script)).await;
    assert_eq!(stdout(&cluster, &response), "hidden\nblocked\n");
    let (read_back, _) = read(&mut cluster.bytestream(0).await, &digest)
        .await
        .unwrap();
    assert_eq!(read_back, blob, "the blob served is the blob stored");
    assert_eq!(std::fs::read(&path).unwrap(), blob);
    cluster.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_action_reaches_the_network_only_when_its_platform_asks() {
    let cluster = Cluster::start(1, |_, _| {}).await;
    if !sandboxed(&cluster, "network") {
        return cluster.shutdown().await;
    }
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    listener.set_nonblocking(true).unwrap();
    let port = listener.local_addr().unwrap().port();
    let connect = |salt: &str| {
        let mut action = shell(&format!(
            "bash -c 'exec 3<>/dev/tcp/127.0.0.1/{port}' 2>/dev/null && echo connected || echo refused"
        ))
        .salt(salt);
        action.environment = vec![("PATH".into(), "/bin:/usr/bin".into())];
        action
    };
    let response = run(&cluster, &connect("closed")).await;
    assert_eq!(stdout(&cluster, &response), "refused\n");
    assert!(
        listener.accept().is_err(),
        "no connection reached the listener"
    );
    let mut open = connect("open");
    open.platform = vec![(mesh_reapi::NETWORK_PROPERTY.into(), "on".into())];
    let response = run(&cluster, &open).await;
    assert_eq!(stdout(&cluster, &response), "connected\n");
    cluster.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn nothing_outlives_an_action_and_its_directory_goes() {
    let cluster = Cluster::start(1, |_, _| {}).await;
    let work = cluster.dirs[0].path().join("work");
    for (case, script, timeout) in [
        ("success", "sleep {token} & echo started", None),
        ("failure", "sleep {token} & exit 3", None),
        (
            "timeout",
            "sleep {token} & wait",
            Some(Duration::from_millis(300)),
        ),
    ] {
        let token = sleep_token();
        let mut action = shell(&script.replace("{token}", &token)).salt(case);
        action.timeout = timeout;
        let response = run(&cluster, &action).await;
        let exit = response.result.as_ref().map(|r| r.exit_code);
        match case {
            "success" => assert_eq!(exit, Some(0), "{response:?}"),
            "failure" => assert_eq!(exit, Some(3), "{response:?}"),
            _ => assert_eq!(
                response.status.as_ref().map(|s| s.code),
                Some(Code::DeadlineExceeded as i32)
            ),
        }
        eventually(
            &format!("{case}: the action's background process to be gone"),
            async || processes_with(&token).is_empty(),
        )
        .await;
        let left: Vec<_> = std::fs::read_dir(&work)
            .unwrap()
            .flatten()
            .map(|e| e.path())
            .collect();
        assert!(
            left.is_empty(),
            "{case}: the action's directory is gone: {left:?}"
        );
    }
    cluster.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_action_is_held_to_its_process_and_memory_limits() {
    let cluster = Cluster::start(1, |_, config| {
        config.resources.max_processes = Some(16);
        config.resources.max_memory_bytes = Some(64 << 20);
    })
    .await;
    if !limited(&cluster, "limits") {
        return cluster.shutdown().await;
    }
    // Forty children of 16 allowed: forks fail, and the action sees it.
    let forks = forty_children();
    let response = run(&cluster, &forks).await;
    let result = response.result.as_ref().expect("a result");
    assert_ne!(
        result.exit_code, 0,
        "forking past the limit fails: {response:?}"
    );
    // 200 MB held by `tail` (no newline in /dev/zero) of 64 MiB allowed: the kernel kills it.
    let memory = shell("head -c 200000000 /dev/zero | tail > /dev/null; echo $?");
    let response = run(&cluster, &memory).await;
    assert_eq!(
        stdout(&cluster, &response),
        "137\n",
        "killed by the OOM killer"
    );
    // Within the limits, the same commands run.
    let small = shell(
        "head -c 1000000 /dev/zero | tail > /dev/null; for i in 1 2 3; do sleep 0.1 & done; wait; echo ok",
    );
    let response = run(&cluster, &small).await;
    assert_eq!(stdout(&cluster, &response), "ok\n");
    cluster.shutdown().await;
}

/// An action that starts forty children, past the limits of 16 these tests set.
fn forty_children() -> TestAction {
    shell(
        "n=0; for i in $(seq 1 40); do sleep 2 & n=$((n+1)); done 2>/dev/null; \
         echo started; wait",
    )
}

/// With a process limit only, on cgroup v1 an action is born in its group: the thread that
/// spawns it steps into the group for the spawn and back out (`cgroups` module docs). The
/// limit holds the same, and no thread of the replica is left in an action's group.
#[test]
fn an_action_with_a_process_limit_only_is_held_to_it_and_no_replica_thread_stays_in_its_group() {
    // A runtime of its own, with a thread name no other test uses: the threads that spawn
    // this test's actions (and only they, as tests run side by side) carry it.
    const THREADS: &str = "born-in-group";
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .thread_name(THREADS)
        .enable_all()
        .build()
        .unwrap();
    runtime.block_on(async {
        let cluster = Cluster::start(1, |_, config| {
            config.resources.max_processes = Some(16);
            config.resources.max_memory_bytes = None;
        })
        .await;
        if !limited(&cluster, "process limit only") {
            return cluster.shutdown().await;
        }
        let forks = forty_children();
        let within = shell("for i in 1 2 3; do sleep 0.1 & done; wait; echo ok");
        // Several at once, so spawns from different threads overlap.
        let (a, b, c, d) = tokio::join!(
            run(&cluster, &forks),
            run(&cluster, &within),
            run(&cluster, &forks),
            run(&cluster, &within),
        );
        for response in [&a, &c] {
            let result = response.result.as_ref().expect("a result");
            assert_ne!(
                result.exit_code, 0,
                "forking past the limit fails: {response:?}"
            );
        }
        for response in [&b, &d] {
            assert_eq!(stdout(&cluster, response), "ok\n", "{response:?}");
        }
        // Every thread of this runtime is in the process's groups.
        let process = std::fs::read_to_string("/proc/self/cgroup").unwrap();
        let mut checked = 0;
        for task in std::fs::read_dir("/proc/self/task").unwrap().flatten() {
            let name = std::fs::read_to_string(task.path().join("comm")).unwrap_or_default();
            if name.trim_end() != THREADS {
                continue;
            }
            let Ok(groups) = std::fs::read_to_string(task.path().join("cgroup")) else {
                continue; // the thread has ended
            };
            assert_eq!(
                groups,
                process,
                "thread {:?} is in the process's groups",
                task.file_name()
            );
            checked += 1;
        }
        assert!(checked >= 2, "the runtime's threads were found ({checked})");
        cluster.shutdown().await;
    });
}
