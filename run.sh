#!/bin/bash
# Set up, build and start thinblkd on the embedded default, in ./run:
#   run/qmp.sock   the QMP monitor
#   run/disk.raw   a 1 GiB thin (sparse) raw image, created on first use
#   run/nbd.sock   the NBD server, exporting the image as "disk0" (device "disk0")
# Extra arguments go to thinblkd (e.g. -S to start stopped).
set -euo pipefail
cd "$(dirname "$0")"

scripts/deps.sh
[ -d build ] || meson setup build
ninja -C build

mkdir -p run
[ -f run/disk.raw ] || truncate -s 1G run/disk.raw
cat >&2 <<'HELP'
thinblkd: QMP at run/qmp.sock, NBD export "disk0" at run/nbd.sock. From another terminal:
  build/src/ctl/thinblkctl -s run/qmp.sock query-block
  nbdinfo 'nbd+unix:///disk0?socket=run/nbd.sock'
HELP
exec build/src/daemon/thinblkd \
    --chardev socket,id=mon0,path=run/qmp.sock,server=on,wait=off \
    --monitor chardev=mon0 \
    --blockdev driver=file,node-name=proto0,filename=run/disk.raw \
    --blockdev driver=raw,node-name=disk0,file=proto0 \
    --nbd-server addr.type=unix,addr.path=run/nbd.sock \
    --export type=nbd,id=disk0,node-name=disk0,name=disk0,writable=on \
    --pidfile run/thinblkd.pid \
    -v "$@"
