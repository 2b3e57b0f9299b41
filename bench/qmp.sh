#!/bin/bash
# bench/qmp.sh [BUILD_DIR]: QMP latency and memory, thinblkd against QEMU, in one run.
#
# Starts `qemu-system-x86_64 -M none` and thinblkd, each with one QMP monitor on a Unix socket,
# the same way (same CPU pinning, stdin from /dev/null), runs bench-qmp against each in turn,
# reads their RSS afterwards and prints a table with thinblkd/qemu ratios and the goals.
# Exits non-zero only if something failed to run; a missed goal is informational.
#
# Environment: N (query-status round trips, default 20000), C (connect cycles, default 200),
# QEMU (default qemu-system-x86_64), SERVER_CPU / CLIENT_CPU (pinning, see below).
set -euo pipefail

build=${1:-$(cd "$(dirname "$0")/.." && pwd)/build}
n_iter=${N:-20000}
c_iter=${C:-200}
qemu=${QEMU:-qemu-system-x86_64}

die() { echo "qmp.sh: $*" >&2; exit 1; }

[[ -d $build ]] || die "build directory not found: $build"
build=$(cd "$build" && pwd)
bench=$build/bench/bench-qmp
thinblkd=$build/src/daemon/thinblkd
[[ -x $bench ]] || die "missing $bench (build it: ninja -C $build)"
[[ -x $thinblkd ]] || die "missing $thinblkd (build it: ninja -C $build)"
qemu_path=$(command -v "$qemu") || die "missing $qemu in PATH (set QEMU=...)"

# Pinning: both servers on one CPU, the client on another, so neither server competes with
# the client for a CPU and both see the same conditions. With one CPU, or no taskset, nothing
# is pinned (all three share what there is).
ncpu=$(nproc)
if [[ $ncpu -ge 2 ]] && command -v taskset >/dev/null; then
    server_cpu=${SERVER_CPU:-0}
    client_cpu=${CLIENT_CPU:-1}
    server_pin=(taskset -c "$server_cpu")
    client_pin=(taskset -c "$client_cpu")
    pin_note="servers on CPU $server_cpu, client on CPU $client_cpu"
else
    server_pin=()
    client_pin=()
    pin_note="not pinned"
fi

tmp=$(mktemp -d /tmp/thinblk-bench-qmp.XXXXXX)
pids=()
cleanup() {
    local pid
    for pid in "${pids[@]}"; do
        kill -TERM "$pid" 2>/dev/null || true
    done
    for pid in "${pids[@]}"; do
        wait "$pid" 2>/dev/null || true
    done
    rm -rf "$tmp"
}
trap cleanup EXIT

# start NAME SOCK CMD...: starts CMD in the background (pinned, stdin closed, output to
# $tmp/NAME.log) and waits up to 10 s for its QMP greeting on SOCK. Sets started_pid.
# Returns 1 if the process exits or never answers.
start() {
    local name=$1 sock=$2 deadline=$((SECONDS + 10))
    shift 2
    echo "+ $*" >>"$tmp/$name.log"
    "${server_pin[@]}" "$@" </dev/null >>"$tmp/$name.log" 2>&1 &
    started_pid=$!
    pids+=("$started_pid")
    # Short bench-qmp waits in a loop, so a server that dies is noticed at once.
    while kill -0 "$started_pid" 2>/dev/null; do
        if "$bench" -w 0.2 -n 0 -c 0 "$sock" 2>/dev/null; then
            return 0
        fi
        if ((SECONDS >= deadline)); then
            echo "no QMP greeting on $sock after 10 s" >>"$tmp/$name.log"
            kill -TERM "$started_pid" 2>/dev/null || true
            break
        fi
    done
    wait "$started_pid" 2>/dev/null || true
    return 1
}

# run_bench NAME SOCK: runs bench-qmp against SOCK; stores its key=value output in R[NAME.key].
declare -A R
run_bench() {
    local name=$1 sock=$2 key val out
    out=$("${client_pin[@]}" "$bench" -n "$n_iter" -c "$c_iter" "$sock") \
        || die "bench-qmp failed against $name"
    while IFS='=' read -r key val; do
        R[$name.$key]=$val
    done <<<"$out"
}

# read_rss NAME PID: stores VmRSS and VmHWM (KiB) of PID in R[NAME.rss_kib], R[NAME.hwm_kib].
read_rss() {
    local name=$1 pid=$2
    [[ -r /proc/$pid/status ]] || die "$name (pid $pid) is gone"
    R[$name.rss_kib]=$(awk '/^VmRSS:/ { print $2 }' "/proc/$pid/status")
    R[$name.hwm_kib]=$(awk '/^VmHWM:/ { print $2 }' "/proc/$pid/status")
}

# stop PID: SIGTERM, then SIGKILL after 5 s.
stop() {
    local pid=$1 i
    kill -TERM "$pid" 2>/dev/null || return 0
    for ((i = 0; i < 50; i++)); do
        kill -0 "$pid" 2>/dev/null || break
        sleep 0.1
    done
    kill -KILL "$pid" 2>/dev/null || true
    wait "$pid" 2>/dev/null || true
}

qsock=$tmp/qemu.sock
tsock=$tmp/thinblkd.sock

start qemu "$qsock" "$qemu_path" -M none -nographic -display none \
        -qmp "unix:$qsock,server=on,wait=off" \
    || die "qemu did not start; log: $(cat "$tmp/qemu.log")"
qemu_pid=$started_pid

if start thinblkd "$tsock" "$thinblkd" \
        --chardev "socket,id=m0,path=$tsock,server=on,wait=off" --monitor chardev=m0; then
    thinblkd_form="--chardev ... --monitor chardev=m0"
else
    # Fall back to the short form, in case the long one is not there yet.
    rm -f "$tsock"
    start thinblkd "$tsock" "$thinblkd" --qmp "$tsock" \
        || die "thinblkd did not start; log: $(cat "$tmp/thinblkd.log")"
    thinblkd_form="--qmp SOCK"
fi
thinblkd_pid=$started_pid

# One after the other, so the idle one does not disturb the other's numbers much.
run_bench thinblkd "$tsock"
run_bench qemu "$qsock"
read_rss thinblkd "$thinblkd_pid"
read_rss qemu "$qemu_pid"
stop "$thinblkd_pid"
stop "$qemu_pid"

cpu_model=$(awk -F': ' '/^model name/ { print $2; exit }' /proc/cpuinfo)
echo "QMP benchmark: $(date -u '+%Y-%m-%d %H:%M:%SZ'), $(uname -sr)"
echo "CPU: ${cpu_model:-unknown}, $ncpu CPUs online; $pin_note"
echo "qemu: $("$qemu_path" --version | head -n 1) (-M none)"
echo "thinblkd: $thinblkd ($thinblkd_form)"
echo "iterations: connect $c_iter, query-status $n_iter (after 200 warm-up)"
echo

row() {  # row METRIC KEY
    awk -v m="$1" -v t="${R[thinblkd.$2]}" -v q="${R[qemu.$2]}" 'BEGIN {
        printf "%-22s | %12s | %12s | %7s\n", m, t, q, (q > 0 ? sprintf("%.2f", t / q) : "n/a") }'
}
printf "%-22s | %12s | %12s | %7s\n" metric thinblkd qemu ratio
printf -- '-----------------------+--------------+--------------+--------\n'
row "connect median (us)" connect_median_us
row "connect p99 (us)" connect_p99_us
row "rtt median (us)" rtt_median_us
row "rtt p99 (us)" rtt_p99_us
row "rtt mean (us)" rtt_mean_us
row "VmRSS (KiB)" rss_kib
row "VmHWM (KiB)" hwm_kib
echo

goal() {  # goal NAME KEY LIMIT
    awk -v n="$1" -v t="${R[thinblkd.$2]}" -v q="${R[qemu.$2]}" -v l="$3" 'BEGIN {
        r = t / q
        printf "goal %-24s ratio %.2f <= %.2f  %s\n", n, r, l, (r <= l ? "PASS" : "MISS") }'
}
goal "rtt median" rtt_median_us 0.5
goal "RSS (VmRSS)" rss_kib 0.2
