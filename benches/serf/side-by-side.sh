#!/usr/bin/env bash
# HashiCorp serf (memberlist's lan defaults) and the mesh-node binary (lan timing, the
# default), side by side, as real processes on loopback: the two figures issue 13 asks for.
#
#   sudo benches/serf/side-by-side.sh [--nodes 16] [--kill-sizes "16 8"] [--kills 5]
#        [--idle 60] [--settle 30] [--resettle 10] [--poll-interval 0.1]
#        [--detect-timeout 45] [--systems "serf mesh"] [--out DIR] [--no-build]
#
# Needs root (ip netns), serf on PATH (Debian's package: apt-get install serf), cargo unless
# --no-build, and optionally nft (nftables) for UDP/TCP byte counts. About 10 minutes with
# the defaults. Logs, raw numbers and the tables stay in --out (default a new directory under
# $TMPDIR or /tmp).
#
# What and how:
# 1. Idle cost per node. A cluster of --nodes (16) processes in a private network namespace
#    of its own (`ip netns add`, only `lo` up), so the namespace's counters hold that
#    cluster's traffic and nothing else: `lo` bytes and packets (/proc/net/dev: IP packets,
#    IP + UDP/TCP headers included, no link header on lo), Udp OutDatagrams and Tcp OutSegs
#    (/proc/net/snmp), and, with nft, an output-hook counter per protocol (bytes as IP
#    packets). The cluster forms (every node sees every node alive; that check talks to each
#    node over TCP), settles --settle seconds with nobody talking to it, then the counters
#    are read, --idle seconds pass, and they are read again. Nothing polls the nodes in that
#    window. Reported per node per second: bytes and datagrams as counted on lo, and payload
#    estimates: UDP bytes − 28 per datagram (IP 20 + UDP 8), TCP bytes − 52 per segment
#    (IP 20 + TCP 32 with the timestamp option). Without nft, UDP and TCP bytes cannot be
#    told apart and only the lo total and its payload estimate are given. For the mesh, the
#    nodes' own gossip counters (admin API `Stats`, bytes_sent: the datagrams' payload) are
#    read just before and just after the window (so over a window about 1.5 s longer), as a
#    check on the estimate; serf has no such counter. CPU time of the node processes over the window is reported too.
# 2. Crash detection. For each size in --kill-sizes (the idle cluster is reused when its size
#    is one of them): --kills times, one node (never n0, the seed) is killed with SIGKILL;
#    for every survivor, the time from the kill until it first reports the victim as failed,
#    measured two ways:
#    - events: every node's stdout is stamped line by line on arrival ($EPOCHREALTIME) —
#      serf's `serf: EventMemberFailed: nX` log line (serf runs with -log-level=info for it;
#      serf sets the member's status to failed and logs that line together), the mesh
#      node's `event: Failed(nX@…)` line. Millisecond resolution, no polling.
#    - polling, what a client sees: one loop inside the namespace asks the survivors in turn
#      (`serf members -rpc-addr=…`, `meshctl --addr … members`) for the victim's status,
#      sleeping --poll-interval between rounds; the time is taken when the answer says
#      "failed". Late by up to one round (about 15 ms per survivor asked plus the sleep);
#      the largest gap between two polls of one survivor is reported.
#    Then the victim restarts (same name, same ports, joining n0), every node must see it
#    alive again, and the cluster settles --resettle seconds before the next kill. Victims
#    are spread over n1..n(N-1). Failure reports beyond one per survivor per kill (about
#    nodes nobody killed, or repeated) are counted over each cluster's whole life.
# The systems run one after the other, never at the same time; each cluster gets a fresh
# namespace. serf agents run with their defaults (lan profile, no event handlers, no
# snapshot, no encryption); mesh nodes with theirs (lan timing, demo API, no TLS). MESH_*
# environment variables configure the mesh node, so the script refuses to run with any set.
set -euo pipefail

here="$(cd "$(dirname "$0")" && pwd)"
root="$(cd "$here/../.." && pwd)"

nodes=16
kill_sizes="16 8"
kills=5
idle_secs=60
settle_secs=30
resettle_secs=10
poll_interval=0.1
detect_timeout=45
systems="serf mesh"
out_dir=""
build=1
while [[ $# -gt 0 ]]; do
    case "$1" in
        --nodes) nodes="$2"; shift ;;
        --kill-sizes) kill_sizes="$2"; shift ;;
        --kills) kills="$2"; shift ;;
        --idle) idle_secs="$2"; shift ;;
        --settle) settle_secs="$2"; shift ;;
        --resettle) resettle_secs="$2"; shift ;;
        --poll-interval) poll_interval="$2"; shift ;;
        --detect-timeout) detect_timeout="$2"; shift ;;
        --systems) systems="$2"; shift ;;
        --out) out_dir="$2"; shift ;;
        --no-build) build=0 ;;
        -h|--help) sed -n '2,/^set -euo/p' "$0" | sed '$d'; exit 0 ;;
        *) echo "side-by-side.sh: unknown argument $1 (see --help)" >&2; exit 2 ;;
    esac
    shift
done

fail() { printf 'side-by-side.sh: %s\n' "$*" >&2; exit 1; }
say() { printf '[%s] %s\n' "$(date +%T)" "$*" >&2; }

[[ $EUID -eq 0 ]] || fail "needs root for ip netns (run it with sudo)"
command -v ip >/dev/null || fail "ip (iproute2) is not installed"
if [[ " $systems " == *" serf "* ]]; then
    command -v serf >/dev/null || fail "serf is not installed (apt-get install serf)"
fi
mesh_vars="$(compgen -e | grep '^MESH_' | tr '\n' ' ' || true)"
if [[ -n $mesh_vars ]]; then
    fail "MESH_* variables are set ($mesh_vars); they configure the mesh node and this script measures its defaults: unset them"
fi
for size in $nodes $kill_sizes; do
    [[ $size =~ ^[0-9]+$ && $size -ge 3 && $size -le 200 ]] || fail "cluster sizes must be 3..200, not $size"
done

node_bin="$root/target/release/mesh-node"
ctl_bin="$root/target/release/meshctl"
if [[ " $systems " == *" mesh "* ]]; then
    if [[ $build -eq 1 ]]; then
        command -v cargo >/dev/null || fail "cargo is not on PATH (build first and pass --no-build)"
        say "cargo build --release --bin mesh-node --bin meshctl"
        (cd "$root" && cargo build --release --quiet --bin mesh-node --bin meshctl)
    fi
    [[ -x $node_bin && -x $ctl_bin ]] || fail "$node_bin or $ctl_bin is missing: cargo build --release --bin mesh-node --bin meshctl"
fi
serf_bin="$(command -v serf || true)"

if [[ -z $out_dir ]]; then
    out_dir="$(mktemp -d "${TMPDIR:-/tmp}/side-by-side.XXXXXX")"
fi
mkdir -p "$out_dir"
idle_tsv="$out_dir/idle.tsv"
kills_tsv="$out_dir/kills.tsv"
: > "$idle_tsv"
: > "$kills_tsv"

have_nft=0
gossip_base=7946   # gossip port of node i: gossip_base + i (UDP and, for serf, TCP)
rpc_base=7373      # serf RPC port of node i
grpc_base=50051    # mesh gRPC port of node i

# --- bookkeeping and cleanup ------------------------------------------------------------

namespaces=()      # every namespace this run created
declare -a pid=()  # pid of node i of the running cluster
poller=""

cleanup() {
    local status=$? ns p
    trap - EXIT INT TERM
    if [[ -n $poller ]]; then kill -KILL "$poller" 2>/dev/null || true; fi
    for ns in "${namespaces[@]}"; do
        [[ -e /run/netns/$ns ]] || continue
        # Everything in these namespaces was started by this script.
        for p in $(ip netns pids "$ns" 2>/dev/null); do kill -KILL "$p" 2>/dev/null || true; done
        for _ in $(seq 50); do [[ -z $(ip netns pids "$ns" 2>/dev/null) ]] && break; sleep 0.1; done
        ip netns del "$ns" 2>/dev/null || true
    done
    exit "$status"
}
trap cleanup EXIT
trap 'exit 130' INT TERM

# --- helpers ------------------------------------------------------------------------------

# Copies stdin to stdout with each line prefixed by the wall-clock time it arrived.
stamp() {
    local line
    while IFS= read -r line; do printf '%s %s\n' "$EPOCHREALTIME" "$line"; done
}

now() { printf '%s' "$EPOCHREALTIME"; }

# Creates a namespace for a cluster of system $1 and sets ns to its name (not in a subshell:
# it records the namespace for the cleanup and sets have_nft).
new_ns() {
    ns="sbs-$1-$$"
    ip netns add "$ns" || fail "ip netns add $ns failed: this needs root and a kernel with network namespaces"
    namespaces+=("$ns")
    ip -n "$ns" link set lo up
    if command -v nft >/dev/null && ip netns exec "$ns" nft -f - 2>/dev/null <<'EOF'
table inet sbs_acct {
    chain out {
        type filter hook output priority 0; policy accept;
        meta l4proto udp counter
        meta l4proto tcp counter
    }
}
EOF
    then have_nft=1; else have_nft=0; fi
}

del_ns() {
    local ns=$1 p
    for p in "${pid[@]}"; do kill -TERM "$p" 2>/dev/null || true; done
    for _ in $(seq 50); do [[ -z $(ip netns pids "$ns") ]] && break; sleep 0.1; done
    for p in $(ip netns pids "$ns"); do kill -KILL "$p" 2>/dev/null || true; done
    sleep 0.2
    ip netns del "$ns"
    pid=()
}

# Starts node i of a cluster of system $1 in namespace $2, logging to $3/n<i>.{out,err}.
start_node() {
    local sys=$1 ns=$2 logs=$3 i=$4
    local -a args
    if [[ $sys == serf ]]; then
        args=(agent -node="n$i" -bind="127.0.0.1:$((gossip_base + i))"
              -rpc-addr="127.0.0.1:$((rpc_base + i))" -log-level=info)
        if [[ $i -gt 0 ]]; then args+=(-join="127.0.0.1:$gossip_base"); fi
        ip netns exec "$ns" "$serf_bin" "${args[@]}" \
            > >(stamp >> "$logs/n$i.out") 2>> "$logs/n$i.err" < /dev/null &
    else
        args=(--node-id "n$i" --bind-addr 127.0.0.1 --bind-port "$((gossip_base + i))"
              --grpc-port "$((grpc_base + i))")
        if [[ $i -gt 0 ]]; then args+=(--join "127.0.0.1:$gossip_base"); fi
        ip netns exec "$ns" "$node_bin" "${args[@]}" \
            > >(stamp >> "$logs/n$i.out") 2>> "$logs/n$i.err" < /dev/null &
    fi
    pid[i]=$!
    disown "${pid[i]}"
}

# Prints node i's view as "name status" lines (nothing if it does not answer).
members_of() {
    local sys=$1 ns=$2 i=$3
    if [[ $sys == serf ]]; then
        ip netns exec "$ns" "$serf_bin" members -rpc-addr="127.0.0.1:$((rpc_base + i))" 2>/dev/null \
            | awk '{print $1, $3}' || true
    else
        ip netns exec "$ns" "$ctl_bin" --addr "http://127.0.0.1:$((grpc_base + i))" members 2>/dev/null \
            | awk 'NR > 2 && NF > 2 {print $1, $2}' || true
    fi
}

# Waits until each node in the list sees each of them alive (at most $timeout s).
wait_alive() {
    local sys=$1 ns=$2 timeout=$3; shift 3
    local -a want=("$@")
    local deadline=$((SECONDS + timeout)) i j ok view
    while true; do
        ok=1
        for i in "${want[@]}"; do
            view="$(members_of "$sys" "$ns" "$i")"
            for j in "${want[@]}"; do
                if ! grep -qx "n$j alive" <<< "$view"; then ok=0; break 2; fi
            done
        done
        [[ $ok -eq 1 ]] && return 0
        [[ $SECONDS -lt $deadline ]] || return 1
        sleep 1
    done
}

start_cluster() {
    local sys=$1 ns=$2 logs=$3 n=$4 i
    start_node "$sys" "$ns" "$logs" 0
    local deadline=$((SECONDS + 30))
    until [[ -n $(members_of "$sys" "$ns" 0) ]]; do
        [[ $SECONDS -lt $deadline ]] || fail "$sys n0 did not come up (see $logs/n0.*)"
        sleep 0.2
    done
    for ((i = 1; i < n; i++)); do
        start_node "$sys" "$ns" "$logs" "$i"
        sleep 0.05
    done
    wait_alive "$sys" "$ns" 60 $(seq 0 $((n - 1))) \
        || fail "$sys: $n nodes did not all see each other alive within 60 s (see $logs)"
}

# Counters of the namespace: lo_bytes lo_packets udp_out tcp_out udp_bytes udp_packets
# tcp_bytes tcp_packets (the last four "-" without nft).
counters() {
    local ns=$1 dev snmp nftc
    dev="$(ip netns exec "$ns" awk -F: '$1 ~ /^ *lo$/ {split($2, f, " "); print f[9], f[10]}' /proc/net/dev)"
    snmp="$(ip netns exec "$ns" awk '
        $1 == "Udp:" { if (!u) { for (k = 2; k <= NF; k++) ui[$k] = k; u = 1 } else udp = $(ui["OutDatagrams"]) }
        $1 == "Tcp:" { if (!t) { for (k = 2; k <= NF; k++) ti[$k] = k; t = 1 } else tcp = $(ti["OutSegs"]) }
        END { print udp, tcp }' /proc/net/snmp)"
    if [[ $have_nft -eq 1 ]]; then
        nftc="$(ip netns exec "$ns" nft list table inet sbs_acct | awk '
            /l4proto udp counter/ { for (k = 1; k <= NF; k++) { if ($k == "packets") up = $(k+1); if ($k == "bytes") ub = $(k+1) } }
            /l4proto tcp counter/ { for (k = 1; k <= NF; k++) { if ($k == "packets") tp = $(k+1); if ($k == "bytes") tb = $(k+1) } }
            END { print ub, up, tb, tp }')"
    else
        nftc="- - - -"
    fi
    printf '%s %s %s\n' "$dev" "$snmp" "$nftc"
}

# Sum over the node processes of user + system CPU time, in clock ticks.
cpu_ticks() {
    local p total=0 fields
    for p in "${pid[@]}"; do
        fields="$(sed 's/.*) //' "/proc/$p/stat")"
        total=$((total + $(awk '{print $12 + $13}' <<< "$fields")))
    done
    printf '%s' "$total"
}

rss_kib() {
    local p total=0
    for p in "${pid[@]}"; do
        total=$((total + $(awk '/^VmRSS:/ {print $2}' "/proc/$p/status")))
    done
    printf '%s' "$total"
}

# Sum over the mesh nodes of the gossip counters they report: "bytes_sent datagrams_sent".
mesh_sent() {
    local ns=$1 n=$2 i b=0 d=0 json
    for ((i = 0; i < n; i++)); do
        json="$(ip netns exec "$ns" "$ctl_bin" --addr "http://127.0.0.1:$((grpc_base + i))" --json stats)"
        b=$((b + $(grep -o '"bytes_sent": *[0-9]*' <<< "$json" | grep -o '[0-9]*$')))
        d=$((d + $(grep -o '"datagrams_sent": *[0-9]*' <<< "$json" | grep -o '[0-9]*$')))
    done
    printf '%s %s' "$b" "$d"
}

measure_idle() {
    local sys=$1 ns=$2 n=$3 before after t0 t1 c0 c1 m0="- -" m1="- -" tm0=0 tm1=0 load
    say "$sys: settling $settle_secs s, then $idle_secs s idle with nobody polling"
    sleep "$settle_secs"
    if [[ $sys == mesh ]]; then
        tm0="$(now)"; m0="$(mesh_sent "$ns" "$n")"
        sleep 1  # the admin calls' connections close before the window opens
    fi
    load="$(cut -d' ' -f1-3 /proc/loadavg)"
    t0="$(now)"; before="$(counters "$ns")"; c0="$(cpu_ticks)"
    sleep "$idle_secs"
    t1="$(now)"; after="$(counters "$ns")"; c1="$(cpu_ticks)"
    local rss; rss="$(rss_kib)"
    if [[ $sys == mesh ]]; then tm1="$(now)"; m1="$(mesh_sent "$ns" "$n")"; fi
    # sys n seconds d_lo_bytes d_lo_pkts d_udp d_tcp d_udp_bytes d_udp_pkts d_tcp_bytes
    # d_tcp_pkts d_cpu_ticks clk_tck rss_kib d_app_bytes d_app_datagrams loadavg(1 5 15)
    # app_seconds (the node counters' own window: from the first read to the second)
    awk -v sys="$sys" -v n="$n" -v t0="$t0" -v t1="$t1" -v b="$before" -v a="$after" \
        -v c0="$c0" -v c1="$c1" -v hz="$(getconf CLK_TCK)" -v rss="$rss" \
        -v m0="$m0" -v m1="$m1" -v load="$load" -v tm0="$tm0" -v tm1="$tm1" 'BEGIN {
            split(b, x, " "); split(a, y, " "); split(m0, p, " "); split(m1, q, " ")
            printf "%s\t%d\t%.3f", sys, n, t1 - t0
            for (k = 1; k <= 8; k++) printf "\t%s", (x[k] == "-" ? "-" : y[k] - x[k])
            printf "\t%d\t%d\t%d", c1 - c0, hz, rss
            printf "\t%s\t%s", (p[1] == "-" ? "-" : q[1] - p[1]), (p[2] == "-" ? "-" : q[2] - p[2])
            printf "\t%s\t%.3f\n", load, tm1 - tm0
        }' >> "$idle_tsv"
    say "$sys idle: $(tail -1 "$idle_tsv")"
}

# Runs inside the namespace: asks survivors in turn for the victim's status until each has
# said "failed" once or the deadline (epoch seconds) passes; appends "i t_seen t_prev_poll".
poll_failed() {
    local sys=$1 client=$2 victim=$3 interval=$4 deadline=$5 out=$6 rpc=$7 grpc=$8; shift 8
    local -a left=("$@") next
    local -A prev=()
    local i status t
    while [[ ${#left[@]} -gt 0 ]]; do
        next=()
        for i in "${left[@]}"; do
            if [[ $sys == serf ]]; then
                status="$("$client" members -rpc-addr="127.0.0.1:$((rpc + i))" 2>/dev/null \
                    | awk -v v="$victim" '$1 == v {print $3}')" || true
            else
                status="$("$client" --addr "http://127.0.0.1:$((grpc + i))" members 2>/dev/null \
                    | awk -v v="$victim" 'NR > 2 && $1 == v {print $2}')" || true
            fi
            t=$EPOCHREALTIME
            if [[ $status == failed ]]; then
                echo "$i $t ${prev[$i]:--}" >> "$out"
            else
                prev[$i]=$t
                next+=("$i")
            fi
        done
        left=("${next[@]}")
        [[ ${EPOCHREALTIME%.*} -lt $deadline ]] || break
        [[ ${#left[@]} -eq 0 ]] || sleep "$interval"
    done
}

# The stamped time at which node i's log first reports victim v failed after time t0.
event_time() {
    local sys=$1 logs=$2 i=$3 v=$4 t0=$5 pattern
    if [[ $sys == serf ]]; then pattern="EventMemberFailed: $v "; else pattern="event: Failed($v@"; fi
    awk -v t0="$t0" -v p="$pattern" '$1 + 0 > t0 + 0 && index($0, p) { print $1; exit }' "$logs/n$i.out"
}

failure_lines() {
    local sys=$1 logs=$2
    if [[ $sys == serf ]]; then
        cat "$logs"/n*.out | grep -c 'EventMemberFailed: ' || true
    else
        cat "$logs"/n*.out | grep -c 'event: Failed(' || true
    fi
}

run_kills() {
    local sys=$1 ns=$2 logs=$3 n=$4 k v t0 i pollfile expected=0
    local stride=$(((n - 1) / kills)); [[ $stride -ge 1 ]] || stride=1
    for ((k = 1; k <= kills; k++)); do
        v=$((1 + ((k - 1) * stride) % (n - 1)))
        local -a survivors=()
        for ((i = 0; i < n; i++)); do [[ $i -eq $v ]] || survivors+=("$i"); done
        pollfile="$logs/poll-kill$k.txt"; : > "$pollfile"
        local load; load="$(cut -d' ' -f1-3 /proc/loadavg)"
        t0="$(now)"
        kill -KILL "${pid[v]}"
        local client=$ctl_bin; [[ $sys == mesh ]] || client=$serf_bin
        ip netns exec "$ns" bash -c "$(declare -f poll_failed); poll_failed \"\$@\"" _ \
            "$sys" "$client" "n$v" "$poll_interval" "$(( ${t0%.*} + detect_timeout ))" \
            "$pollfile" "$rpc_base" "$grpc_base" "${survivors[@]}" &
        poller=$!
        wait "$poller" || true
        poller=""
        sleep 0.5
        # One line per survivor: i event_time poll_time prev_poll_time (relative to the kill).
        local rows=""
        for i in "${survivors[@]}"; do
            local te tp pp
            te="$(event_time "$sys" "$logs" "$i" "n$v" "$t0")"
            read -r _ tp pp < <(awk -v i="$i" '$1 == i {print; exit}' "$pollfile") || { tp=""; pp=""; }
            rows+="$(awk -v i="$i" -v t0="$t0" -v te="$te" -v tp="$tp" -v pp="$pp" 'BEGIN {
                printf "%d %s %s %s\n", i, (te == "" ? "-" : sprintf("%.3f", te - t0)),
                    (tp == "" ? "-" : sprintf("%.3f", tp - t0)),
                    (pp == "" || pp == "-" ? "-" : sprintf("%.3f", pp - t0)) }')"$'\n'
        done
        printf '%s' "$rows" > "$logs/kill$k-survivors.txt"
        # sys n k victim survivors n_events first_event last_event n_polls first_poll last_poll
        # largest_poll_gap loadavg
        awk -v sys="$sys" -v n="$n" -v k="$k" -v v="n$v" -v s="${#survivors[@]}" -v load="$load" '
            NF >= 4 { if ($2 != "-") { ne++; e = $2 + 0; if (fe == "" || e < fe) fe = e; if (le == "" || e > le) le = e }
              if ($3 != "-") { np++; p = $3 + 0; if (fp == "" || p < fp) fp = p; if (lp == "" || p > lp) lp = p
                               if ($4 != "-" && p - $4 > gap) gap = p - $4 } }
            END { printf "%s\t%d\t%d\t%s\t%d\t%d\t%s\t%s\t%d\t%s\t%s\t%.3f\t%s\n", sys, n, k, v, s,
                  ne, (fe == "" ? "-" : sprintf("%.3f", fe)), (le == "" ? "-" : sprintf("%.3f", le)),
                  np, (fp == "" ? "-" : sprintf("%.3f", fp)), (lp == "" ? "-" : sprintf("%.3f", lp)),
                  gap, load }' <<< "$rows" >> "$kills_tsv"
        expected=$((expected + $(awk 'NF >= 4 && $2 != "-"' <<< "$rows" | wc -l)))
        say "$sys n=$n kill $k (n$v): $(tail -1 "$kills_tsv" | cut -f5-12)"
        # Restart the victim and let the cluster settle (not after the last kill: the cluster
        # is torn down then).
        [[ $k -lt $kills ]] || break
        start_node "$sys" "$ns" "$logs" "$v"
        wait_alive "$sys" "$ns" 60 $(seq 0 $((n - 1))) \
            || fail "$sys: n$v did not come back within 60 s (see $logs)"
        sleep "$resettle_secs"
    done
    # Every failure report in the cluster's logs since it started, less one per survivor per
    # kill: reports about nodes nobody killed, or repeated ones.
    local reports; reports="$(failure_lines "$sys" "$logs")"
    printf '%s\t%d\t%d\n' "$sys" "$n" "$((reports - expected))" \
        >> "$out_dir/other-failures.tsv"
}

# --- the run ------------------------------------------------------------------------------

: > "$out_dir/other-failures.tsv"
{
    echo "date: $(date -Is)"
    echo "host: $(uname -srm), $(nproc) cores"
    if [[ -n $serf_bin ]]; then
        echo "serf: $serf_bin, $("$serf_bin" version | head -1), package $(dpkg-query -W -f '${Version}' serf 2>/dev/null || echo '?')"
    fi
    echo "mesh: $(git -C "$root" rev-parse --short HEAD 2>/dev/null || echo '?')$(git -C "$root" diff --quiet HEAD 2>/dev/null || echo ' (modified)')"
    echo "options: --nodes $nodes --kill-sizes \"$kill_sizes\" --kills $kills --idle $idle_secs --settle $settle_secs --resettle $resettle_secs --poll-interval $poll_interval --detect-timeout $detect_timeout --systems \"$systems\""
} > "$out_dir/run.txt"
cat "$out_dir/run.txt" >&2
say "logs and raw numbers in $out_dir"

for sys in $systems; do
    new_ns "$sys"
    logs="$out_dir/$sys-n$nodes"; mkdir -p "$logs"
    say "$sys: starting $nodes nodes in namespace $ns (nft counters: $have_nft)"
    start_cluster "$sys" "$ns" "$logs" "$nodes"
    measure_idle "$sys" "$ns" "$nodes"
    if [[ " $kill_sizes " == *" $nodes "* ]]; then run_kills "$sys" "$ns" "$logs" "$nodes"; fi
    del_ns "$ns"
    for size in $kill_sizes; do
        [[ $size -ne $nodes ]] || continue
        new_ns "$sys"
        logs="$out_dir/$sys-n$size"; mkdir -p "$logs"
        say "$sys: starting $size nodes in namespace $ns"
        start_cluster "$sys" "$ns" "$logs" "$size"
        say "$sys: settling $settle_secs s"
        sleep "$settle_secs"
        run_kills "$sys" "$ns" "$logs" "$size"
        del_ns "$ns"
    done
done

# --- the tables ---------------------------------------------------------------------------

{
    echo "## serf against the mesh on loopback"
    echo
    sed 's/^/    /' "$out_dir/run.txt"
    echo
    echo "### Idle cost per node"
    echo
    echo "Per node per second over the idle window, nobody polling. \"on lo\": every IP packet the"
    echo "cluster's namespace sent, IP and UDP/TCP headers included. Payload estimates: UDP bytes"
    echo "− 28 per datagram, TCP bytes − 52 per segment (IP 20 + TCP 32 with timestamps)."
    echo
    echo "| system | nodes | window | on lo: bytes/s | on lo: packets/s | UDP datagrams/s | UDP bytes/s | UDP payload B/s | TCP segments/s | TCP bytes/s | TCP payload B/s | payload, all B/s | node's own count of gossip payload B/s (datagrams/s) | CPU per node | RSS per node |"
    echo "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"
    awk -F'\t' '{
        n = $2; s = $3; d = n * s
        lo = $4 / d; pk = $5 / d; ud = $6 / d; ts = $7 / d
        if ($8 != "-") {
            ub = sprintf("%.0f", $8 / d); upl = sprintf("%.0f", ($8 - 28 * $9) / d)
            tb = sprintf("%.0f", $10 / d); tpl = sprintf("%.0f", ($10 - 52 * $11) / d)
            all = sprintf("%.0f", ($8 - 28 * $9 + $10 - 52 * $11) / d)
        } else {
            ub = "n/a"; upl = "n/a"; tb = "n/a"; tpl = "n/a"
            all = sprintf("%.0f", ($4 - 28 * $6 - 52 * $7) / d)
        }
        app = ($15 == "-" ? "n/a (serf has no such counter)" : sprintf("%.0f (%.2f)", $15 / (n * $18), $16 / (n * $18)))
        cpu = sprintf("%.1f ms/s", $12 / $13 * 1000 / d)
        rss = sprintf("%.1f MiB", $14 / n / 1024)
        printf "| %s | %d | %.1f s | %.0f | %.2f | %.2f | %s | %s | %.3f | %s | %s | %s | %s | %s | %s |\n",
            $1, n, s, lo, pk, ud, ub, upl, ts, tb, tpl, all, app, cpu, rss
    }' "$idle_tsv"
    echo
    if grep -q '^mesh' "$idle_tsv"; then
        echo "The mesh nodes' own counters are read just outside the lo window, over $(awk -F'\t' '$1 == "mesh" {printf "%.1f s", $18}' "$idle_tsv")."
        echo
    fi
    echo "Load average (1, 5, 15 min) when each window began: $(awk -F'\t' '{printf "%s %s; ", $1, $17}' "$idle_tsv")"
    echo
    echo "### Crash detection (SIGKILL of one node)"
    echo
    echo "Seconds from the kill until the first and the last survivor reported the victim failed."
    echo "events: the node's own log line, stamped on arrival (ms resolution); polled: the first"
    echo "\`members\` answer saying \"failed\" (late by up to the largest poll gap shown)."
    echo
    echo "| system | nodes | kills | first survivor (events): median (min–max) | last survivor (events): median (min–max) | first (polled): median | last (polled): median | largest poll gap | survivors reporting | other failure reports |"
    echo "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|"
    for sys in $systems; do
        for size in $kill_sizes; do
            awk -F'\t' -v sys="$sys" -v n="$size" -v other="$(awk -F'\t' -v s="$sys" -v n="$size" '$1 == s && $2 == n {print $3}' "$out_dir/other-failures.tsv")" '
                function median(a, m,   i, j, t) {
                    for (i = 1; i <= m; i++) for (j = i + 1; j <= m; j++) if (a[j] < a[i]) { t = a[i]; a[i] = a[j]; a[j] = t }
                    return m % 2 ? a[(m + 1) / 2] : (a[m / 2] + a[m / 2 + 1]) / 2
                }
                function range(a, m,   i, lo, hi) {
                    lo = a[1]; hi = a[1]
                    for (i = 2; i <= m; i++) { if (a[i] < lo) lo = a[i]; if (a[i] > hi) hi = a[i] }
                    return sprintf("%.2f–%.2f", lo, hi)
                }
                $1 == sys && $2 == n {
                    k++; surv += $5; rep += $6
                    if ($7 != "-") { fe[++nfe] = $7; le[++nle] = $8 }
                    if ($10 != "-") { fp[++nfp] = $10; lp[++nlp] = $11 }
                    if ($12 > gap) gap = $12
                }
                END {
                    if (!k) exit
                    r1 = nfe ? sprintf("%.2f (%s)", median(fe, nfe), range(fe, nfe)) : "-"
                    r2 = nle ? sprintf("%.2f (%s)", median(le, nle), range(le, nle)) : "-"
                    p1 = nfp ? sprintf("%.2f", median(fp, nfp)) : "-"
                    p2 = nlp ? sprintf("%.2f", median(lp, nlp)) : "-"
                    printf "| %s | %d | %d | %s | %s | %s | %s | %.2f s | %d / %d | %s |\n",
                        sys, n, k, r1, r2, p1, p2, gap, rep, surv, other
                }' "$kills_tsv"
        done
    done
    echo
    echo "Per kill (seconds after the kill; events, then polled):"
    echo
    echo "| system | nodes | kill | victim | first (events) | last (events) | first (polled) | last (polled) | largest poll gap | survivors reporting (events / polled / of) | load average |"
    echo "|---|---:|---:|---|---:|---:|---:|---:|---:|---:|---|"
    awk -F'\t' '{ printf "| %s | %d | %d | %s | %s | %s | %s | %s | %.2f | %d / %d / %d | %s |\n",
        $1, $2, $3, $4, $7, $8, $10, $11, $12, $6, $9, $5, $13 }' "$kills_tsv"
} > "$out_dir/results.md"

echo
cat "$out_dir/results.md"
say "results in $out_dir/results.md (raw: idle.tsv, kills.tsv, */kill*-survivors.txt, logs)"
