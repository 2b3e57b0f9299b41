#!/bin/bash
# scripts/demo.sh: thin provisioning with a real guest, start to end. Sets up (scripts/deps.sh),
# builds, builds the test guest (tests/guest/build-guest.sh: Debian's kernel and a busybox
# initramfs, cached), then runs scripts/demo.py's two scenarios on a 32 MiB volume that the
# guest writes 192 MiB to:
#   1. thinblk-agent keeps up: the volume grows ahead of the guest, the disk never stops;
#   2. nobody watches: the disk stops on ENOSPC and holds the guest; thinblk-agent, started
#      then, finds it stopped, extends the volume and resumes it.
# and prints what happened: the agent's log, STOP/RESUME, the guest's progress, then the pauses,
# the extensions and the checksums (guest written, guest read back, host read over NBD).
# THINBLK_EXPORT=vhost-user-blk runs the same with the disk exported as vhost-user-blk: QEMU
# then gets it as vhost-user-blk-pci, with the guest's RAM a shared memfd (memory-backend-memfd,
# share=on), and the host reads it back with thinblk-vhost-io. The default, nbd, is as above.
# Takes about a minute (the guest runs under QEMU TCG). Loop devices need root: when not root,
# the demo itself runs through sudo. Exits 0 if both scenarios went as expected.
set -euo pipefail
cd "$(dirname "$0")/.."

scripts/deps.sh
[ -d build ] || meson setup build
ninja -C build
if [ "$(id -u)" -ne 0 ]; then
    exec sudo -- env THINBLK_EXPORT="${THINBLK_EXPORT:-nbd}" /usr/bin/python3 scripts/demo.py "$PWD/build"
fi
exec /usr/bin/python3 scripts/demo.py "$PWD/build"
