#!/usr/bin/env bash
# Bazel builds and tests this workspace through a cluster of mesh-reapi replicas.
#
#   tests/bazel/run.sh [--no-check-spread] [--replicas N] [--jobs N] [--keep]
#
# 1. Builds the workspace locally once: the reference outputs.
# 2. Starts `examples/reapi-cluster` (N replicas in one process, default 3, ephemeral ports).
# 3. `bazel build` and `bazel test` with the flags the example prints
#    (--remote_executor=grpc://… of the first replica, --spawn_strategy=remote,
#    --noremote_local_fallback): every action must run remotely and the tests must pass.
# 4. Checks the remote outputs are byte-identical to the local ones.
# 5. `bazel clean`, then builds again through the *second* replica and tests through the
#    third: every action must be a remote cache hit (parsed from Bazel's summary line), though
#    the results were written on another replica.
# 6. `bazel clean`, then builds again with --noremote_accept_cached while the last replica is
#    crashed (SIGUSR1 to the cluster) as soon as it runs an action: the build must pass.
# 7. Stops the cluster (SIGTERM) and reads its per-node table: every replica must have
#    executed actions (the route layer spreads Execute; --no-check-spread turns this off).
#
# Needs bazel (Debian's bazel-bootstrap 4.2.3) and cargo. Exits non-zero with a message
# naming the failed step. Everything it creates lives in one temporary directory (kept with
# --keep or MESH_REAPI_KEEP=1).
set -euo pipefail

here="$(cd "$(dirname "$0")" && pwd)"
root="$(cd "$here/../.." && pwd)"
check_spread="${MESH_REAPI_CHECK_SPREAD:-1}"
replicas=3
jobs=32
keep="${MESH_REAPI_KEEP:-0}"
while [[ $# -gt 0 ]]; do
    case "$1" in
        --check-spread) check_spread=1 ;;
        --no-check-spread) check_spread=0 ;;
        --replicas) replicas="$2"; shift ;;
        --jobs) jobs="$2"; shift ;;
        --keep) keep=1 ;;
        -h|--help) sed -n '2,22p' "$0"; exit 0 ;;
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
bazel_root="$work/bazel-root"
started=$SECONDS

cleanup() {
    local status=$?
    if [[ -n "$cluster_pid" ]] && kill -0 "$cluster_pid" 2>/dev/null; then
        kill -TERM "$cluster_pid" 2>/dev/null || true
        wait "$cluster_pid" 2>/dev/null || true
    fi
    for base in local remote; do
        if [[ -d "$work/$base" ]]; then
            bazel --output_user_root="$bazel_root" --output_base="$work/$base" shutdown >/dev/null 2>&1 || true
        fi
    done
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
cd "$work/ws"
bazel_in() { # bazel_in <local|remote> <command> [args…]
    local base="$1"; shift
    local command="$1"; shift
    timeout 900 bazel --output_user_root="$bazel_root" --output_base="$work/$base" --nohome_rc \
        "$command" --nosandbox_debug --symlink_prefix=/ --color=no --curses=no "$@"
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

# "INFO: Elapsed time: 12.3s, Critical Path: 4.5s" → "<what>: elapsed 12.3 s, critical path 4.5 s".
timing() { # timing <log> <what>
    sed -nE 's/^INFO: Elapsed time: ([0-9.]+)s, Critical Path: ([0-9.]+)s.*/\1 \2/p' "$1" | tail -1 |
        { read -r elapsed critical && echo "timing: $2: elapsed $elapsed s, critical path $critical s"; } ||
        true
}

step "building the reapi-cluster example"
(cd "$root" && cargo build --locked --example reapi-cluster) || fail "cargo build --example reapi-cluster"
target_dir="${CARGO_TARGET_DIR:-$root/target}"
cluster_bin="$target_dir/debug/examples/reapi-cluster"
[[ -x "$cluster_bin" ]] || fail "no example binary at $cluster_bin"

step "reference build, locally"
bazel_in local build --jobs="$jobs" //... >"$work/local-build.log" 2>&1 ||
    { tail -40 "$work/local-build.log"; fail "the local bazel build"; }
local_bin="$(bazel_in local info bazel-bin 2>/dev/null)"

step "starting $replicas replicas"
"$cluster_bin" --nodes "$replicas" --data-dir "$work/cluster" --jobs "$jobs" \
    >"$work/cluster.log" 2>"$work/cluster.err" &
cluster_pid=$!
for _ in $(seq 1 600); do
    grep -q '^ready$' "$work/cluster.log" && break
    kill -0 "$cluster_pid" 2>/dev/null || { cat "$work/cluster.err"; fail "the cluster exited before it was ready"; }
    sleep 0.1
done
grep -q '^ready$' "$work/cluster.log" || fail "the cluster was not ready within 60 s"
cat "$work/cluster.log"
mapfile -t endpoints < <(grep -E '^grpc://127\.0\.0\.1:[0-9]+$' "$work/cluster.log")
[[ "${#endpoints[@]}" -eq "$replicas" ]] || fail "expected $replicas endpoints, got ${#endpoints[@]}"
read -r -a flags <<<"$(sed -n 's/^bazel flags: //p' "$work/cluster.log")"
[[ "${#flags[@]}" -gt 0 ]] || fail "the cluster printed no bazel flags"
# The same flags, pointing at another replica.
flags_for() { # flags_for <endpoint>
    local flag
    for flag in "${flags[@]}"; do
        if [[ "$flag" == --remote_executor=* ]]; then echo "--remote_executor=$1"; else echo "$flag"; fi
    done
}

step "remote build through ${endpoints[0]}"
bazel_in remote build "${flags[@]}" //... 2>&1 | tee "$work/remote-build.log" ||
    fail "the remote bazel build"
only_kind "$work/remote-build.log" remote "remote build"
timing "$work/local-build.log" "local build (reference, same jobs)"
timing "$work/remote-build.log" "remote build through $replicas replica(s)"

step "remote test through ${endpoints[0]}"
bazel_in remote test "${flags[@]}" //... 2>&1 | tee "$work/remote-test.log" ||
    fail "the remote bazel test"
grep -qE '^Executed [0-9]+ out of [0-9]+ tests?: [0-9]+ tests? pass' "$work/remote-test.log" ||
    fail "the remote bazel test: no tests passed"
only_kind "$work/remote-test.log" remote "remote test"

step "comparing remote outputs with the local build"
remote_bin="$(bazel_in remote info bazel-bin 2>/dev/null)"
# Runfiles trees and manifests are Bazel's local bookkeeping (absolute paths), not outputs.
list_outputs() { (cd "$1" && find . -type f ! -path '*.runfiles/*' ! -name '*.runfiles_manifest' | sort); }
diff <(list_outputs "$local_bin") <(list_outputs "$remote_bin") >"$work/outputs.diff" ||
    { cat "$work/outputs.diff"; fail "the remote build produced other files than the local one"; }
compared=0
while read -r file; do
    cmp -s "$local_bin/$file" "$remote_bin/$file" || fail "output $file differs between the local and the remote build"
    compared=$((compared + 1))
done < <(list_outputs "$local_bin")
[[ "$compared" -gt 0 ]] || fail "no outputs to compare"
echo "$compared outputs byte-identical"

step "clean build through ${endpoints[1 % replicas]}: all remote cache hits"
bazel_in remote clean >/dev/null 2>&1 || fail "bazel clean"
mapfile -t second < <(flags_for "${endpoints[1 % replicas]}")
bazel_in remote build "${second[@]}" //... 2>&1 | tee "$work/cached-build.log" ||
    fail "the second (clean) remote build"
only_kind "$work/cached-build.log" "remote cache hit" "clean build"

step "tests through ${endpoints[2 % replicas]}: all remote cache hits"
mapfile -t third < <(flags_for "${endpoints[2 % replicas]}")
bazel_in remote test "${third[@]}" //... 2>&1 | tee "$work/cached-test.log" ||
    fail "the cached remote bazel test"
grep -qE '^Executed 0 out of [0-9]+ tests?: [0-9]+ tests? pass' "$work/cached-test.log" ||
    fail "the cached remote bazel test: tests were not cache hits"
only_kind "$work/cached-test.log" "remote cache hit" "cached test"

if [[ "$replicas" -gt 1 ]]; then
step "a replica crashes in the middle of a build through ${endpoints[0]}: the build passes"
bazel_in remote clean >/dev/null 2>&1 || fail "bazel clean"
kill -USR1 "$cluster_pid"
# Nothing from the cache: every action runs again, spread over the replicas, one of which
# crashes while it runs one.
bazel_in remote build "${flags[@]}" --noremote_accept_cached //... 2>&1 | tee "$work/crash-build.log" ||
    fail "the build during which a replica crashed"
only_kind "$work/crash-build.log" remote "build with a crash"
grep -q '^crashing ' "$work/cluster.log" || fail "no replica crashed during the build"
grep '^crashing ' "$work/cluster.log"
fi

step "stopping the cluster"
kill -TERM "$cluster_pid"
wait "$cluster_pid" || fail "the cluster exited with an error: $(cat "$work/cluster.err")"
cluster_pid=""
sed -n '/^node /,$p' "$work/cluster.log"
executed_total=0
idle=()
while read -r node _endpoint executed _rest; do
    executed_total=$((executed_total + executed))
    [[ "$executed" -gt 0 ]] || idle+=("$node")
done < <(sed -n '/^node /,$p' "$work/cluster.log" | tail -n +2)
[[ "$executed_total" -gt 0 ]] || fail "the cluster reports no executed action"
if [[ "$check_spread" == 1 ]]; then
    [[ "${#idle[@]}" -eq 0 ]] || fail "actions did not run on every replica (idle: ${idle[*]})"
    echo "actions ran on every replica"
else
    echo "spread check off (--no-check-spread): ${#idle[@]} of $replicas replicas ran nothing"
fi

echo
echo "run.sh: ok in $((SECONDS - started)) s"
