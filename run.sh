#!/bin/bash
# Set up, build and run the whole job on its embedded default, in ./run: thinblkd serving a thin
# qcow2 disk over NBD, and thinblk-agent keeping it extended.
#
#   run/disk.img   the thin volume: a sparse file attached as a loop device, with a qcow2 image
#                  (16 GiB virtual) made on the device the first time. It starts at 256 MiB; the
#                  agent grows it ahead of the guest's writes (its defaults for loop devices:
#                  by 1 GiB, keeping 512 MiB free past the highest write, never beyond 110% of
#                  the virtual size) and resumes the daemon if it ever stops on ENOSPC.
#   run/qmp.sock   thinblkd's QMP monitor (thinblkctl -s run/qmp.sock ...)
#   run/nbd.sock   the NBD server, exporting the disk as "disk0" (device "disk0")
#
# Both programs log to this terminal. Ctrl-C (or SIGTERM, or either program exiting) stops both
# and detaches the loop device; run/disk.img stays and the next run serves it again (remove it
# to start afresh). The set-up and build run as you; the loop device needs root, so the rest
# runs through sudo when you are not root (scripts/deps.sh does the same for apt-get).
#
# Environment, used only when run/disk.img is made: THINBLK_VSIZE (virtual size, default 16G),
# THINBLK_INITIAL (the volume's first size, default 256M). Extra arguments go to thinblkd (e.g.
# -S to start stopped). scripts/demo.sh shows it all with a real guest.
set -euo pipefail
cd "$(dirname "$0")"

if [ "${1:-}" = --serve ]; then
    shift
else
    scripts/deps.sh
    [ -d build ] || meson setup build
    ninja -C build
    if [ "$(id -u)" -ne 0 ]; then
        exec sudo -- "$PWD/run.sh" --serve "$@"
    fi
fi

thinblkd=build/src/daemon/thinblkd
agent=build/src/agent/thinblk-agent
img=$PWD/run/disk.img
die() { echo "run.sh: $*" >&2; exit 1; }

mkdir -p run
dev=
pids=()
cleanup() {
    local pid
    for pid in "${pids[@]}"; do
        kill -TERM "$pid" 2>/dev/null || true
    done
    for pid in "${pids[@]}"; do
        wait "$pid" 2>/dev/null || true
    done
    [ -z "$dev" ] || losetup -d "$dev" || true
}
trap cleanup EXIT
trap 'exit 130' INT TERM

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
echo "run.sh: $img on $dev, $(($(stat -c %s "$img") >> 20)) MiB allocated" >&2

rm -f run/qmp.sock run/nbd.sock
"$thinblkd" \
    --chardev socket,id=mon0,path=run/qmp.sock,server=on,wait=off \
    --monitor chardev=mon0 \
    --blockdev "driver=host_device,node-name=proto0,filename=$dev" \
    --blockdev driver=qcow2,node-name=disk0,file=proto0 \
    --nbd-server addr.type=unix,addr.path=run/nbd.sock \
    --export type=nbd,id=disk0,node-name=disk0,name=disk0,writable=on \
    --pidfile run/thinblkd.pid \
    -v "$@" </dev/null &
pids+=($!)
for _ in $(seq 200); do
    [ -S run/qmp.sock ] && [ -S run/nbd.sock ] && break
    kill -0 "${pids[0]}" 2>/dev/null || die "thinblkd exited"
    sleep 0.05
done
[ -S run/nbd.sock ] || die "thinblkd did not create its sockets"

# The agent's defaults for a loop device; see thinblk-agent(8) for a configuration file.
"$agent" --socket run/qmp.sock --device disk0 </dev/null &
pids+=($!)

cat >&2 <<'HELP'
run.sh: thinblkd (QMP run/qmp.sock, NBD export "disk0" at run/nbd.sock) and thinblk-agent are
running; Ctrl-C stops both. From another terminal:
  build/src/ctl/thinblkctl -s run/qmp.sock query-block
  build/src/ctl/thinblkctl -s run/qmp.sock events
  nbdinfo 'nbd+unix:///disk0?socket=run/nbd.sock'
HELP
# Until either exits.
wait -n "${pids[@]}" || true
