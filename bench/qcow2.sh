#!/bin/bash
# bench/qcow2.sh [BUILD_DIR]: the qcow2 data path over NBD, thinblkd against
# qemu-storage-daemon and qemu-nbd, in one run. See README.md.
#
# Every server serves a qcow2 image (64 KiB clusters) on tmpfs through a qcow2 node over a
# buffered file node; fio's nbd engine drives it over a Unix socket. Each (job, server, round)
# gets a freshly started server and its own copy of the job's starting image:
#   alloc-* jobs   a fresh, empty image (qemu-img create), written once per run by a fixed
#                  amount of I/O (not time-based) and flushed at the end (end_fsync);
#   the others     a fully allocated image (random data, written sequentially once by
#                  qemu-img convert), time-based like bench/nbd.sh.
# After each job the server is stopped and `qemu-img check` must find the image clean; a
# corrupt image is reported in its row, on stderr as it happens, at the end, and in the exit
# status (3).
#
# Environment (defaults in brackets):
#   SIZE      virtual size of the image, with an IEC suffix [1G]
#   RAND_IO   bytes written by alloc-randwrite-4k-qd32, 4k writes at distinct random offsets
#             [SIZE/16: on average one write per 64 KiB cluster, ~63% of them allocating]
#   IMG_DIR   a tmpfs directory for the images [/dev/shm]
#   RUNTIME   seconds measured per time-based job [10]   RAMP  seconds of warm-up [1]
#   REPEAT    rounds of every job and server; each row is the round with the median
#             throughput, and a column gives the spread [3]
#   SERVERS   which rows, in order [thinblkd qsd qemu-nbd]
#   JOBS      which jobs, in order [all of them, see the table below]
#   AIO       the aio mode asked of qsd and qemu-nbd [io_uring; threads if that fails]
#   PIN       1: servers on CPU 0, fio on CPU 1 [0: nothing pinned]
#   KEEP      1: keep the temporary directory (logs, fio and check JSON) and say where [0]
# Quick smoke run: REPEAT=1 RUNTIME=2 RAMP=0 SIZE=256M bench/qcow2.sh build
# Exits non-zero if a binary is missing or nothing could run (1), or if any image failed
# qemu-img check (3); a server that cannot start, or a job that fails against it, is
# reported in its row and the run goes on.
set -euo pipefail

build=${1:-$(cd "$(dirname "$0")/.." && pwd)/build}
size=${SIZE:-1G}
img_dir=${IMG_DIR:-/dev/shm}
runtime=${RUNTIME:-10}
ramp=${RAMP:-1}
repeat=${REPEAT:-3}
aio_want=${AIO:-io_uring}
read -ra servers <<<"${SERVERS:-thinblkd qsd qemu-nbd}"
python=/usr/bin/python3
here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
prog=qcow2.sh
# shellcheck source=bench/lib.sh
. "$here/lib.sh"
report=$here/qcow2-report.py
cluster=65536

# name kind rw bs iodepth. kind: alloc (fresh image, fixed amount, end_fsync) or steady
# (allocated image, time-based).
all_jobs=(
    "alloc-seqwrite-64k-qd8   alloc  write     64k 8"
    "alloc-randwrite-4k-qd32  alloc  randwrite 4k  32"
    "randread-4k-qd32         steady randread  4k  32"
    "randwrite-4k-qd32        steady randwrite 4k  32"
)


[[ $runtime =~ ^[0-9]+$ && $runtime -ge 2 ]] || die "RUNTIME must be an integer >= 2"
[[ $ramp =~ ^[0-9]+$ ]] || die "RAMP must be a whole number of seconds"
[[ $repeat =~ ^[0-9]+$ && $repeat -ge 1 ]] || die "REPEAT must be a positive integer"
[[ $aio_want =~ ^(io_uring|threads|native)$ ]] || die "AIO must be io_uring, threads or native"
[[ -x $python ]] || die "missing $python"
[[ -r $report ]] || die "missing $report"
fio=$(need fio "the load generator")
nbdinfo=$(need nbdinfo "libnbd-bin: waits for each server's socket")
qemu_img=$(need qemu-img "package qemu-utils: makes and checks the images")
"$fio" --enghelp=nbd >/dev/null 2>&1 || die "$fio has no nbd engine"
declare -A bin aio
for s in "${servers[@]}"; do
    case $s in
    thinblkd)
        [[ -d $build ]] || die "build directory not found: $build"
        bin[$s]=$(cd "$build" && pwd)/src/daemon/thinblkd
        [[ -x ${bin[$s]} ]] || die "missing ${bin[$s]} (build it: ninja -C $build)" ;;
    qsd) bin[$s]=$(need qemu-storage-daemon "package qemu-system-x86 or qemu-utils") ;;
    qemu-nbd) bin[$s]=$(need qemu-nbd "package qemu-utils") ;;
    *) die "unknown server in SERVERS: $s" ;;
    esac
done

select_jobs
need_full=
for j in "${job_list[@]}"; do
    read -r _ kind _ <<<"$j"
    [[ $kind == steady ]] && need_full=1
done

setup_pin fio

size_bytes=$(numfmt --from=iec "$size") || die "bad SIZE: $size"
((size_bytes > 0 && size_bytes % (1 << 20) == 0)) || die "SIZE must be a whole number of MiB"
rand_io=$(numfmt --from=iec "${RAND_IO:-$((size_bytes / 16))}") || die "bad RAND_IO"
((rand_io > 0 && rand_io % 4096 == 0 && rand_io <= size_bytes)) ||
    die "RAND_IO must be a multiple of 4 KiB, at most SIZE"
[[ -d $img_dir ]] || die "IMG_DIR not found: $img_dir"
img_fs=$(stat -f -c %T "$img_dir")
[[ $img_fs == tmpfs ]] || note "warning: $img_dir is $img_fs, not tmpfs; numbers include that file system"
# At most: the allocated image, its raw source while it is made (or one working copy), and
# one working copy with its metadata.
avail=$(($(stat -f -c '%a * %S' "$img_dir")))
((avail > 2 * size_bytes + size_bytes / 64 + (64 << 20))) ||
    die "$img_dir has $avail bytes free, the run needs about twice SIZE ($size_bytes)"

tmp=$(mktemp -d /tmp/thinblk-bench-qcow2.XXXXXX)
work=$(mktemp -d "$img_dir/thinblk-bench-qcow2.XXXXXX")
empty=$work/empty.qcow2 full=$work/full.qcow2 img=$work/run.qcow2
cleanup() {
    kill_all
    rm -rf "$work"
    if [[ ${KEEP:-0} == 1 ]]; then
        note "kept $tmp"
    else
        rm -rf "$tmp"
    fi
}
trap cleanup EXIT
trap 'exit 130' INT TERM

hz=$(getconf CLK_TCK)

# server_cmd NAME SOCK: the command line of server NAME on SOCK serving $img, in the array cmd.
server_cmd() {
    local sock=$2
    case $1 in
    thinblkd)
        cmd=("${bin[thinblkd]}"
             --blockdev "driver=file,node-name=f0,filename=$img,cache.direct=off"
             --blockdev "driver=qcow2,node-name=q0,file=f0"
             --nbd-server "addr.type=unix,addr.path=$sock"
             --export "type=nbd,id=e0,node-name=q0,name=disk,writable=on") ;;
    qsd)
        cmd=("${bin[qsd]}"
             --blockdev "driver=file,node-name=f0,filename=$img,cache.direct=off,aio=${aio[qsd]}"
             --blockdev "driver=qcow2,node-name=q0,file=f0"
             --nbd-server "addr.type=unix,addr.path=$sock"
             --export "type=nbd,id=e0,node-name=q0,name=disk,writable=on") ;;
    qemu-nbd)
        # -t: survive the readiness probe's disconnect.
        cmd=("${bin[qemu-nbd]}" -k "$sock" -f qcow2 -x disk --cache=writeback
             "--aio=${aio[qemu-nbd]}" -t "$img") ;;
    esac
}

# check IMG JSON: qemu-img check of IMG, its JSON report in JSON; prints clean, leaks,
# CORRUPT or check-failed (qemu-img check's exit status 0, 3, 2, anything else).
check() {
    local rc=0
    "$qemu_img" check -f qcow2 --output=json "$1" >"$2" 2>&1 || rc=$?
    case $rc in
    0) echo clean ;;
    3) echo leaks ;;
    2) echo CORRUPT ;;
    *) echo check-failed ;;
    esac
}

# Probe the aio mode: a server that cannot open its file with it does not start.
probe_aio() {
    local name=$1 log=$tmp/probe.$1.log
    aio[$name]=$aio_want
    cp "$empty" "$img"
    if start_nbd "$name" "$tmp/probe.sock" "$log"; then
        stop "$started_pid" "$log"
    elif [[ $aio_want != threads ]]; then
        note "$name did not start with aio=$aio_want, using aio=threads; log:"
        sed 's/^/    /' "$log" | tail -n 3 >&2
        aio[$name]=threads
    fi
    rm -f "$img" "$tmp/probe.sock"
}

results=$tmp/results.tsv
: >"$results"
bad_images=0

# run_one JOB SERVER ROUND: one fio run of JOB against a fresh SERVER on a fresh copy of the
# job's image; appends a line to $results:
# job kind server status json cpu_s wall_s hwm check check_json.
run_one() {
    local job=$1 name=$2 round=$3 jname kind rw bs depth
    read -r jname kind rw bs depth <<<"$job"
    local sock=$tmp/$name.sock log=$tmp/$jname.$name.$round.log
    local json=$tmp/$jname.$name.$round.json chk=$tmp/$jname.$name.$round.check.json
    local pid t0 c1='' c2='' w1 w2 hwm=- cpu=- wall=- verdict margin
    local args=(--name="$jname" --rw="$rw" --bs="$bs" --iodepth="$depth" --numjobs=1
                --output-format=json --output="$json"
                --ioengine=nbd --uri="nbd+unix:///disk?socket=$sock")
    if [[ $kind == alloc ]]; then
        cp "$empty" "$img"
        # The whole image (write), or RAND_IO bytes at distinct random 4k offsets, the same
        # offsets for every server; the final flush is part of the job.
        args+=(--randrepeat=1 --randseed=20240611 --end_fsync=1)
        [[ $rw == randwrite ]] && args+=(--io_size="$rand_io")
    else
        cp "$full" "$img"
        args+=(--time_based --runtime="$runtime" --ramp_time="$ramp" --norandommap
               --randrepeat=0)
    fi

    rm -f "$sock"
    if ! start_nbd "$name" "$sock" "$log"; then
        note "$name did not start for $jname, skipped; log:"
        sed 's/^/    /' "$log" | tail -n 5 >&2
        printf '%s\t%s\t%s\tskipped\t-\t-\t-\t-\t-\t-\n' "$jname" "$kind" "$name" >>"$results"
        rm -f "$img"
        return 0
    fi
    pid=$started_pid

    echo "+ fio ${args[*]}" >>"$log"
    local fio_rc=0 fio_pid
    if [[ $kind == alloc ]]; then
        # The server's CPU over the whole fio run: CPU per op is that over fio's op count.
        c1=$(cpu_ticks "$pid") && w1=$(now_us)
        "${client_pin[@]}" "$fio" "${args[@]}" >>"$log" 2>&1 || fio_rc=$?
        c2=$(cpu_ticks "$pid") && w2=$(now_us)
    else
        # Sampled inside the measured period (after the ramp, away from either end), as a
        # rate; CPU per op is that rate over fio's ops per second.
        margin=$((runtime >= 4 ? 500000 : 250000))
        t0=$(now_us)
        "${client_pin[@]}" "$fio" "${args[@]}" >>"$log" 2>&1 &
        fio_pid=$!
        pids+=("$fio_pid")
        sleep_until_us $((t0 + ramp * 1000000 + margin))
        c1=$(cpu_ticks "$pid") && w1=$(now_us)
        sleep_until_us $((t0 + (ramp + runtime) * 1000000 - margin))
        c2=$(cpu_ticks "$pid") && w2=$(now_us)
        wait "$fio_pid" || fio_rc=$?
        forget "$fio_pid"
    fi
    hwm=$(awk '/^VmHWM:/ { print $2 }' "/proc/$pid/status" 2>/dev/null) || hwm=-
    stop "$pid" "$log"
    verdict=$(check "$img" "$chk")
    rm -f "$img"
    if [[ $verdict != clean ]]; then
        bad_images=$((bad_images + 1))
        note "*** qemu-img check: image $verdict after $jname against $name (round $round):"
        sed 's/^/    /' "$chk" | head -n 20 >&2
    fi
    if ((fio_rc != 0)); then
        note "fio failed: $jname against $name; log:"
        sed 's/^/    /' "$log" | tail -n 5 >&2
        printf '%s\t%s\t%s\tfailed\t-\t-\t-\t-\t%s\t%s\n' "$jname" "$kind" "$name" "$verdict" \
            "$chk" >>"$results"
        return 0
    fi
    if [[ -n $c1 && -n $c2 ]]; then
        cpu=$(awk -v d=$((c2 - c1)) -v hz="$hz" 'BEGIN { printf "%.4f", d / hz }')
        wall=$(awk -v d=$((w2 - w1)) 'BEGIN { printf "%.6f", d / 1e6 }')
    fi
    printf '%s\t%s\t%s\tok\t%s\t%s\t%s\t%s\t%s\t%s\n' "$jname" "$kind" "$name" "$json" "$cpu" \
        "$wall" "${hwm:--}" "$verdict" "$chk" >>"$results"
}

version() {
    case $1 in
    thinblkd) echo "${bin[thinblkd]}" ;;
    qsd) "${bin[qsd]}" --version | head -n 1 ;;
    qemu-nbd) "${bin[qemu-nbd]}" --version | head -n 1 ;;
    esac
}


# The starting images: one empty, one allocated (random data, so nothing can shortcut zeroes).
"$qemu_img" create -q -f qcow2 -o cluster_size=$cluster "$empty" "$size_bytes"
for s in "${servers[@]}"; do
    [[ $s == thinblkd ]] || probe_aio "$s"
done
if [[ -n $need_full ]]; then
    note "writing the allocated image ($size of random data)"
    dd if=/dev/urandom of="$work/full.raw" bs=1M count=$((size_bytes >> 20)) iflag=fullblock \
        status=none
    "$qemu_img" convert -f raw -O qcow2 -o cluster_size=$cluster "$work/full.raw" "$full"
    rm -f "$work/full.raw"
    [[ $(check "$full" "$tmp/full.check.json") == clean ]] ||
        die "the allocated image made by qemu-img convert is not clean"
fi

cpu_model=$(awk -F': ' '/^model name/ { print $2; exit }' /proc/cpuinfo)
echo "qcow2 benchmark: $(date -u '+%Y-%m-%d %H:%M:%SZ'), $(uname -sr)"
echo "CPU: ${cpu_model:-unknown}, $(nproc) CPUs online; $pin_note"
echo "load average before: $(loadavg) (other work on the machine skews every number)"
echo "image: qcow2, $size, cluster_size=$cluster, on $img_fs ($img_dir); all servers buffered" \
     "(cache.direct=off), a qcow2 node over a file node"
echo "alloc jobs: a fresh empty image each, written once (seq: all of it; rand: $rand_io bytes" \
     "at distinct 4k offsets), end_fsync; others: a copy of one allocated image," \
     "${ramp} s ramp + ${runtime} s measured"
echo "a fresh server and image per job, server and round; $repeat round(s); qemu-img check after each"
echo "fio: $("$fio" --version), nbd engine over a Unix socket"
for s in "${servers[@]}"; do
    line="$s: $(version "$s")"
    [[ $s == thinblkd ]] || line+=", aio=${aio[$s]}"
    echo "$line"
done

# Rounds outermost, so a burst of outside load hits one round of many rows, not every round
# of one row.
for ((round = 1; round <= repeat; round++)); do
    for job in "${job_list[@]}"; do
        for s in "${servers[@]}"; do
            note "round $round/$repeat, ${job%% *}: $s"
            run_one "$job" "$s" "$round"
        done
    done
done

echo "load average after: $(loadavg)"
echo
"$python" "$report" "$results"
if ((bad_images > 0)); then
    echo
    echo "*** $bad_images image(s) FAILED qemu-img check (see the check column); the numbers" \
         "of those rows are not to be trusted. ***"
    note "$bad_images image(s) failed qemu-img check"
    exit 3
fi
grep -q $'\tok\t' "$results" || die "no job ran"
