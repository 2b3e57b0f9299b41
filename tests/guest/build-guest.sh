#!/bin/bash
# Builds the thinblk test guest: Debian 12's cloud kernel and a busybox-static initramfs whose
# /init (tests/guest/init) runs a job chosen on the kernel command line.
#
#   tests/guest/build-guest.sh [--refresh] [CACHE_DIR]
#
# CACHE_DIR defaults to $THINBLK_GUEST_CACHE, else $XDG_CACHE_HOME/thinblk-guest
# (~/.cache/thinblk-guest). Each version of this script and /init (its recipe) has its own
# build in CACHE_DIR/builds/<recipe>; the kernel package is shared. Idempotent: when
# that build exists, it only prints the paths. --refresh
# re-resolves the kernel package (picks up a newer Debian kernel). Missing tools are installed
# with apt-get (needs root); the kernel is fetched with apt-get download.
#
# Prints on stdout, one per line: KERNEL=<path> INITRD=<path> KVER=<release>. Progress goes to
# stderr.
set -euo pipefail

# Roots of the module list; their dependencies (depends= in .modinfo) are added first. In this
# order the result is virtio_ring, virtio, virtio_pci_modern_dev, virtio_pci_legacy_dev,
# virtio_pci, virtio_blk.
MODULE_ROOTS="virtio virtio_pci_modern_dev virtio_pci_legacy_dev virtio_pci virtio_blk"
KERNEL_META=linux-image-cloud-amd64

refresh=0
if [ "${1:-}" = --refresh ]; then
    refresh=1
    shift
fi
here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
cache=${1:-${THINBLK_GUEST_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/thinblk-guest}}
mkdir -p "$cache"
cache=$(cd "$cache" && pwd)

log() { echo "build-guest: $*" >&2; }
die() { log "error: $*"; exit 1; }

print_paths() {
    echo "KERNEL=$out/vmlinuz"
    echo "INITRD=$out/initramfs.gz"
    echo "KVER=$1"
}

# Concurrent test runs share the cache: one builder at a time.
exec 9>"$cache/.lock"
flock 9

recipe=$(cat "$here/build-guest.sh" "$here/init" | sha256sum | cut -d' ' -f1)
# One build per recipe, so that trees with different versions of /init (other branches,
# worktrees) share the cache without replacing each other's initramfs under a running test.
out="$cache/builds/${recipe:0:16}"
stamp="$out/stamp"
if [ $refresh = 0 ] && [ -f "$stamp" ] && [ -f "$out/vmlinuz" ] && [ -f "$out/initramfs.gz" ]; then
    read -r s_recipe s_kpkg s_kver <"$stamp" || true
    if [ "${s_recipe:-}" = "$recipe" ] && [ -n "${s_kver:-}" ]; then
        touch "$out"    # in use: not pruned (see the end)
        print_paths "$s_kver"
        exit 0
    fi
fi

export DEBIAN_FRONTEND=noninteractive
apt_updated=0
apt_update() {
    if [ $apt_updated = 0 ]; then
        log "apt-get update"
        apt-get update -qq >&2
        apt_updated=1
    fi
}

# ensure_pkg PACKAGE: apt-get install it unless dpkg says it is installed.
ensure_pkg() {
    if dpkg-query -W -f='${Status}' "$1" 2>/dev/null | grep -q 'install ok installed'; then
        return
    fi
    [ "$(id -u)" = 0 ] || die "package $1 is missing and we are not root to install it"
    log "installing $1"
    if ! apt-get install -y -qq -o DPkg::Lock::Timeout=300 "$1" >&2; then
        apt_update
        apt-get install -y -qq -o DPkg::Lock::Timeout=300 "$1" >&2
    fi
}

ensure_pkg busybox-static
ensure_pkg cpio
ensure_pkg gzip
ensure_pkg util-linux
busybox=$(dpkg -L busybox-static | grep -E '/bin/busybox$' | head -n1)
[ -x "$busybox" ] || die "busybox-static installed but no busybox binary found"

# Resolve the versioned kernel package behind the meta package (once per cache unless
# --refresh, so a cached build does not depend on the apt lists).
kpkg=
if [ $refresh = 0 ] && [ -f "$cache/kernel-package" ]; then
    kpkg=$(cat "$cache/kernel-package")
fi
resolve() {
    apt-cache depends "$KERNEL_META" 2>/dev/null |
        awk '$1 == "Depends:" && $2 ~ /^linux-image-[0-9]/ { print $2; exit }'
}
if [ -z "$kpkg" ]; then
    kpkg=$(resolve)
    if [ -z "$kpkg" ]; then
        apt_update
        kpkg=$(resolve)
    fi
    [ -n "$kpkg" ] || die "cannot resolve the kernel package behind $KERNEL_META"
    echo "$kpkg" >"$cache/kernel-package"
fi
log "kernel package $kpkg"

mkdir -p "$cache/debs"
# As root, apt's sandbox user cannot write here; download as root, quietly.
download() { (cd "$cache/debs" && apt-get download -qq -o APT::Sandbox::User=root "$1" >&2); }
deb=$(ls "$cache/debs/${kpkg}_"*.deb 2>/dev/null | sort -V | tail -n1 || true)
if [ -z "$deb" ]; then
    log "downloading $kpkg"
    if ! download "$kpkg"; then
        # Stale lists, or the archive has dropped the version we resolved earlier.
        apt_update
        kpkg=$(resolve)
        [ -n "$kpkg" ] || die "cannot resolve the kernel package behind $KERNEL_META"
        echo "$kpkg" >"$cache/kernel-package"
        log "downloading $kpkg"
        download "$kpkg"
    fi
    deb=$(ls "$cache/debs/${kpkg}_"*.deb | sort -V | tail -n1)
fi

work=$(mktemp -d "$cache/build.XXXXXX")
trap 'rm -rf "$work"' EXIT

log "extracting $(basename "$deb")"
dpkg -x "$deb" "$work/pkg"
vmlinuz=$(ls "$work/pkg/boot/vmlinuz-"* | head -n1)
[ -f "$vmlinuz" ] || die "no vmlinuz in $deb"
kver=${vmlinuz##*/vmlinuz-}
moddir="$work/pkg/lib/modules/$kver"
[ -d "$moddir" ] || die "no modules for $kver in $deb"

# modfile NAME: path of the module file (names use _ where file names may use -).
modfile() {
    local pat=${1//_/[-_]}
    find "$moddir" -name "$pat.ko" -o -name "$pat.ko.xz" -o -name "$pat.ko.zst" -o -name "$pat.ko.gz" |
        head -n1
}

# modinfo_depends FILE: the comma-separated depends= field of its .modinfo section.
modinfo_depends() {
    case "$1" in
    *.xz)  xz -dc "$1" ;;
    *.zst) zstd -dcq "$1" ;;
    *.gz)  gzip -dc "$1" ;;
    *)     cat "$1" ;;
    esac | tr '\0' '\n' | sed -n 's/^depends=//p' | head -n1
}

root="$work/root"
mkdir -p "$root"/{bin,dev,proc,sys,tmp,etc/thinblk,lib/modules}
declare -A seen=()
order=()
visit() {
    local m=$1 f d
    [ -z "${seen[$m]:-}" ] || return 0
    seen[$m]=1
    f=$(modfile "$m")
    [ -n "$f" ] || die "module $m not found in $kver"
    for d in $(modinfo_depends "$f" | tr ',' ' '); do
        visit "$d"
    done
    case "$f" in
    *.xz)  xz -dc "$f" >"$root/lib/modules/$m.ko" ;;
    *.zst) zstd -dcq "$f" >"$root/lib/modules/$m.ko" ;;
    *.gz)  gzip -dc "$f" >"$root/lib/modules/$m.ko" ;;
    *)     cp "$f" "$root/lib/modules/$m.ko" ;;
    esac
    order+=("$m")
}
for m in $MODULE_ROOTS; do
    visit "$m"
done
printf '%s\n' "${order[@]}" >"$root/etc/thinblk/modules"
log "modules: ${order[*]}"

cp "$busybox" "$root/bin/busybox"
for applet in $("$busybox" --list); do
    [ "$applet" = busybox ] || ln -s busybox "$root/bin/$applet"
done
# util-linux's fallocate, with the libraries ldd names (libc and the loader): on a block device
# -z and -p send WRITE_ZEROES, which nothing in busybox can (its fallocate has no mode flags,
# its blkdiscard no -z). At its own path, so that the applet keeps its name.
fallocate=/usr/bin/fallocate
[ -x "$fallocate" ] || die "no $fallocate (util-linux)"
install -D -m 0755 "$fallocate" "$root$fallocate"
for lib in $(ldd "$fallocate" | grep -oE '/[^ ]+'); do
    install -D -m 0755 "$lib" "$root$lib"
done
install -m 0755 "$here/init" "$root/init"
echo "$kver" >"$root/etc/thinblk/kernel"
# An initial console for the kernel to open before /init mounts devtmpfs (best effort: /init
# reopens it anyway).
mknod -m 600 "$root/dev/console" c 5 1 2>/dev/null || true

(cd "$root" && find . | LC_ALL=C sort | cpio -o -H newc -R 0:0 --quiet) | gzip -6n >"$work/initramfs.gz"
cp "$vmlinuz" "$work/vmlinuz"
mkdir -p "$out"
mv -f "$work/vmlinuz" "$out/vmlinuz"
mv -f "$work/initramfs.gz" "$out/initramfs.gz"
echo "$recipe $kpkg $kver" >"$stamp"
log "built $out/initramfs.gz ($(stat -c %s "$out/initramfs.gz") bytes) for $kver"
# Builds of other recipes unused for two days go.
find "$cache/builds" -mindepth 1 -maxdepth 1 -type d -mtime +2 ! -path "$out" \
    -exec rm -rf {} + 2>/dev/null || true
print_paths "$kver"
