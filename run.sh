#!/bin/bash
# Set up, build and run the whole job on its embedded default, in ./run: thinblkd serving a thin
# qcow2 disk over NBD (or, with THINBLK_EXPORT=vhost-user-blk, as a vhost-user-blk device), and
# thinblk-agent keeping it extended.
#
#   run/disk.img   the thin volume: a sparse file attached as a loop device, with a qcow2 image
#                  (16 GiB virtual) made on the device the first time. It starts at 256 MiB; the
#                  agent grows it ahead of the guest's writes (its defaults for loop devices:
#                  by 1 GiB, keeping 512 MiB free past the highest write, never beyond 110% of
#                  the virtual size) and resumes the daemon if it ever stops on ENOSPC.
#   run/qmp.sock   thinblkd's QMP monitor (thinblkctl -s run/qmp.sock ...)
#   run/nbd.sock   the NBD server, exporting the disk as "disk0" (device "disk0"); or, with
#   run/vhost.sock THINBLK_EXPORT=vhost-user-blk, the vhost-user-blk export "disk0" (device
#                  "disk0", 2 queues) for a VMM with shared guest memory (see
#                  docs/thin-provisioning.md; check it with build/src/vhost-io/thinblk-vhost-io)
#
# Both programs log to this terminal. Ctrl-C (or SIGINT to the whole process group, SIGTERM, or
# either program exiting) stops both and detaches the loop device; run/disk.img stays and the next run serves it again (remove it
# to start afresh). The set-up and build run as you; the loop device needs root, so the rest
# runs through sudo when you are not root (scripts/deps.sh does the same for apt-get).
#
# Environment: THINBLK_EXPORT (nbd, the default, or vhost-user-blk: how the disk is exported);
# THINBLK_AGENT=0 to run without the agent (a disk that runs out then stops until you make room
# and send cont yourself); THINBLK_RUN_DIR (default run) for the disk and sockets; THINBLK_BUILD
# (default build) for the programs, built first only when it is build; used only when the disk
# is made: THINBLK_VSIZE (virtual size, default 16G), THINBLK_INITIAL
# (the volume's first size, default 256M). Extra arguments go to thinblkd (e.g. -S to start
# stopped). scripts/demo.sh shows it all with a real guest (it takes THINBLK_EXPORT too).
set -euo pipefail
cd "$(dirname "$0")"

export_type=${THINBLK_EXPORT:-nbd}
case $export_type in
nbd | vhost-user-blk) ;;
*) echo "run.sh: THINBLK_EXPORT must be nbd or vhost-user-blk, not '$export_type'" >&2; exit 2 ;;
esac
case ${THINBLK_AGENT:-1} in
0 | 1) ;;
*) echo "run.sh: THINBLK_AGENT must be 0 or 1, not '$THINBLK_AGENT'" >&2; exit 2 ;;
esac

if [ "${1:-}" = --serve ]; then
    shift
else
    scripts/deps.sh
    if [ -z "${THINBLK_BUILD:-}" ]; then
        [ -d build ] || meson setup build
        ninja -C build
    fi
    if [ "$(id -u)" -ne 0 ]; then
        # sudo resets the environment: pass on what this script reads from it.
        exec sudo -- env THINBLK_EXPORT="$export_type" \
            ${THINBLK_AGENT:+THINBLK_AGENT="$THINBLK_AGENT"} \
            ${THINBLK_RUN_DIR:+THINBLK_RUN_DIR="$THINBLK_RUN_DIR"} \
            ${THINBLK_BUILD:+THINBLK_BUILD="$THINBLK_BUILD"} \
            ${THINBLK_VSIZE:+THINBLK_VSIZE="$THINBLK_VSIZE"} \
            ${THINBLK_INITIAL:+THINBLK_INITIAL="$THINBLK_INITIAL"} \
            "$PWD/run.sh" --serve "$@"
    fi
fi

build=${THINBLK_BUILD:-build}
thinblkd=$build/src/daemon/thinblkd
agent=$build/src/agent/thinblk-agent
ctl=$build/src/ctl/thinblkctl
run=${THINBLK_RUN_DIR:-run}
mkdir -p "$run"
img=$(realpath "$run")/disk.img
die() { echo "run.sh: $*" >&2; exit 1; }

pids=()
cleanup() {
    local pid dev
    trap '' INT TERM  # a second Ctrl-C must not cut the cleanup short
    for pid in "${pids[@]}"; do
        kill -TERM "$pid" 2>/dev/null || true
    done
    for pid in "${pids[@]}"; do
        wait "$pid" 2>/dev/null || true
    done
    # Every loop device on the image, found by its backing file rather than by a variable: a
    # signal between losetup's attach and the assignment of its output would leave it unknown.
    for dev in $(losetup -n -O NAME -j "$img" 2>/dev/null) \
               $(losetup -n -O NAME -j "$img.new" 2>/dev/null); do
        losetup -d "$dev" || true
    done
}
trap cleanup EXIT
trap 'exit 130' INT
trap 'exit 143' TERM

if [ ! -f "$img" ]; then
    # Made under another name and renamed once it holds a qcow2 image, so that an interrupted
    # first run leaves nothing half-made behind.
    truncate -s "${THINBLK_INITIAL:-256M}" "$img.new"
    dev=$(losetup --find --show "$img.new")
    qemu-img create -q -f qcow2 "$dev" "${THINBLK_VSIZE:-16G}"
    mv "$img.new" "$img"
else
    dev=$(losetup --find --show "$img")
    qemu-img info -f qcow2 "$dev" >/dev/null 2>&1 ||
        die "$img holds no qcow2 image: remove it to start afresh"
fi
# What the file takes on the disk (st_blocks), not its apparent size.
read -r blocks block_size apparent < <(stat -c '%b %B %s' "$img")
echo "run.sh: $img on $dev, $((blocks * block_size >> 20)) MiB allocated of $((apparent >> 20)) MiB" >&2

if [ "$export_type" = nbd ]; then
    sock=$run/nbd.sock
    export_args=(--nbd-server "addr.type=unix,addr.path=$sock"
                 --export "type=nbd,id=disk0,node-name=disk0,name=disk0,writable=on")
else
    sock=$run/vhost.sock
    export_args=(--export "type=vhost-user-blk,id=disk0,node-name=disk0,addr.type=unix,addr.path=$sock,writable=on,num-queues=2")
fi
rm -f "$run/qmp.sock" "$run/nbd.sock" "$run/vhost.sock"
"$thinblkd" \
    --chardev "socket,id=mon0,path=$run/qmp.sock,server=on,wait=off" \
    --monitor chardev=mon0 \
    --blockdev "driver=host_device,node-name=proto0,filename=$dev" \
    --blockdev driver=qcow2,node-name=disk0,file=proto0 \
    "${export_args[@]}" \
    --pidfile "$run/thinblkd.pid" \
    -v "$@" </dev/null &
pids+=($!)
for _ in $(seq 200); do
    [ -S "$run/qmp.sock" ] && [ -S "$sock" ] && break
    kill -0 "${pids[0]}" 2>/dev/null || die "thinblkd exited"
    sleep 0.05
done
[ -S "$sock" ] || die "thinblkd did not create its sockets"

if [ "${THINBLK_AGENT:-1}" = 1 ]; then
    # The agent's defaults for a loop device; see thinblk-agent(8) for a configuration file.
    "$agent" --socket "$run/qmp.sock" --device disk0 </dev/null &
    pids+=($!)
    who='thinblkd and thinblk-agent are'
    stop='Ctrl-C stops both'
else
    who='thinblkd is'
    stop="no agent: when the disk runs out, thinblkd stops (io-error) until you make room
(truncate -s +1G $img; losetup -c $dev) and send cont; Ctrl-C stops it"
fi

if [ "$export_type" = nbd ]; then
    what="NBD export \"disk0\" at $sock"
    try="nbdinfo 'nbd+unix:///disk0?socket=$sock'"
else
    what="vhost-user-blk export \"disk0\" at $sock"
    try="$build/src/vhost-io/thinblk-vhost-io -s $sock info   (one frontend at a time)"
fi
cat >&2 <<HELP
run.sh: $who running (QMP $run/qmp.sock, $what);
$stop. From another terminal:
  $ctl -s $run/qmp.sock query-block
  $ctl -s $run/qmp.sock events
  $ctl -s $run/qmp.sock cont
  $try
HELP
# Until either exits.
wait -n "${pids[@]}" || true
