#!/bin/bash
# Set up, build and start thinblkd on the embedded default: a QMP monitor socket under ./run.
# Talk to it from another terminal: build/src/ctl/thinblkctl -s run/qmp.sock query-status
set -euo pipefail
cd "$(dirname "$0")"

scripts/deps.sh
[ -d build ] || meson setup build
ninja -C build

mkdir -p run
echo "thinblkd: monitor at run/qmp.sock; try: build/src/ctl/thinblkctl -s run/qmp.sock query-status" >&2
exec build/src/daemon/thinblkd \
    --chardev socket,id=mon0,path=run/qmp.sock,server=on,wait=off \
    --monitor chardev=mon0 \
    --pidfile run/thinblkd.pid \
    -v "$@"
