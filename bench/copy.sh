#!/bin/bash
# bench/copy.sh [BUILD_DIR]: copying a thin qcow2 disk out through NBD with nbdcopy, from
# thinblkd, qemu-storage-daemon and qemu-nbd, side by side in one run, with qemu-img convert
# of the file itself as the no-server limit. See README.md.
#
# The disk: a qcow2 image of VSIZE virtual bytes holding DATA bytes of random data in
# CHUNK-sized pieces at random (seeded) cluster-aligned offsets, written with qemu-io. Each
# server in turn exports it read-only on a Unix socket; nbdcopy copies the export into a new
# sparse raw file; the copy is checked against the image (qemu-img compare) and removed.
#
# Environment (defaults in brackets):
#   VSIZE    virtual size, IEC suffix [16G]      DATA   data written, IEC suffix [256M]
#   CHUNK    bytes per piece of data [256K]      SEED   placement of the pieces [1]
#   IMG_DIR  a tmpfs directory for the image and the copies [/dev/shm]
#   REPEAT   rounds of every server; each row is the round with the median time [1]
#   SERVERS  which rows, in order [thinblkd qsd qemu-nbd raw]
#   PIN      1: servers on CPU 0, nbdcopy on CPU 1 [0: nothing pinned]
#   KEEP     1: keep the temporary directory (logs, maps) and say where [0]
# Columns: the copy's wall time (nbdcopy's, server already up), the bytes the server's map
# calls data (what a copy must read: nbdinfo --map --totals; nbdcopy reads exactly those
# extents), the bytes the copy allocates (st_blocks), and whether it equals the image.
set -euo pipefail

build=${1:-$(cd "$(dirname "$0")/.." && pwd)/build}
vsize=${VSIZE:-16G}
data=${DATA:-256M}
chunk=${CHUNK:-256K}
seed=${SEED:-1}
img_dir=${IMG_DIR:-/dev/shm}
repeat=${REPEAT:-1}
read -ra servers <<<"${SERVERS:-thinblkd qsd qemu-nbd raw}"
here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
prog=copy.sh
# shellcheck source=bench/lib.sh
. "$here/lib.sh"

[[ $repeat =~ ^[0-9]+$ && $repeat -ge 1 ]] || die "REPEAT must be a positive integer"
nbdcopy=$(need nbdcopy "package libnbd-bin")
nbdinfo=$(need nbdinfo "package libnbd-bin")
qemu_img=$(need qemu-img "package qemu-utils")
qemu_io=$(need qemu-io "package qemu-utils")
declare -A bin
for s in "${servers[@]}"; do
    case $s in
    thinblkd)
        [[ -d $build ]] || die "build directory not found: $build"
        bin[$s]=$(cd "$build" && pwd)/src/daemon/thinblkd
        [[ -x ${bin[$s]} ]] || die "missing ${bin[$s]} (build it: ninja -C $build)" ;;
    qsd) bin[$s]=$(need qemu-storage-daemon "package qemu-system-x86 or qemu-utils") ;;
    qemu-nbd) bin[$s]=$(need qemu-nbd "package qemu-utils") ;;
    raw) ;;
    *) die "unknown server in SERVERS: $s" ;;
    esac
done
vsize_b=$(numfmt --from=iec "$vsize") || die "bad VSIZE: $vsize"
data_b=$(numfmt --from=iec "$data") || die "bad DATA: $data"
chunk_b=$(numfmt --from=iec "$chunk") || die "bad CHUNK: $chunk"
((chunk_b > 0 && chunk_b % 65536 == 0)) || die "CHUNK must be a multiple of 64K"
((data_b % chunk_b == 0 && data_b <= vsize_b / 4)) ||
    die "DATA must be a multiple of CHUNK and at most a quarter of VSIZE"
setup_pin "nbdcopy"
check_image_dir "$img_dir" "$((data_b * 3 + (64 << 20)))"

tmp=$(mktemp -d /tmp/thinblk-bench-copy.XXXXXX)
work=$(mktemp -d "$img_dir/thinblk-bench-copy.XXXXXX")
img=$work/disk.qcow2
cleanup() {
    kill_all
    rm -rf "$work"
    remove_tmp "$tmp"
}
trap cleanup EXIT
trap 'exit 130' INT TERM

# The pieces: distinct chunk-aligned slots drawn with a seeded generator, each written with
# its own random bytes (one qemu-io process for all of them).
"$qemu_img" create -q -f qcow2 "$img" "$vsize_b"
pieces=$((data_b / chunk_b))
awk -v n="$pieces" -v slots=$((vsize_b / chunk_b)) -v seed="$seed" -v c="$chunk_b" 'BEGIN {
    srand(seed)
    while (k < n) {
        s = int(rand() * slots)
        if (!(s in used)) { used[s] = 1; k++; printf "write -P %d %.0f %d\n", k % 251 + 1, s * c, c }
    }
}' >"$tmp/pieces.qemu-io"
"$qemu_io" -f qcow2 "$img" <"$tmp/pieces.qemu-io" >/dev/null
img_alloc=$(($(stat -c '%b * %B' "$img")))

# server_cmd NAME SOCK: the command line of server NAME on SOCK, in the array cmd.
server_cmd() {
    local sock=$2
    case $1 in
    thinblkd)
        cmd=("${bin[thinblkd]}"
             --blockdev "driver=file,node-name=f0,filename=$img,read-only=on"
             --blockdev "driver=qcow2,node-name=q0,file=f0,read-only=on"
             --nbd-server "addr.type=unix,addr.path=$sock"
             --export "type=nbd,id=e0,node-name=q0,name=disk") ;;
    qsd)
        cmd=("${bin[qsd]}"
             --blockdev "driver=file,node-name=f0,filename=$img,read-only=on"
             --blockdev "driver=qcow2,node-name=q0,file=f0,read-only=on"
             --nbd-server "addr.type=unix,addr.path=$sock"
             --export "type=nbd,id=e0,node-name=q0,name=disk") ;;
    qemu-nbd)
        # -t: survive the readiness probe's and the map's connections.
        cmd=("${bin[qemu-nbd]}" -k "$sock" -f qcow2 -r -x disk -t "$img") ;;
    esac
}

results=$tmp/results.tsv
: >"$results"

# run_one SERVER ROUND: one copy from a fresh SERVER (or the file); appends to $results:
# server status seconds map-data-bytes copy-allocated-bytes equal.
run_one() {
    local name=$1 round=$2 sock=$tmp/$1.sock log=$tmp/$1.$2.log dest=$work/copy.raw
    local uri="nbd+unix:///disk?socket=$sock" pid='' t0 t1 mapped=- equal=no rc=0
    rm -f "$dest"
    if [[ $name == raw ]]; then
        t0=$(now_us)
        "${client_pin[@]}" "$qemu_img" convert -f qcow2 -O raw "$img" "$dest" >>"$log" 2>&1 ||
            rc=$?
        t1=$(now_us)
    else
        rm -f "$sock"
        if ! start_nbd "$name" "$sock" "$log"; then
            note "$name did not start, skipped"
            printf '%s\tskipped\t-\t-\t-\t-\n' "$name" >>"$results"
            return 0
        fi
        pid=$started_pid
        mapped=$("$nbdinfo" --map --totals "$uri" |
                 awk '$3 == 0 { d += $1 } END { printf "%.0f", d }')  # type 0: data, not zero
        truncate -s 0 "$dest"
        t0=$(now_us)
        "${client_pin[@]}" "$nbdcopy" "$uri" "$dest" >>"$log" 2>&1 || rc=$?
        t1=$(now_us)
        stop "$pid" "$log"
    fi
    if ((rc != 0)); then
        note "the copy from $name failed; log:"
        sed 's/^/    /' "$log" | tail -n 5 >&2
        printf '%s\tfailed\t-\t-\t-\t-\n' "$name" >>"$results"
        return 0
    fi
    "$qemu_img" compare -q -f raw -F qcow2 "$dest" "$img" && equal=yes
    printf '%s\tok\t%s\t%s\t%s\t%s\n' "$name" \
        "$(awk -v d=$((t1 - t0)) 'BEGIN { printf "%.3f", d / 1e6 }')" "$mapped" \
        "$(($(stat -c '%b * %B' "$dest")))" "$equal" >>"$results"
    rm -f "$dest"
}

version() {
    case $1 in
    thinblkd) echo "${bin[thinblkd]}" ;;
    qsd) "${bin[qsd]}" --version | head -n 1 ;;
    qemu-nbd) "${bin[qemu-nbd]}" --version | head -n 1 ;;
    raw) echo "qemu-img convert -O raw: $("$qemu_img" --version | head -n 1)" ;;
    esac
}

echo "copy benchmark: $(date -u '+%Y-%m-%d %H:%M:%SZ'), $(uname -sr)"
echo "CPU: $(awk -F': ' '/^model name/ { print $2; exit }' /proc/cpuinfo), $(nproc) CPUs" \
     "online; $pin_note"
echo "load average before: $(loadavg) (other work on the machine skews every number)"
echo "image: qcow2, $vsize virtual, $data of data in $pieces pieces of $chunk (seed $seed)," \
     "$img_alloc bytes allocated, on $img_fs; copies: sparse raw files there too"
echo "client: $("$nbdcopy" --version | head -n 1), defaults (block status used when offered)"
for s in "${servers[@]}"; do
    echo "$s: $(version "$s")"
done

for ((round = 1; round <= repeat; round++)); do
    for s in "${servers[@]}"; do
        note "round $round/$repeat: $s"
        run_one "$s" "$round"
    done
done

echo "load average after: $(loadavg)"
echo
# The median round per server by time; ratios against qsd's.
awk -F'\t' -v data="$data_b" '
$2 == "ok" { n[$1]++; t[$1, n[$1]] = $3; row[$1, $3] = $0 }
$2 != "ok" { bad[$1] = $2 }
!($1 in seen) { seen[$1] = 1; order[++k] = $1 }
function median(s,   i, j, a, m, x) {
    m = n[s]
    for (i = 1; i <= m; i++) a[i] = t[s, i]
    for (i = 1; i <= m; i++) for (j = i + 1; j <= m; j++) if (a[j] < a[i]) { x = a[i]; a[i] = a[j]; a[j] = x }
    return a[int((m + 1) / 2)]
}
END {
    printf "%-9s | %8s | %5s | %13s | %6s | %14s | %5s\n", "server", "time s", "/qsd", "map data B", "/data", "copy alloc B", "equal"
    print "--------------------------------------------------------------------------------"
    q = ("qsd" in n) ? median("qsd") : 0
    for (i = 1; i <= k; i++) {
        s = order[i]
        if (!(s in n)) { printf "%-9s | %s\n", s, bad[s]; continue }
        split(row[s, median(s)], f, "\t")
        printf "%-9s | %8.3f | %5s | %13s | %6s | %14.0f | %5s\n", s, f[3],
            q ? sprintf("%.2f", f[3] / q) : "-", f[4],
            f[4] == "-" ? "-" : sprintf("%.2f", f[4] / data), f[5], f[6]
    }
}' "$results"
grep -q $'\tok\t' "$results" || die "no copy ran"
! grep -q $'\tno$' "$results" || die "a copy differs from the image"
