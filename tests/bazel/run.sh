#!/usr/bin/env bash
# Bazel builds and tests this workspace through clusters of mesh-reapi replicas.
#
#   tests/bazel/run.sh [--no-check-spread] [--replicas N] [--jobs N] [--sandbox MODE] [--keep]
#
#  1. Builds the workspace locally once: the reference outputs.
#  2. Starts `examples/reapi-cluster` (N replicas in one process, default 3, ephemeral ports).
#  Downloading every output (Bazel's default):
#  3. `bazel build` and `bazel test` with the flags the example prints
#     (--remote_executor=grpc://… of the first replica, --spawn_strategy=remote,
#     --noremote_local_fallback): every action must run remotely, the tests must pass and the
#     outputs must be byte-identical to the local ones.
#  4. `bazel clean`, then builds again through the *second* replica and tests through the
#     third: every action must be a remote cache hit (parsed from Bazel's summary line), though
#     the results were written on another replica.
#  5. `bazel clean`, then builds again with --noremote_accept_cached while the last replica is
#     crashed (SIGUSR1 to the cluster) as soon as it runs an action: the build must pass and
#     its outputs must again equal the local ones.
#  6. Stops the cluster (SIGTERM) and reads its per-node table: every replica must have
#     executed actions (the route layer spreads Execute; --no-check-spread turns this off).
#  Build without the Bytes, on a second, fresh cluster (in the first, Bazel has uploaded every
#  intermediate output to the first replica, which would hide a replica answering
#  FindMissingBlobs from its own store). Bazel 4.2.3 cannot upload an input it never
#  downloaded: an output any replica holds but the one asked reports missing fails the action
#  ("Exit 34: … errors during bulk transfer"; the message names the file).
#  7. `bazel clean`, then `bazel build` and `bazel test` with --remote_download_minimal through
#     the first replica: every action must run remotely and the tests must pass (bazel-bin
#     stays nearly empty: the tests are the comparison).
#  8. `bazel clean`, then `bazel build --remote_download_toplevel` through the *second*
#     replica: every action must be a remote cache hit, and the top-level outputs it downloads
#     (written through the first replica in 7) must be byte-identical to the local ones.
#  9. `bazel clean`, then a --remote_download_minimal --noremote_accept_cached build while the
#     last replica is crashed, as in 5, and the tests run again: both must pass. Then
#     `bazel clean` and a --remote_download_toplevel build through the first replica (all
#     remote cache hits) fetches that build's top-level outputs to compare with the local ones.
# 10. Stops the second cluster and checks its table as in 6.
# 11. A cluster that checks bearer tokens: build and tests with
#     --remote_header=authorization=Bearer …, a build without the token refused
#     UNAUTHENTICATED, and a read-only token that gets remote cache hits and whose uploads of
#     local results are refused PERMISSION_DENIED while the build goes on.
# 12. A cluster that speaks only TLS (a test CA made with openssl): build and tests through
#     grpcs:// with --tls_certificate, by the official Bazel 2.1.0 from the npm registry
#     (Debian's Bazel 4.2.3 cannot speak TLS, see the step), and refused when Bazel trusts
#     another CA.
# 13. A rolling restart: a build through a TCP load balancer of the test's own
#     (tests/bazel/proxy.py, round-robin, as a Service), during which every replica in turn is
#     drained and restarted on its port and data directory (SIGUSR2 to the cluster). The build
#     must pass with no remote error in Bazel's log, outputs equal to the local build's, and
#     every action executed exactly once.
# 14. The deployable binary: two `mesh-node --api reapi` processes with the default
#     configuration (only their ids, loopback addresses with ephemeral ports, the seed to join
#     and a data directory), a clean build through the second with outputs equal to the local
#     build's, and their `reapi_*` Prometheus series scraped afterwards: the executions they
#     report add up to Bazel's remote processes.
# Each build prints a `timing:` line (Bazel's elapsed time and critical path: local,
# download-all, minimal, the two with a crash), all repeated side by side at the end. Loading
# and analysis run first (--nobuild), so the elapsed times compare execution alone.
#
# Needs bazel (Debian's bazel-bootstrap 4.2.3), cargo, openssl and npm (or MESH_TLS_BAZEL, the
# path of a Bazel that speaks TLS). Exits non-zero with a message
# naming the failed step. Everything it creates lives in one temporary directory (kept with
# --keep or MESH_REAPI_KEEP=1).
set -euo pipefail

here="$(cd "$(dirname "$0")" && pwd)"
root="$(cd "$here/../.." && pwd)"
check_spread="${MESH_REAPI_CHECK_SPREAD:-1}"
replicas=3
jobs=32
keep="${MESH_REAPI_KEEP:-0}"
# Actions run in the sandbox (bubblewrap) where it works; with SANDBOX_TEST_REQUIRED=1 (.ci/run
# sets it once bubblewrap works) the clusters must report that they do.
sandbox="auto"
while [[ $# -gt 0 ]]; do
    case "$1" in
        --check-spread) check_spread=1 ;;
        --no-check-spread) check_spread=0 ;;
        --replicas) replicas="$2"; shift ;;
        --jobs) jobs="$2"; shift ;;
        --sandbox) sandbox="$2"; shift ;;
        --keep) keep=1 ;;
        -h|--help) sed -n '/^set -euo pipefail$/q; 2,$p' "$0"; exit 0 ;;
        *) echo "run.sh: unknown argument $1 (see --help)" >&2; exit 2 ;;
    esac
    shift
done

step() { printf '\n--> %s\n' "$*"; }
fail() { printf '\nrun.sh: FAILED: %s\n' "$*" >&2; exit 1; }

command -v bazel >/dev/null || fail "bazel is not installed (apt-get install -y bazel-bootstrap)"
command -v cargo >/dev/null || fail "cargo is not installed"

work="$(mktemp -d "${TMPDIR:-/tmp}/mesh-reapi-bazel.XXXXXX")"
cluster_pid=""
node_pids=()
bazel_root="$work/bazel-root"
started=$SECONDS
timings=()

cleanup() {
    local status=$?
    for pid in "${node_pids[@]}"; do kill -TERM "$pid" 2>/dev/null || true; done
    if [[ -n "$cluster_pid" ]] && kill -0 "$cluster_pid" 2>/dev/null; then
        kill -TERM "$cluster_pid" 2>/dev/null || true
        wait "$cluster_pid" 2>/dev/null || true
    fi
    for base in local remote; do
        if [[ -d "$work/$base" ]]; then
            bazel --output_user_root="$bazel_root" --output_base="$work/$base" shutdown >/dev/null 2>&1 || true
        fi
    done
    if [[ -n "${tls_bazel:-}" && -d "$work/tls-base" ]]; then
        "$tls_bazel" --output_user_root="$work/tls-bazel-root" --output_base="$work/tls-base" shutdown >/dev/null 2>&1 || true
    fi
    if [[ "$keep" == 1 ]]; then
        echo "run.sh: kept $work"
    else
        rm -rf "$work"
    fi
    exit "$status"
}
trap cleanup EXIT

# Bazel outside the source tree: a copy of the workspace, output bases in $work.
cp -r "$here/." "$work/ws"
rm -f "$work/ws/run.sh"
# A source over 1 MiB, made here rather than kept in the repository: Bazel uploads it with
# ByteStream.Write, which the receiving replica passes on to the blob's owners as it arrives
# (and, when an owner was killed, places on the next one before answering).
mkdir -p "$work/ws/big"
seq 1 300000 >"$work/ws/big/numbers.txt"
cat >"$work/ws/big/BUILD" <<'BUILD'
genrule(
    name = "numbers_sum",
    srcs = ["numbers.txt"],
    outs = ["numbers_sum.txt"],
    cmd = "(wc -c < $<; sha256sum < $<) > $@",
)
BUILD
cd "$work/ws"
bazel_in() { # bazel_in <local|remote> <command> [args…]
    local base="$1"; shift
    local command="$1"; shift
    local verbose=()
    # A failed remote action then names the file it could not upload.
    [[ "$command" == build || "$command" == test ]] && verbose=(--verbose_failures)
    timeout 900 bazel --output_user_root="$bazel_root" --output_base="$work/$base" --nohome_rc \
        "$command" --nosandbox_debug --symlink_prefix=/ --color=no --curses=no "${verbose[@]}" "$@"
}

# Fails naming <what>, Bazel's first error and the first input it could not upload (never
# downloaded: "Exit 34") (its whole output is already on stdout).
bazel_failed() { # bazel_failed <log> <what>
    local error missing
    error="$(grep -m1 -E '^ERROR: ' "$1" | sed -E 's/^ERROR: //')" || true
    missing="$(grep -m1 -oE 'FileNotFoundException: [^ ]+' "$1" | sed -E 's/^[^ ]+ //; s|^.*/(bazel-out/)|\1|')" || true
    [[ "$error" != *"$missing"* ]] || missing=""
    fail "$2${error:+: $error}${missing:+ (input not in the local output tree: $missing)}"
}

# "INFO: 45 processes: 16 internal, 29 remote." → every kind with its count, one per line.
process_kinds() { # process_kinds <log>
    local line
    line="$(grep -E '^INFO: [0-9]+ process(es)?: ' "$1" | tail -1)" ||
        fail "no process summary line in $1"
    echo "$line" | sed -E 's/^INFO: [0-9]+ process(es)?: //; s/\.$//' | tr ',' '\n' | sed -E 's/^ +//'
}

# Fails unless every process of the last summary in <log> is internal or of <kind>.
only_kind() { # only_kind <log> <kind> <what>
    local log="$1" kind="$2" what="$3" other count
    other="$(process_kinds "$log" | grep -vE "^[0-9]+ (internal|$kind)$" || true)"
    [[ -z "$other" ]] || fail "$what: expected only '$kind' and internal processes, got: $(process_kinds "$log" | paste -sd, - | sed "s/,/, /g")"
    count="$(process_kinds "$log" | sed -nE "s/^([0-9]+) $kind$/\1/p")"
    [[ -n "$count" && "$count" -gt 0 ]] || fail "$what: no '$kind' process at all"
    echo "$what: $(process_kinds "$log" | paste -sd, - | sed "s/,/, /g")"
}

# Fails unless <log> reports every test passed, <executed> of them run (a number, or "[0-9]+").
tests_passed() { # tests_passed <log> <executed> <what>
    grep -qE "^Executed $2 out of [0-9]+ tests?: [0-9]+ tests? pass" "$1" ||
        fail "$3: $(grep -m1 -E '^Executed [0-9]+ out of' "$1" || echo 'no test summary')"
}

# "INFO: Elapsed time: 12.3s, Critical Path: 4.5s" → "<what>: elapsed 12.3 s, critical path 4.5 s",
# printed and kept for the summary at the end.
timing() { # timing <log> <what>
    local times elapsed critical line
    times="$(sed -nE 's/^INFO: Elapsed time: ([0-9.]+)s, Critical Path: ([0-9.]+)s.*/\1 \2/p' "$1" | tail -1)"
    [[ -n "$times" ]] || return 0
    read -r elapsed critical <<<"$times"
    line="timing: $2: elapsed $elapsed s, critical path $critical s"
    echo "$line"
    timings+=("$line")
}

# Runfiles trees and manifests are Bazel's local bookkeeping (absolute paths), not outputs.
list_outputs() { (cd "$1" && find . -type f ! -path '*.runfiles/*' ! -name '*.runfiles_manifest' | sort); }

# Every output the remote build has in bazel-bin must be byte-identical to the local one, and
# at least <least> of them must come from remote actions (not the *.params files Bazel writes
# itself). With <partial>, some outputs must be missing (Build without the Bytes in effect).
compare_present() { # compare_present <what> <least> [partial]
    local what="$1" least="$2" partial="${3:-}" file compared=0 fetched=0 total names=()
    total="$(list_outputs "$local_bin" | wc -l)"
    while read -r file; do
        [[ -f "$local_bin/$file" ]] || fail "$what: $file is in the remote bazel-bin, not in the local one"
        cmp -s "$local_bin/$file" "$remote_bin/$file" ||
            fail "$what: output $file differs between the local and the remote build"
        compared=$((compared + 1))
        [[ "$file" == *.params ]] || fetched=$((fetched + 1))
        names+=("${file#./}")
    done < <(list_outputs "$remote_bin")
    [[ "$fetched" -ge "$least" ]] ||
        fail "$what: $fetched outputs of remote actions in bazel-bin to compare, expected at least $least"
    if [[ -n "$partial" ]]; then
        [[ "$compared" -lt "$total" ]] ||
            fail "$what: all $total outputs are in bazel-bin: Build without the Bytes not in effect"
        echo "$what: $compared of the $total local outputs in bazel-bin ($fetched from remote actions), byte-identical${names[*]:+: ${names[*]}}"
    else
        echo "$what: $compared outputs byte-identical"
    fi
}

step "building the reapi-cluster example"
(cd "$root" && cargo build --locked --example reapi-cluster) || fail "cargo build --example reapi-cluster"
target_dir="${CARGO_TARGET_DIR:-$root/target}"
cluster_bin="$target_dir/debug/examples/reapi-cluster"
[[ -x "$cluster_bin" ]] || fail "no example binary at $cluster_bin"

step "reference build, locally"
# Loading and analysis first (--nobuild), here and before the first remote build: the elapsed
# times of the builds then compare execution alone, not a cold Bazel server against a warm one.
bazel_in local build --nobuild --jobs="$jobs" //... >"$work/local-analysis.log" 2>&1 ||
    { tail -40 "$work/local-analysis.log"; fail "the local bazel build --nobuild (loading and analysis)"; }
bazel_in local build --jobs="$jobs" //... >"$work/local-build.log" 2>&1 ||
    { tail -40 "$work/local-build.log"; fail "the local bazel build"; }
local_bin="$(bazel_in local info bazel-bin 2>/dev/null)"

# Starts a cluster with its own (empty) data directory: sets cluster_pid, cluster_log,
# endpoints (one per replica) and flags (the Bazel flags it prints, for the first replica).
start_cluster() { # start_cluster <name> [more reapi-cluster flags…]
    cluster_log="$work/cluster-$1.log"
    cluster_err="$work/cluster-$1.err"
    "$cluster_bin" --nodes "$replicas" --data-dir "$work/cluster-$1" --jobs "$jobs" \
        --sandbox "$sandbox" "${@:2}" >"$cluster_log" 2>"$cluster_err" &
    cluster_pid=$!
    for _ in $(seq 1 600); do
        grep -q '^ready$' "$cluster_log" && break
        kill -0 "$cluster_pid" 2>/dev/null || { cat "$cluster_err"; fail "the $1 cluster exited before it was ready"; }
        sleep 0.1
    done
    grep -q '^ready$' "$cluster_log" || fail "the $1 cluster was not ready within 60 s"
    cat "$cluster_log"
    mapfile -t endpoints < <(grep -E '^grpcs?://127\.0\.0\.1:[0-9]+$' "$cluster_log")
    [[ "${#endpoints[@]}" -eq "$replicas" ]] || fail "expected $replicas endpoints, got ${#endpoints[@]}"
    read -r -a flags <<<"$(sed -n 's/^bazel flags: //p' "$cluster_log")"
    [[ "${#flags[@]}" -gt 0 ]] || fail "the $1 cluster printed no bazel flags"
    if [[ "${SANDBOX_TEST_REQUIRED:-0}" == 1 && "$sandbox" != off ]]; then
        grep -q '^actions run sandboxed$' "$cluster_log" ||
            fail "the $1 cluster runs actions without a sandbox, but SANDBOX_TEST_REQUIRED=1"
    fi
}

# The same flags, pointing at another replica.
flags_for() { # flags_for <endpoint>
    local flag
    for flag in "${flags[@]}"; do
        if [[ "$flag" == --remote_executor=* ]]; then echo "--remote_executor=$1"; else echo "$flag"; fi
    done
}

# Stops the cluster (SIGTERM), prints its per-node table and checks the spread.
stop_cluster() { # stop_cluster <name>
    local node executed executed_total=0 idle=()
    kill -TERM "$cluster_pid"
    wait "$cluster_pid" || fail "the $1 cluster exited with an error: $(cat "$cluster_err")"
    cluster_pid=""
    sed -n '/^node /,$p' "$cluster_log"
    while read -r node _endpoint executed _rest; do
        executed_total=$((executed_total + executed))
        [[ "$executed" -gt 0 ]] || idle+=("$node")
    done < <(sed -n '/^node /,$p' "$cluster_log" | tail -n +2)
    [[ "$executed_total" -gt 0 ]] || fail "the $1 cluster reports no executed action"
    if [[ "$check_spread" == 1 ]]; then
        [[ "${#idle[@]}" -eq 0 ]] || fail "the $1 cluster: actions did not run on every replica (idle: ${idle[*]})"
        echo "actions ran on every replica"
    else
        echo "spread not checked: ${#idle[@]} of $replicas replicas ran nothing"
    fi
}

# After stop_cluster: fails unless the replicas routed an Execute again (the crashed replica's,
# by the replica Bazel talks to), so the crash cost Bazel nothing because the mesh re-ran the
# action, not because Bazel retried.
rerouted() { # rerouted <what>
    local total
    total="$(sed -n '/^node /,$p' "$cluster_log" | tail -n +2 | awk '{ s += $11 } END { print s + 0 }')"
    [[ "$total" -ge 1 ]] || fail "$1: no Execute was routed again after the crash"
    echo "$1: $total Execute call(s) routed again by the mesh"
}

# Fails if Bazel retried a remote call or saw one fail (the mesh must hide the crash).
no_remote_retry() { # no_remote_retry <log> <what>
    if grep -E 'Retrying|UNAVAILABLE|io exception|DEADLINE_EXCEEDED' "$1"; then
        fail "$2: Bazel saw a remote error or retried"
    fi
    echo "$2: no remote retry in Bazel's log"
}

# Crashes the last replica the next time it runs an action (SIGUSR1 to the cluster).
arm_crash() { kill -USR1 "$cluster_pid"; }
crashed() { # crashed <what>: fails unless a replica crashed
    grep -q '^crashing ' "$cluster_log" || fail "$1: no replica crashed during the build"
    grep '^crashing ' "$cluster_log"
}

step "starting $replicas replicas (download every output)"
start_cluster download-all

step "remote build through ${endpoints[0]}"
bazel_in remote build --nobuild "${flags[@]}" //... >"$work/remote-analysis.log" 2>&1 ||
    { tail -40 "$work/remote-analysis.log"; fail "the remote bazel build --nobuild (loading and analysis)"; }
bazel_in remote build "${flags[@]}" //... 2>&1 | tee "$work/remote-build.log" ||
    bazel_failed "$work/remote-build.log" "the remote bazel build"
only_kind "$work/remote-build.log" remote "remote build"
timing "$work/local-build.log" "local build (reference, same jobs)"
timing "$work/remote-build.log" "remote build through $replicas replica(s), downloading every output"

step "remote test through ${endpoints[0]}"
bazel_in remote test "${flags[@]}" //... 2>&1 | tee "$work/remote-test.log" ||
    bazel_failed "$work/remote-test.log" "the remote bazel test"
tests_passed "$work/remote-test.log" '[0-9]+' "the remote bazel test"
only_kind "$work/remote-test.log" remote "remote test"

step "comparing remote outputs with the local build"
remote_bin="$(bazel_in remote info bazel-bin 2>/dev/null)"
compare_all() { # compare_all <what>: the same files as the local build, byte for byte
    diff <(list_outputs "$local_bin") <(list_outputs "$remote_bin") >"$work/outputs.diff" ||
        { cat "$work/outputs.diff"; fail "$1: the remote build produced other files than the local one"; }
    compare_present "$1" 1
}
compare_all "download-all build"

step "clean build through ${endpoints[1 % replicas]}: all remote cache hits"
bazel_in remote clean >/dev/null 2>&1 || fail "bazel clean"
mapfile -t second < <(flags_for "${endpoints[1 % replicas]}")
bazel_in remote build "${second[@]}" //... 2>&1 | tee "$work/cached-build.log" ||
    bazel_failed "$work/cached-build.log" "the second (clean) remote build"
only_kind "$work/cached-build.log" "remote cache hit" "clean build"

step "tests through ${endpoints[2 % replicas]}: all remote cache hits"
mapfile -t third < <(flags_for "${endpoints[2 % replicas]}")
bazel_in remote test "${third[@]}" //... 2>&1 | tee "$work/cached-test.log" ||
    bazel_failed "$work/cached-test.log" "the cached remote bazel test"
tests_passed "$work/cached-test.log" 0 "the cached remote bazel test: tests were not cache hits"
only_kind "$work/cached-test.log" "remote cache hit" "cached test"

if [[ "$replicas" -gt 1 ]]; then
step "a replica crashes in the middle of a build through ${endpoints[0]}: the build passes"
bazel_in remote clean >/dev/null 2>&1 || fail "bazel clean"
arm_crash
# Nothing from the cache: every action runs again, spread over the replicas, one of which
# crashes while it runs one.
bazel_in remote build "${flags[@]}" --noremote_accept_cached //... 2>&1 | tee "$work/crash-build.log" ||
    bazel_failed "$work/crash-build.log" "the build during which a replica crashed"
only_kind "$work/crash-build.log" remote "build with a crash"
crashed "the build with a crash"
no_remote_retry "$work/crash-build.log" "the build with a crash"
timing "$work/crash-build.log" "remote build through $replicas replica(s), downloading every output, one crashed"
compare_all "build with a crash"
fi

step "stopping the download-all cluster"
stop_cluster download-all
[[ "$replicas" -le 1 ]] || rerouted "the download-all cluster"

step "starting $replicas fresh replicas (Build without the Bytes)"
start_cluster bwob
mapfile -t second < <(flags_for "${endpoints[1 % replicas]}")

step "--remote_download_minimal: clean build and tests through ${endpoints[0]}"
bazel_in remote clean >/dev/null 2>&1 || fail "bazel clean"
bazel_in remote build "${flags[@]}" --remote_download_minimal //... 2>&1 | tee "$work/minimal-build.log" ||
    bazel_failed "$work/minimal-build.log" "the --remote_download_minimal build through ${endpoints[0]}"
only_kind "$work/minimal-build.log" remote "minimal build"
bazel_in remote test "${flags[@]}" --remote_download_minimal //... 2>&1 | tee "$work/minimal-test.log" ||
    bazel_failed "$work/minimal-test.log" "the --remote_download_minimal test through ${endpoints[0]}"
tests_passed "$work/minimal-test.log" '[1-9][0-9]*' "the --remote_download_minimal test"
only_kind "$work/minimal-test.log" remote "minimal test"
compare_present "minimal build" 0 partial
timing "$work/minimal-build.log" "remote build through $replicas replica(s), --remote_download_minimal"

step "--remote_download_toplevel: clean build through ${endpoints[1 % replicas]}, all remote cache hits"
bazel_in remote clean >/dev/null 2>&1 || fail "bazel clean"
bazel_in remote build "${second[@]}" --remote_download_toplevel //... 2>&1 | tee "$work/toplevel-build.log" ||
    bazel_failed "$work/toplevel-build.log" "the --remote_download_toplevel build through ${endpoints[1 % replicas]}"
only_kind "$work/toplevel-build.log" "remote cache hit" "toplevel build"
compare_present "toplevel build" 1 partial

if [[ "$replicas" -gt 1 ]]; then
step "a replica crashes in the middle of a --remote_download_minimal build through ${endpoints[0]}: build and tests pass"
bazel_in remote clean >/dev/null 2>&1 || fail "bazel clean"
arm_crash
# As in the download-all crash step, every action runs again; here its outputs stay remote.
bazel_in remote build "${flags[@]}" --remote_download_minimal --noremote_accept_cached //... 2>&1 |
    tee "$work/minimal-crash-build.log" ||
    bazel_failed "$work/minimal-crash-build.log" "the --remote_download_minimal build during which a replica crashed"
only_kind "$work/minimal-crash-build.log" remote "minimal build with a crash"
crashed "the --remote_download_minimal build with a crash"
no_remote_retry "$work/minimal-crash-build.log" "the --remote_download_minimal build with a crash"
timing "$work/minimal-crash-build.log" "remote build through $replicas replica(s), --remote_download_minimal, one crashed"
bazel_in remote test "${flags[@]}" --remote_download_minimal --noremote_accept_cached //... 2>&1 |
    tee "$work/minimal-crash-test.log" ||
    bazel_failed "$work/minimal-crash-test.log" "the --remote_download_minimal test after a replica crashed"
tests_passed "$work/minimal-crash-test.log" '[1-9][0-9]*' "the --remote_download_minimal test after a replica crashed"
only_kind "$work/minimal-crash-test.log" remote "minimal test after the crash"

step "--remote_download_toplevel: the outputs of that build through ${endpoints[0]}, all remote cache hits"
bazel_in remote clean >/dev/null 2>&1 || fail "bazel clean"
bazel_in remote build "${flags[@]}" --remote_download_toplevel //... 2>&1 | tee "$work/crash-toplevel-build.log" ||
    bazel_failed "$work/crash-toplevel-build.log" "the --remote_download_toplevel build after the crash"
only_kind "$work/crash-toplevel-build.log" "remote cache hit" "toplevel build after the crash"
compare_present "toplevel build after the crash" 1 partial
fi

step "stopping the Build without the Bytes cluster"
stop_cluster bwob
[[ "$replicas" -le 1 ]] || rerouted "the Build without the Bytes cluster"

step "token files"
token() { od -An -tx1 -N16 /dev/urandom | tr -d ' \n'; }
sha256() { printf %s "$1" | sha256sum | cut -d' ' -f1; }
ci_token="$(token)"
laptop_token="$(token)"
printf 'ci read,write-cas,write-ac,execute %s\nlaptop read %s\n' "$(sha256 "$ci_token")" "$(sha256 "$laptop_token")" >"$work/tokens"
token >"$work/cluster-token"

step "starting $replicas replicas that check bearer tokens"
start_cluster tokens --tokens-file "$work/tokens" --cluster-token-file "$work/cluster-token"
step "a token with every right: build and tests through ${endpoints[0]}"
bazel_in remote clean >/dev/null 2>&1 || fail "bazel clean"
bazel_in remote build "${flags[@]}" "--remote_header=authorization=Bearer $ci_token" //... 2>&1 |
    tee "$work/token-build.log" || bazel_failed "$work/token-build.log" "the build with a token"
only_kind "$work/token-build.log" remote "build with a token"
bazel_in remote test "${flags[@]}" "--remote_header=authorization=Bearer $ci_token" //... 2>&1 |
    tee "$work/token-test.log" || bazel_failed "$work/token-test.log" "the tests with a token"
tests_passed "$work/token-test.log" '[0-9]+' "the tests with a token"

step "no token: refused UNAUTHENTICATED"
bazel_in remote clean >/dev/null 2>&1 || fail "bazel clean"
if bazel_in remote build "${flags[@]}" //... >"$work/no-token.log" 2>&1; then
    fail "a build without a token went through"
fi
grep -q UNAUTHENTICATED "$work/no-token.log" || { tail -20 "$work/no-token.log"; fail "a build without a token failed, but not with UNAUTHENTICATED"; }
grep -m1 UNAUTHENTICATED "$work/no-token.log"

step "a read-only token: cached results read, local results not uploaded (Bazel warns and goes on)"
read_only=(--remote_cache="${endpoints[0]}" "--remote_header=authorization=Bearer $laptop_token")
bazel_in remote clean >/dev/null 2>&1 || fail "bazel clean"
bazel_in remote build "${read_only[@]}" //... 2>&1 | tee "$work/read-only-build.log" ||
    bazel_failed "$work/read-only-build.log" "the build with a read-only token"
only_kind "$work/read-only-build.log" "remote cache hit" "build with a read-only token"
bazel_in remote clean >/dev/null 2>&1 || fail "bazel clean"
bazel_in remote build "${read_only[@]}" --noremote_accept_cached --remote_upload_local_results //... 2>&1 |
    tee "$work/read-only-upload.log" ||
    bazel_failed "$work/read-only-upload.log" "the local build with a read-only token"
grep -q PERMISSION_DENIED "$work/read-only-upload.log" ||
    fail "the read-only token's uploads were not refused with PERMISSION_DENIED"
grep -m1 PERMISSION_DENIED "$work/read-only-upload.log"
stop_cluster tokens

# Debian's Bazel 4.2.3 cannot speak TLS: its Netty has the JDK's ALPN support patched out, so any
# grpcs:// endpoint fails in Bazel itself ("JDK provider does not support ALPN protocol"). The
# official Bazel 2.1.0, as published on the npm registry, can; it predates
# --tls_client_certificate and --remote_header, so mutual TLS and tokens over TLS are tested
# with a client built from the bindings (crates/mesh-reapi/tests/reapi/security.rs).
step "certificates for 127.0.0.1 (a test CA, openssl) and the official Bazel 2.1.0 (npm)"
pki="$work/pki"
mkdir -p "$pki"
openssl req -x509 -newkey rsa:2048 -nodes -keyout "$pki/ca.key" -out "$pki/ca.pem" -days 2 \
    -subj "/CN=mesh test CA" 2>/dev/null || fail "making the test CA (openssl)"
openssl req -newkey rsa:2048 -nodes -keyout "$pki/replica.key" -out "$pki/replica.csr" \
    -subj "/CN=replica" 2>/dev/null || fail "making the replicas' key (openssl)"
printf 'subjectAltName=IP:127.0.0.1,DNS:localhost\nextendedKeyUsage=serverAuth,clientAuth\n' >"$pki/replica.ext"
openssl x509 -req -in "$pki/replica.csr" -CA "$pki/ca.pem" -CAkey "$pki/ca.key" -CAcreateserial \
    -days 2 -extfile "$pki/replica.ext" -out "$pki/replica.pem" 2>/dev/null ||
    fail "signing the replicas' certificate (openssl)"
tls_bazel="${MESH_TLS_BAZEL:-}"
if [[ -z "$tls_bazel" ]]; then
    (cd "$work" && npm pack --silent @bazel/bazel-linux_x64@2.1.0 >/dev/null &&
        tar xzf bazel-bazel-linux_x64-2.1.0.tgz) || fail "npm pack @bazel/bazel-linux_x64@2.1.0"
    tls_bazel="$work/package/bazel-2.1.0-linux-x86_64"
    chmod +x "$tls_bazel"
fi
tls_bazel_in() { # tls_bazel_in <command> [args…]: Bazel 2.1.0 with an output base of its own
    local command="$1"; shift
    timeout 900 "$tls_bazel" --output_user_root="$work/tls-bazel-root" --output_base="$work/tls-base" \
        --nohome_rc "$command" --color=no --curses=no "$@"
}

step "starting $replicas replicas that speak only TLS"
start_cluster tls --tls-cert "$pki/replica.pem" --tls-key "$pki/replica.key" --tls-ca "$pki/ca.pem"
[[ "${endpoints[0]}" == grpcs://* ]] || fail "the TLS cluster's endpoint is not grpcs://: ${endpoints[0]}"
step "Bazel 2.1.0 over TLS: build and tests through ${endpoints[0]} with --tls_certificate"
tls_bazel_in build "${flags[@]}" --tls_certificate="$pki/ca.pem" //... 2>&1 | tee "$work/tls-build.log" ||
    bazel_failed "$work/tls-build.log" "the build over TLS (Bazel 2.1.0)"
only_kind "$work/tls-build.log" remote "build over TLS"
tls_bazel_in test "${flags[@]}" --tls_certificate="$pki/ca.pem" //... 2>&1 | tee "$work/tls-test.log" ||
    bazel_failed "$work/tls-test.log" "the tests over TLS (Bazel 2.1.0)"
tests_passed "$work/tls-test.log" '[0-9]+' "the tests over TLS"
step "Bazel 2.1.0 trusting another CA: refused"
openssl req -x509 -newkey rsa:2048 -nodes -keyout "$pki/other.key" -out "$pki/other.pem" -days 2 \
    -subj "/CN=another CA" 2>/dev/null || fail "making a second CA (openssl)"
tls_bazel_in clean >/dev/null 2>&1 || fail "bazel clean (2.1.0)"
if tls_bazel_in build "${flags[@]}" --tls_certificate="$pki/other.pem" //... >"$work/other-ca.log" 2>&1; then
    fail "Bazel trusting another CA built through the TLS cluster"
fi
echo "refused: $(grep -m1 -E '^ERROR: ' "$work/other-ca.log" || echo 'Bazel failed')"
tls_bazel_in shutdown >/dev/null 2>&1 || true
stop_cluster tls


step "a rolling restart of every replica during a build through a TCP load balancer"
start_cluster rolling
python3 "$here/proxy.py" "$work/proxy-port" "${endpoints[@]#*://}" &
proxy_pid=$!
for _ in $(seq 1 100); do [[ -s "$work/proxy-port" ]] && break; sleep 0.1; done
[[ -s "$work/proxy-port" ]] || fail "the load balancer (tests/bazel/proxy.py) did not start"
balanced="grpc://127.0.0.1:$(cat "$work/proxy-port")"
mapfile -t through_lb < <(flags_for "$balanced")
bazel_in remote clean >/dev/null 2>&1 || fail "bazel clean"
bazel_in remote build "${through_lb[@]}" --noremote_accept_cached //... 2>&1 | tee "$work/undisturbed-build.log" ||
    bazel_failed "$work/undisturbed-build.log" "the build through the load balancer"
timing "$work/undisturbed-build.log" "remote build through a load balancer, undisturbed"
bazel_in remote clean >/dev/null 2>&1 || fail "bazel clean"
: >"$work/rolling-build.log"
# The restart begins as the build starts executing, and takes each replica in turn: each
# drain waits for the actions running on its replica.
(
    until grep -qE '^INFO: Found [0-9]+ targets' "$work/rolling-build.log"; do sleep 0.05; done
    kill -USR2 "$cluster_pid"
) &
restart_pid=$!
bazel_in remote build "${through_lb[@]}" --noremote_accept_cached //... 2>&1 | tee "$work/rolling-build.log" ||
    bazel_failed "$work/rolling-build.log" "the build during a rolling restart"
grep -q '^rolling restart of ' "$cluster_log" ||
    fail "the build ended before the rolling restart began: nothing was tested"
wait "$restart_pid"
for _ in $(seq 1 600); do grep -q '^rolling restart done$' "$cluster_log" && break; sleep 0.1; done
grep -q '^rolling restart done$' "$cluster_log" || fail "the rolling restart did not finish within 60 s"
grep '^restarted ' "$cluster_log"
only_kind "$work/rolling-build.log" remote "build during a rolling restart"
timing "$work/rolling-build.log" "remote build through a load balancer, every replica restarted"
if grep -E 'UNAVAILABLE|io exception|Retrying|DEADLINE_EXCEEDED|failed: .*remote' "$work/rolling-build.log"; then
    fail "Bazel saw remote errors during the rolling restart"
fi
echo "no remote error in Bazel's log"
remote_bin="$(bazel_in remote info bazel-bin 2>/dev/null)"
compare_all "build during a rolling restart"
kill "$proxy_pid" 2>/dev/null || true
wait "$proxy_pid" 2>/dev/null || true
# Every remote action ran exactly once: the executions counted by the replicas (the restarted
# ones before they went, then everyone's since) add up to Bazel's remote processes.
remote_processes="$(process_kinds "$work/rolling-build.log" | sed -nE 's/^([0-9]+) remote$/\1/p')"
before_restart="$(sed -nE 's/^restarted r[0-9]+: executed ([0-9]+) .*/\1/p' "$cluster_log" | awk '{ s += $1 } END { print s }')"
# The spread is not checked here: a replica restarted late may have run nothing since.
spread="$check_spread"
check_spread=0
stop_cluster rolling
check_spread="$spread"
since_restart="$(sed -n '/^node /,$p' "$cluster_log" | tail -n +2 | awk '{ s += $3 } END { print s }')"
undisturbed="$(process_kinds "$work/undisturbed-build.log" | sed -nE 's/^([0-9]+) remote$/\1/p')"
executed=$((before_restart + since_restart - undisturbed))
echo "executed during the rolling restart build: $executed for $remote_processes remote processes ($since_restart by replicas after their restart)"
[[ "$since_restart" -gt 0 ]] ||
    fail "no replica ran an action after its restart: the restart did not overlap the build"
[[ "$executed" -eq "$remote_processes" ]] ||
    fail "the replicas executed $executed actions for $remote_processes remote processes: some ran twice (or not at all)"

step "two mesh-node processes with the default configuration"
(cd "$root" && cargo build --locked --bin mesh-node) || fail "cargo build --bin mesh-node"
node_bin="$target_dir/debug/mesh-node"
node_pids=()
start_node() { # start_node <id> [more flags…]: sets node_grpc and node_metrics
    local log="$work/node-$1.log"
    "$node_bin" --api reapi --node-id "$1" --bind-addr 127.0.0.1 --bind-port 0 --grpc-port 0 \
        --data-dir "$work/node-$1" --metrics-addr 127.0.0.1:0 "${@:2}" >"$log" 2>"$work/node-$1.err" &
    node_pids+=($!)
    for _ in $(seq 1 600); do
        grep -q '^metrics at ' "$log" && break
        kill -0 "${node_pids[-1]}" 2>/dev/null || { cat "$work/node-$1.err"; fail "mesh-node $1 exited at start"; }
        sleep 0.1
    done
    grep -q '^metrics at ' "$log" || fail "mesh-node $1 printed no metrics address within 60 s"
    node_grpc="$(sed -nE 's/.*, grpc at ([0-9.:]+),.*/\1/p' "$log" | head -1)"
    node_gossip="$(sed -nE 's/.* gossiping at ([0-9.:]+) .*/\1/p' "$log" | head -1)"
    node_metrics="$(sed -nE 's|^metrics at (http://[0-9.:]+/metrics)$|\1|p' "$log")"
}
start_node n0
first_gossip="$node_gossip"
first_metrics="$node_metrics"
start_node n1 --join "$first_gossip"
mapfile -t through_node < <(flags_for "grpc://$node_grpc")
bazel_in remote clean >/dev/null 2>&1 || fail "bazel clean"
bazel_in remote build "${through_node[@]}" --noremote_accept_cached //... 2>&1 | tee "$work/node-build.log" ||
    bazel_failed "$work/node-build.log" "the build through mesh-node"
only_kind "$work/node-build.log" remote "build through mesh-node"
timing "$work/node-build.log" "remote build through two mesh-node processes"
remote_bin="$(bazel_in remote info bazel-bin 2>/dev/null)"
compare_all "build through mesh-node"
# reapi_executions_total{outcome="exit_zero"} of both processes, against Bazel's count.
executions() { curl -sf "$1" | sed -nE 's/^reapi_executions_total\{outcome="exit_zero"\} ([0-9]+)$/\1/p'; }
command -v curl >/dev/null || fail "curl is not installed"
ran=$(( $(executions "$first_metrics" || echo 0) + $(executions "$node_metrics" || echo 0) ))
remote_processes="$(process_kinds "$work/node-build.log" | sed -nE 's/^([0-9]+) remote$/\1/p')"
echo "reapi_executions_total{outcome=\"exit_zero\"}: $ran across both processes, for $remote_processes remote processes"
[[ "$ran" -eq "$remote_processes" ]] ||
    fail "the mesh-node processes report $ran executions for $remote_processes remote processes"
for pid in "${node_pids[@]}"; do kill -TERM "$pid"; done
for pid in "${node_pids[@]}"; do wait "$pid" || fail "a mesh-node process exited with an error"; done
node_pids=()

step "timings"
printf '%s\n' "${timings[@]}"

echo
echo "run.sh: ok in $((SECONDS - started)) s"
