#!/bin/bash
# bench/thin.sh [BUILD_DIR]: thin provisioning under the fastest writer there is. fio writes as
# fast as it can through NBD into a fresh qcow2 image on a loop device, while thinblk-agent
# keeps the device extended; for several chunk/watermark settings, it reports the pauses (STOP
# to RESUME), the total stall, and the time from the space being there to I/O flowing again.
# See README.md ("thin").
#
# Each run (setting x job): a sparse backing file of INITIAL bytes in IMG_DIR, attached as a
# loop device; a qcow2 image of VSIZE made on the device (qemu-img); thinblkd serving it over
# NBD; a QMP event logger (qmp-events.py) on thinblkd's monitor; thinblk-agent watching the
# device with the setting's policy; fio's nbd engine writing. Then everything is stopped and
# the device detached and the file removed. thin-report.py prints the table.
#
# Settings are METHOD:CHUNK:WATERMARK, "-" for the agent's default of that value:
#   loop:-:-        the default policy (the built-in method for loop devices, default sizes)
#   loop:64M:32M    ...
#   hook:64M:16M    the method "hook", with bench/thin-hook.sh, which records when the space is
#                   there (after losetup -c): the stop-to-resume time is measured against it
#   none:-:-        the reference: no agent, the volume big enough from the start (VSIZE plus
#                   10%): the rate this path reaches when nothing has to be extended
#
# Environment (defaults in brackets):
#   SETTINGS  the settings, in order [none:-:- loop:-:- loop:256M:128M loop:64M:32M
#             hook:64M:16M hook:32M:1M]
#   JOBS      seqwrite-1m-qd8 and/or randwrite-4k-qd32 [both]
#   IMG_DIR   where the backing files go [/dev/shm]
#   INITIAL   the backing file's size at the start [64M]
#   VSIZE     the qcow2 image's virtual size [8G]
#   SIZE      the region fio writes: once for the sequential job [2G]
#   RUNTIME   seconds of the random job [10]
#   HOOK_DELAY  seconds thin-hook.sh waits before growing, for slower storage [0]
#   KEEP      1: keep the temporary directory (every log, the events, fio's JSON) [0]
# Needs root (loop devices).
set -euo pipefail

build=${1:-$(cd "$(dirname "$0")/.." && pwd)/build}
read -ra settings <<<"${SETTINGS:-none:-:- loop:-:- loop:256M:128M loop:64M:32M hook:64M:16M hook:32M:1M}"
read -ra jobs <<<"${JOBS:-seqwrite-1m-qd8 randwrite-4k-qd32}"
img_dir=${IMG_DIR:-/dev/shm}
initial=${INITIAL:-64M}
vsize=${VSIZE:-8G}
size=${SIZE:-2G}
runtime=${RUNTIME:-10}
python=/usr/bin/python3
here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
prog=thin.sh
stop_wait=10
# shellcheck source=bench/lib.sh
. "$here/lib.sh"


[[ $(id -u) == 0 ]] || die "needs root (loop devices)"
[[ -d $build ]] || die "build directory not found: $build"
build=$(cd "$build" && pwd)
thinblkd=$build/src/daemon/thinblkd
agent=$build/src/agent/thinblk-agent
[[ -x $thinblkd ]] || die "missing $thinblkd (ninja -C $build)"
[[ -x $agent ]] || die "missing $agent (ninja -C $build)"
[[ -x $python ]] || die "missing $python"
fio=$(need fio "the load generator")
need qemu-img "qemu-utils" >/dev/null
need losetup "util-linux" >/dev/null
"$fio" --enghelp=nbd >/dev/null 2>&1 || die "$fio has no nbd engine"
[[ $runtime =~ ^[0-9]+$ && $runtime -ge 1 ]] || die "RUNTIME must be a whole number of seconds"
for s in "${settings[@]}"; do
    [[ $s =~ ^(none|loop|hook):(-|[0-9]+[KMGkmg]?):(-|[0-9]+[KMGkmg]?)$ ]] || die "bad setting: $s"
done
for j in "${jobs[@]}"; do
    [[ $j == seqwrite-1m-qd8 || $j == randwrite-4k-qd32 ]] || die "unknown job: $j"
done
[[ -d $img_dir ]] || die "IMG_DIR not found: $img_dir"
size_bytes=$(numfmt --from=iec "$size") || die "bad SIZE"
avail=$(($(stat -f -c '%a * %S' "$img_dir")))
((avail > size_bytes * 3 / 2)) || die "$img_dir has $avail bytes free; SIZE=$size needs more"

tmp=$(mktemp -d /tmp/thinblk-bench-thin.XXXXXX)
loopdev=
backing=
cleanup() {
    kill_all
    [[ -z $loopdev ]] || losetup -d "$loopdev" 2>/dev/null || true
    [[ -z $backing ]] || rm -f "$backing"
    if [[ ${KEEP:-0} == 1 ]]; then
        note "kept $tmp"
    else
        rm -rf "$tmp"
    fi
}
trap cleanup EXIT
trap 'exit 130' INT TERM

# wait_for WHAT SECONDS CMD...: polls CMD every 20 ms until it succeeds.
wait_for() {
    local what=$1 deadline=$((SECONDS + $2))
    shift 2
    until "$@"; do
        ((SECONDS < deadline)) || { note "timed out waiting for $what"; return 1; }
        sleep 0.02
    done
}

# Lines of stdin, each prefixed with the wall-clock time it was read (seconds, float).
stamp() {
    "$python" -u -c '
import sys, time
for line in sys.stdin:
    sys.stdout.write("%.6f %s" % (time.time(), line))
    sys.stdout.flush()'
}

# agent_config FILE METHOD CHUNK WATERMARK SOCK
agent_config() {
    {
        echo "[agent]"
        echo "[daemon bench]"
        echo "socket = $5"
        echo "[disk disk0]"
        echo "daemon = bench"
        echo "device = disk0"
        echo "method = $2"
        [[ $2 != hook ]] || echo "hook = $here/thin-hook.sh"
        [[ $3 == - ]] || echo "chunk = $3"
        [[ $4 == - ]] || echo "watermark = $4"
    } >"$1"
}

run_one() {  # run_one SETTING JOB DIR
    local setting=$1 job=$2 dir=$3 method chunk watermark
    IFS=: read -r method chunk watermark <<<"$setting"
    mkdir -p "$dir"
    echo "setting=$setting job=$job method=$method chunk=$chunk watermark=$watermark" \
        "initial=$initial vsize=$vsize size=$size runtime=$runtime" >"$dir/meta"

    backing=$(mktemp "$img_dir/thinblk-bench-thin.XXXXXX.img")
    if [[ $method == none ]]; then
        truncate -s $(($(numfmt --from=iec "$vsize") * 11 / 10)) "$backing"
    else
        truncate -s "$initial" "$backing"
    fi
    loopdev=$(losetup --find --show "$backing")
    qemu-img create -q -f qcow2 "$loopdev" "$vsize"

    local qmp=$dir/qmp.sock nbd=$dir/nbd.sock
    "$thinblkd" --chardev "socket,id=mon0,path=$qmp,server=on,wait=off" --monitor chardev=mon0 \
        --blockdev "driver=host_device,node-name=proto0,filename=$loopdev" \
        --blockdev "driver=qcow2,node-name=disk0,file=proto0" \
        --nbd-server "addr.type=unix,addr.path=$nbd" \
        --export "type=nbd,id=disk0,node-name=disk0,name=disk0,writable=on" \
        </dev/null >"$dir/thinblkd.log" 2>&1 &
    local dpid=$!
    pids+=("$dpid")
    wait_for "thinblkd's sockets" 10 test -S "$nbd" -a -S "$qmp"

    "$python" "$here/qmp-events.py" "$qmp" "$dir/events.jsonl" &
    local epid=$!
    pids+=("$epid")
    wait_for "the event logger" 10 grep -qs '"ready"' "$dir/events.jsonl"

    local apid=
    if [[ $method != none ]]; then
        agent_config "$dir/agent.conf" "$method" "$chunk" "$watermark" "$qmp"
        THIN_HOOK_LOG=$dir/hook.log THIN_HOOK_DELAY=${HOOK_DELAY:-0} \
            "$agent" --config "$dir/agent.conf" -v </dev/null 2> >(stamp >"$dir/agent.log") &
        apid=$!
        pids+=("$apid")
        # Ready once it has connected and nothing is left to do before the writer starts (its
        # first extension, if the initial size is below the watermark, is not part of the run).
        wait_for "the agent's connection" 10 grep -qs "connected" "$dir/agent.log"
        wait_for "the agent to be idle" 30 "$python" "$here/thin-report.py" --idle "$dir"
    fi
    date +%s.%N >"$dir/fio-start"

    local fio_args=(--name="$job" --ioengine=nbd --uri="nbd+unix:///disk0?socket=$nbd"
                    --size="$size" --output-format=json --output="$dir/fio.json")
    case $job in
    seqwrite-1m-qd8) fio_args+=(--rw=write --bs=1m --iodepth=8) ;;
    randwrite-4k-qd32) fio_args+=(--rw=randwrite --bs=4k --iodepth=32 --time_based
                                  --runtime="$runtime" --norandommap --randrepeat=0) ;;
    esac
    if ! "$fio" "${fio_args[@]}" >"$dir/fio.out" 2>&1; then
        note "fio failed in $setting $job: $(tail -n 3 "$dir/fio.out")"
        echo failed >"$dir/fio-failed"
    fi
    date +%s.%N >"$dir/fio-end"
    stat -c %s "$backing" >"$dir/final-size"

    [[ -z $apid ]] || stop "$apid"
    stop "$dpid"    # the event logger sees EOF and exits
    wait "$epid" 2>/dev/null || true
    forget "$epid"
    losetup -d "$loopdev"
    loopdev=
    rm -f "$backing"
    backing=
}

n=0
for s in "${settings[@]}"; do
    for j in "${jobs[@]}"; do
        n=$((n + 1))
        note "run $n: $s $j"
        run_one "$s" "$j" "$tmp/run$(printf %02d $n)"
    done
done

echo "# bench/thin on $(uname -n), $(date -u +%Y-%m-%dT%H:%MZ)"
echo
echo "$(nproc) CPUs ($(sed -n 's/^model name[[:space:]]*: //p' /proc/cpuinfo | head -n1)); load" \
     "$(cut -d' ' -f1-3 /proc/loadavg); backing files on $img_dir ($(stat -f -c %T "$img_dir"));" \
     "fio $("$fio" --version)"
echo
"$python" "$here/thin-report.py" "$tmp"/run*
