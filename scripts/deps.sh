#!/bin/bash
# Install the Debian 12 packages thinblk needs to build, test and benchmark, if any is missing.
# Sourced or run by run.sh, test.sh and .ci/run. Uses sudo when not root.
set -euo pipefail

THINBLK_PACKAGES=(
    # build
    gcc meson ninja-build pkg-config libjansson-dev liburing-dev zlib1g-dev scdoc
    libgnutls28-dev
    # the rbd driver (built when these are found)
    librbd-dev librados-dev
    # unit tests and the fuzz target
    libcmocka-dev clang libclang-rt-14-dev
    # integration tests and benchmarks: real peers
    python3 python3-pytest python3-libnbd qemu-system-x86 qemu-utils qemu-block-extra
    nbdkit libnbd-bin fio
    # the TLS tests' certificates (certtool); the secret tests' ciphertexts (openssl enc,
    # a second AES implementation to check the decryption against)
    gnutls-bin openssl
    # the test guest (its kernel is fetched by tests/guest/build-guest.sh)
    busybox-static cpio
    # the rbd tests' throwaway Ceph cluster (tests/integration/ceph.py)
    ceph-mon ceph-osd ceph-mgr ceph-common
    # the loop-device ENOSPC test
    e2fsprogs util-linux mount
    # systemd-analyze (the units' test) and systemd.pc (where the units go)
    systemd
    # the Debian package's test
    dpkg-dev debhelper lintian
)

missing=()
for p in "${THINBLK_PACKAGES[@]}"; do
    if [ "$(dpkg-query -W -f='${Status}' "$p" 2>/dev/null)" != "install ok installed" ]; then
        missing+=("$p")
    fi
done
if [ ${#missing[@]} -gt 0 ]; then
    echo "thinblk: installing ${missing[*]}" >&2
    sudo=()
    [ "$(id -u)" -eq 0 ] || sudo=(sudo)
    export DEBIAN_FRONTEND=noninteractive
    "${sudo[@]}" apt-get update -q
    "${sudo[@]}" apt-get install -y -q --no-install-recommends "${missing[@]}"
fi
