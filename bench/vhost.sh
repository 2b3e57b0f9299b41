#!/bin/bash
# bench/vhost.sh [BUILD_DIR]: the vhost-user-blk data path, thinblkd against
# qemu-storage-daemon, in one run, driven by thinblk-vhost-io's bench mode; thinblkd's own NBD
# export (fio's nbd engine, as bench/nbd.sh) on the 4k random-read jobs, and fio io_uring on the
# file as the no-server limit. See README.md.
#
# One image file of random data (not sparse) on tmpfs is served by each server in turn. Each
# (job, server) pair gets a freshly started server, so every row's peak RSS and CPU time belong
# to that job alone. All servers are buffered (the page cache, which on tmpfs is the file).
#
# Environment (defaults in brackets):
#   SIZE     image size, with an IEC suffix [1G]
#   IMG_DIR  a tmpfs directory for the image [/dev/shm]
#   RUNTIME  seconds per job [10] (thinblk-vhost-io has no warm-up; RAMP is fio's only) RAMP [1]
#   REPEAT   rounds of every job and server; each row is the round with the median
#            throughput, and a column gives the spread [1]
#   SERVERS  which rows, in order [thinblkd qsd thinblkd-nbd raw]
#   JOBS     which jobs, in order [all of them, see the table below]
#   PIN      1: servers on CPU 0, the client on CPU 1 [0: nothing pinned]
#   KEEP     1: keep the temporary directory (logs, JSON) and say where [0]
# Exits non-zero if a binary is missing or nothing could run; a server that cannot start, or a
# job that fails against it, is reported in its row and the run goes on.
set -euo pipefail

build=${1:-$(cd "$(dirname "$0")/.." && pwd)/build}
size=${SIZE:-1G}
img_dir=${IMG_DIR:-/dev/shm}
runtime=${RUNTIME:-10}
ramp=${RAMP:-1}
repeat=${REPEAT:-1}
read -ra servers <<<"${SERVERS:-thinblkd qsd thinblkd-nbd raw}"
python=/usr/bin/python3
here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
prog=vhost.sh
# shellcheck source=bench/lib.sh
. "$here/lib.sh"
report=$here/vhost-report.py

# name rw bs iodepth queues. Queues are virtqueues for the vhost-user rows; for the NBD and raw
# rows they are fio processes (one NBD connection each), the nearest equivalent.
all_jobs=(
    "randread-4k-qd1      randread  4k 1  1"
    "randread-4k-qd1-2q   randread  4k 1  2"
    "randread-4k-qd32     randread  4k 32 1"
    "randread-4k-qd32-2q  randread  4k 32 2"
    "randwrite-4k-qd1     randwrite 4k 1  1"
    "randwrite-4k-qd1-2q  randwrite 4k 1  2"
    "randwrite-4k-qd32    randwrite 4k 32 1"
    "randwrite-4k-qd32-2q randwrite 4k 32 2"
    "seqread-1m-qd8       read      1M 8  1"
    "seqwrite-1m-qd8      write     1M 8  1"
)

[[ $runtime =~ ^[0-9]+$ && $runtime -ge 2 ]] || die "RUNTIME must be an integer >= 2"
[[ $ramp =~ ^[0-9]+$ ]] || die "RAMP must be a whole number of seconds"
[[ $repeat =~ ^[0-9]+$ && $repeat -ge 1 ]] || die "REPEAT must be a positive integer"
[[ -x $python ]] || die "missing $python"
[[ -r $report ]] || die "missing $report"
[[ -d $build ]] || die "build directory not found: $build"
build=$(cd "$build" && pwd)
vio=$build/src/vhost-io/thinblk-vhost-io
[[ -x $vio ]] || die "missing $vio (build it: ninja -C $build)"
declare -A bin
for s in "${servers[@]}"; do
    case $s in
    thinblkd | thinblkd-nbd)
        bin[$s]=$build/src/daemon/thinblkd
        [[ -x ${bin[$s]} ]] || die "missing ${bin[$s]} (build it: ninja -C $build)" ;;
    qsd) bin[$s]=$(need qemu-storage-daemon "package qemu-system-x86 or qemu-utils") ;;
    raw) ;;
    *) die "unknown server in SERVERS: $s" ;;
    esac
done
if [[ " ${servers[*]} " == *" thinblkd-nbd "* || " ${servers[*]} " == *" raw "* ]]; then
    fio=$(need fio "the load generator of the thinblkd-nbd and raw rows")
fi
if [[ " ${servers[*]} " == *" thinblkd-nbd "* ]]; then
    nbdinfo=$(need nbdinfo "libnbd-bin: waits for thinblkd's NBD socket")
    "$fio" --enghelp=nbd >/dev/null 2>&1 || die "$fio has no nbd engine"
fi

select_jobs
setup_pin "the client"
check_image_dir "$img_dir" "$size"

tmp=$(mktemp -d /tmp/thinblk-bench-vhost.XXXXXX)
img=$(mktemp "$img_dir/thinblk-bench-vhost.XXXXXX.img")
cleanup() {
    kill_all
    rm -f "$img"
    remove_tmp "$tmp"
}
trap cleanup EXIT
trap 'exit 130' INT TERM

# Random data written once, so no server or file system can shortcut holes or zeroes.
dd if=/dev/urandom of="$img" bs=1M count=$((size_bytes >> 20)) iflag=fullblock \
    status=none conv=fsync

# server_cmd NAME SOCK: the command line of server NAME on SOCK, in the array cmd. The
# vhost-user servers write SOCK.pid once their export is in place (vhost_ready): a probe
# connection would take the export's one frontend slot.
server_cmd() {
    local sock=$2
    local vhost="type=vhost-user-blk,id=e0,node-name=f0,addr.type=unix,addr.path=$sock"
    vhost+=",writable=on,num-queues=2"
    case $1 in
    thinblkd | qsd)
        cmd=("${bin[$1]}"
             --blockdev "driver=file,node-name=f0,filename=$img,cache.direct=off"
             --export "$vhost" --pidfile "$sock.pid") ;;
    thinblkd-nbd)
        cmd=("${bin[$1]}"
             --blockdev "driver=file,node-name=f0,filename=$img,cache.direct=off"
             --nbd-server "addr.type=unix,addr.path=$sock"
             --export "type=nbd,id=e0,node-name=f0,name=disk,writable=on") ;;
    esac
}

vhost_ready() { [[ -s $1.pid ]]; }

results=$tmp/results.tsv
: >"$results"

# run_one JOB SERVER ROUND: one run of JOB against a fresh SERVER (or the raw file); appends a
# line to $results: job server status json cpu_s wall_s hwm_kib.
run_one() {
    local job=$1 name=$2 round=$3 jname rw bs depth queues
    read -r jname rw bs depth queues <<<"$job"
    local sock=$tmp/$name.sock log=$tmp/$jname.$name.$round.log
    local json=$tmp/$jname.$name.$round.json
    local pid='' client margin t0 skip_s hwm=- cpu=- wall=- rc=0

    # Server CPU is sampled inside the measured period, away from either end, as a rate; CPU
    # per request is that rate over the client's requests per second.
    margin=$((runtime >= 4 ? 500000 : 250000))
    case $name in
    thinblkd | qsd)
        # Options before the mode: thinblk-vhost-io takes none after it.
        client=("$vio" -s "$sock" -q "$queues" -d "$depth" -b "$bs" -t "$runtime")
        [[ $rw == rand* ]] && client+=(--random)
        [[ $rw == *write ]] && client+=(-w)
        client+=(bench)
        skip_s=0 ;;
    thinblkd-nbd | raw)
        client=("$fio" --name="$jname" --rw="$rw" --bs="$bs" --iodepth="$depth"
                --numjobs="$queues" --group_reporting --time_based --runtime="$runtime"
                --ramp_time="$ramp" --norandommap --randrepeat=0 --output-format=json
                --output="$json")
        if [[ $name == raw ]]; then
            client+=(--ioengine=io_uring --filename="$img" --direct=0)
        else
            client+=(--ioengine=nbd --uri="nbd+unix:///disk?socket=$sock")
        fi
        skip_s=$ramp ;;
    esac

    if [[ $name != raw ]]; then
        rm -f "$sock" "$sock.pid"
        local ready=vhost_ready
        [[ $name == thinblkd-nbd ]] && ready=nbd_ready
        if ! start_server "$name" "$sock" "$log" "$ready"; then
            note "$name did not start for $jname, skipped; log:"
            sed 's/^/    /' "$log" | tail -n 5 >&2
            printf '%s\t%s\tskipped\t-\t-\t-\t-\n' "$jname" "$name" >>"$results"
            return 0
        fi
        pid=$started_pid
    fi

    echo "+ ${client[*]}" >>"$log"
    t0=$(now_us)
    if [[ ${client[0]} == "$vio" ]]; then
        # Its last line of output is the JSON summary.
        "${client_pin[@]}" "${client[@]}" >"$json.out" 2>>"$log" &
    else
        "${client_pin[@]}" "${client[@]}" >>"$log" 2>&1 &
    fi
    local client_pid=$!
    pids+=("$client_pid")
    if [[ -n $pid ]]; then
        cpu_window "$pid" $((t0 + skip_s * 1000000 + margin)) \
            $((t0 + (skip_s + runtime) * 1000000 - margin))
        cpu=$window_cpu wall=$window_wall
    fi
    wait "$client_pid" || rc=$?
    forget "$client_pid"
    if [[ -f $json.out ]]; then
        cat "$json.out" >>"$log"
        tail -n 1 "$json.out" >"$json"
    fi
    if ((rc != 0)); then
        note "the client failed: $jname against $name; log:"
        sed 's/^/    /' "$log" | tail -n 5 >&2
        printf '%s\t%s\tfailed\t-\t-\t-\t-\n' "$jname" "$name" >>"$results"
        [[ -z $pid ]] || stop "$pid"
        return 0
    fi
    if [[ -n $pid ]]; then
        hwm=$(awk '/^VmHWM:/ { print $2 }' "/proc/$pid/status")
        stop "$pid"
    fi
    printf '%s\t%s\tok\t%s\t%s\t%s\t%s\n' "$jname" "$name" "$json" "$cpu" "$wall" "$hwm" \
        >>"$results"
}

# wants SERVER JOB: whether SERVER has a row in JOB (thinblkd's NBD export only in the 4k
# random reads, the comparison its goal is about).
wants() {
    [[ $1 != thinblkd-nbd || $2 == randread-4k-* ]]
}

version() {
    case $1 in
    thinblkd | thinblkd-nbd) echo "${bin[$1]}" ;;
    qsd) "${bin[qsd]}" --version | head -n 1 ;;
    raw) "$fio" --version ;;
    esac
}

cpu_model=$(awk -F': ' '/^model name/ { print $2; exit }' /proc/cpuinfo)
echo "vhost-user-blk benchmark: $(date -u '+%Y-%m-%d %H:%M:%SZ'), $(uname -sr)"
echo "CPU: ${cpu_model:-unknown}, $(nproc) CPUs online; $pin_note"
echo "load average before: $(loadavg) (other work on the machine skews every number)"
echo "image: $size random data on $img_fs ($img_dir), all servers buffered"
echo "each job: ${runtime} s (fio rows: ${ramp} s ramp first); a fresh server per job and" \
     "server; $repeat round(s)"
echo "client: thinblk-vhost-io bench (vhost-user rows), fio nbd engine (thinblkd-nbd)," \
     "fio io_uring (raw)"
for s in "${servers[@]}"; do
    [[ $s == raw ]] || echo "$s: $(version "$s")"
done

# Rounds outermost, so a burst of outside load hits one round of many rows, not every round
# of one row.
for ((round = 1; round <= repeat; round++)); do
    for job in "${job_list[@]}"; do
        for s in "${servers[@]}"; do
            wants "$s" "${job%% *}" || continue
            note "round $round/$repeat, ${job%% *}: $s"
            run_one "$job" "$s" "$round"
        done
    done
done

echo "load average after: $(loadavg)"
echo
"$python" "$report" "$results"
grep -q $'\tok\t' "$results" || die "no job ran"
