#!/bin/bash
# bench/nbd.sh [BUILD_DIR]: NBD data path, thinblkd against nbdkit, qemu-storage-daemon and
# qemu-nbd, in one run, with fio on the raw file as the no-server limit. See README.md.
#
# One image file of random data (not sparse) on tmpfs is served by each server in turn; fio's
# nbd engine drives it over a Unix socket. Each (job, server) pair gets a freshly started
# server, so every row's peak RSS and CPU time belong to that job alone. All servers are
# buffered (the page cache, which on tmpfs is the file itself), none uses O_DIRECT.
#
# Environment (defaults in brackets):
#   SIZE     image size, with an IEC suffix [1G]
#   IMG_DIR  a tmpfs directory for the image [/dev/shm]
#   RUNTIME  seconds measured per job [10]       RAMP  seconds of warm-up per job [1]
#   REPEAT   rounds of every job and server; each row is the round with the median
#            throughput, and a column gives the spread [1]
#   SERVERS  which rows, in order [thinblkd nbdkit qsd qemu-nbd raw]; also thinblkd-tls and
#            qsd-tls: the same servers with tls-creds-x509 (certificates made with certtool)
#   JOBS     which jobs, in order [all of them, see the table below]
#   PIN      1: servers on CPU 0, fio on CPU 1 [0: nothing pinned]
#   KEEP     1: keep the temporary directory (logs, fio JSON) and say where [0]
# TLS rows: fio's nbd engine cannot do TLS, so they run only the sequential jobs, as one
# nbdcopy of the whole image (to null: for reads, from the image file for writes) with the
# job's request size, requests in flight and connections; throughput is SIZE over nbdcopy's
# wall time, RUNTIME and RAMP do not apply, and no CPU window is sampled ("-").
# Exits non-zero if a binary is missing or nothing could run; a peer that cannot start, or a
# job that fails against it, is reported in its row and the run goes on.
set -euo pipefail

build=${1:-$(cd "$(dirname "$0")/.." && pwd)/build}
size=${SIZE:-1G}
img_dir=${IMG_DIR:-/dev/shm}
runtime=${RUNTIME:-10}
ramp=${RAMP:-1}
repeat=${REPEAT:-1}
read -ra servers <<<"${SERVERS:-thinblkd nbdkit qsd qemu-nbd raw}"
python=/usr/bin/python3
here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
prog=nbd.sh
# shellcheck source=bench/lib.sh
. "$here/lib.sh"
report=$here/nbd-report.py

# name rw bs iodepth numjobs raw-engine. The qd32x2 row runs two fio processes (one NBD
# connection each) because one fio process saturates a CPU well below what the servers can do.
all_jobs=(
    "randread-4k-qd1     randread  4k 1  1 psync"
    "randread-4k-qd32    randread  4k 32 1 io_uring"
    "randread-4k-qd32x2  randread  4k 32 2 io_uring"
    "randwrite-4k-qd32   randwrite 4k 32 1 io_uring"
    "seqread-4k-qd8      read      4k 8  1 io_uring"
    "seqread-1m-qd8      read      1m 8  1 io_uring"
    "seqwrite-1m-qd8     write     1m 8  1 io_uring"
)


[[ $runtime =~ ^[0-9]+$ && $runtime -ge 2 ]] || die "RUNTIME must be an integer >= 2"
[[ $ramp =~ ^[0-9]+$ ]] || die "RAMP must be a whole number of seconds"
[[ $repeat =~ ^[0-9]+$ && $repeat -ge 1 ]] || die "REPEAT must be a positive integer"
[[ -x $python ]] || die "missing $python"
[[ -r $report ]] || die "missing $report"
fio=$(need fio "the load generator")
nbdinfo=$(need nbdinfo "libnbd-bin: waits for each server's socket")
"$fio" --enghelp=nbd >/dev/null 2>&1 || die "$fio has no nbd engine"
declare -A bin
for s in "${servers[@]}"; do
    case $s in
    thinblkd | thinblkd-tls)
        [[ -d $build ]] || die "build directory not found: $build"
        bin[$s]=$(cd "$build" && pwd)/src/daemon/thinblkd
        [[ -x ${bin[$s]} ]] || die "missing ${bin[$s]} (build it: ninja -C $build)" ;;
    nbdkit) bin[$s]=$(need nbdkit "package nbdkit") ;;
    qsd | qsd-tls) bin[$s]=$(need qemu-storage-daemon "package qemu-system-x86 or qemu-utils") ;;
    qemu-nbd) bin[$s]=$(need qemu-nbd "package qemu-utils") ;;
    raw) ;;
    *) die "unknown server in SERVERS: $s" ;;
    esac
done

case " ${servers[*]} " in
*-tls\ *)
    certtool=$(need certtool "package gnutls-bin: the TLS rows' certificates")
    nbdcopy=$(need nbdcopy "package libnbd-bin: the TLS rows' client") ;;
esac

select_jobs
setup_pin "fio"
check_image_dir "$img_dir" "$size"

tmp=$(mktemp -d /tmp/thinblk-bench-nbd.XXXXXX)
img=$(mktemp "$img_dir/thinblk-bench-nbd.XXXXXX.img")
cleanup() {
    kill_all
    rm -f "$img"
    remove_tmp "$tmp"
}
trap cleanup EXIT
trap 'exit 130' INT TERM

# Random data written once, so no server or file system can shortcut holes or zeroes.
dd if=/dev/urandom of="$img" bs=1M count=$((size_bytes >> 20)) iflag=fullblock \
    status=none conv=fsync

hz=$(getconf CLK_TCK)

# make_pki DIR: a CA, DIR/server (the servers' tls-creds-x509 dir) and DIR/client (libnbd's
# tls-certificates dir), with QEMU's file names.
make_pki() {
    local dir=$1 role
    mkdir -p "$dir/server" "$dir/client"
    printf 'cn = bench CA\nca\ncert_signing_key\n' >"$dir/ca.info"
    printf 'cn = localhost\ntls_www_server\nencryption_key\nsigning_key\n' >"$dir/server.info"
    printf 'cn = client\ntls_www_client\nencryption_key\nsigning_key\n' >"$dir/client.info"
    "$certtool" --generate-privkey --outfile "$dir/ca-key.pem" 2>/dev/null
    "$certtool" --generate-self-signed --load-privkey "$dir/ca-key.pem" \
        --template "$dir/ca.info" --outfile "$dir/ca-cert.pem" 2>/dev/null
    for role in server client; do
        cp "$dir/ca-cert.pem" "$dir/$role/"
        "$certtool" --generate-privkey --outfile "$dir/$role/$role-key.pem" 2>/dev/null
        "$certtool" --generate-certificate --load-ca-certificate "$dir/ca-cert.pem" \
            --load-ca-privkey "$dir/ca-key.pem" --load-privkey "$dir/$role/$role-key.pem" \
            --template "$dir/$role.info" --outfile "$dir/$role/$role-cert.pem" 2>/dev/null
    done
}
[[ -z ${certtool:-} ]] || make_pki "$tmp/pki"
tls_object="tls-creds-x509,id=tls0,dir=$tmp/pki/server,endpoint=server"
tls_query="tls-certificates=$tmp/pki/client"

# server_cmd NAME SOCK: the command line of server NAME on SOCK, in the array cmd.
server_cmd() {
    local sock=$2 tls=() tls_opt=''
    if [[ $1 == *-tls ]]; then
        tls=(--object "$tls_object")
        tls_opt=,tls-creds=tls0
    fi
    case $1 in
    thinblkd | thinblkd-tls | qsd | qsd-tls)
        cmd=("${bin[$1]}" "${tls[@]}"
             --blockdev "driver=file,node-name=f0,filename=$img,cache.direct=off"
             --nbd-server "addr.type=unix,addr.path=$sock$tls_opt"
             --export "type=nbd,id=e0,node-name=f0,name=disk,writable=on") ;;
    nbdkit)
        # Multi-threaded (the file plugin's parallel model, 16 threads by default).
        # -e only names the export for --run; the file plugin serves any name.
        cmd=("${bin[nbdkit]}" -U "$sock" -f -e disk file "file=$img") ;;
    qemu-nbd)
        # -t: survive the readiness probe's disconnect; -e 8: the two-connection job.
        cmd=("${bin[qemu-nbd]}" -k "$sock" -f raw -x disk --cache=writeback -t -e 8 "$img") ;;
    esac
}

results=$tmp/results.tsv
: >"$results"

# nbd_tls_ready SOCK: nbd_ready over TLS.
nbd_tls_ready() {
    "$nbdinfo" --can connect "nbds+unix:///disk?socket=$1&$tls_query" 2>/dev/null
}

# run_copy JOB SERVER ROUND: a TLS row (see the top): one nbdcopy against a fresh SERVER;
# appends its line to $results with a JSON file in fio's shape for the report.
run_copy() {
    local jname=$1 rw=$2 bs=$3 depth=$4 nj=$5 name=$6 round=$7
    local sock=$tmp/$name.sock log=$tmp/$jname.$name.$round.log
    local json=$tmp/$jname.$name.$round.json uri t0 t1 hwm dir
    local bs_b
    bs_b=$(numfmt --from=iec "${bs^^}")
    case $rw in
    read) dir=read ;;
    write) dir=write ;;
    *)
        printf '%s\t%s\tskipped\t-\t-\t-\t-\n' "$jname" "$name" >>"$results"
        return 0 ;;
    esac
    rm -f "$sock"
    if ! start_server "$name" "$sock" "$log" nbd_tls_ready; then
        note "$name did not start for $jname, skipped"
        printf '%s\t%s\tskipped\t-\t-\t-\t-\n' "$jname" "$name" >>"$results"
        return 0
    fi
    local pid=$started_pid
    uri="nbds+unix:///disk?socket=$sock&$tls_query"
    local copy=("$nbdcopy" --request-size="$bs_b" --requests="$depth"
                --connections="$nj" --flush)
    if [[ $dir == read ]]; then copy+=("$uri" null:); else copy+=("$img" "$uri"); fi
    echo "+ ${copy[*]}" >>"$log"
    t0=$(now_us)
    if ! "${client_pin[@]}" "${copy[@]}" >>"$log" 2>&1; then
        note "nbdcopy failed: $jname against $name"
        printf '%s\t%s\tfailed\t-\t-\t-\t-\n' "$jname" "$name" >>"$results"
        stop "$pid"
        return 0
    fi
    t1=$(now_us)
    hwm=$(awk '/^VmHWM:/ { print $2 }' "/proc/$pid/status")
    stop "$pid"
    awk -v b="$size_bytes" -v us=$((t1 - t0)) -v bs="$bs" -v bsb="$bs_b" -v d="$depth" \
        -v nj="$nj" -v dir="$dir" 'BEGIN {
            bw = b / (us / 1e6); split("read write", k)
            printf "{\"jobs\": [{\"job options\": {\"bs\": \"%s\", \"iodepth\": \"%s\", ", bs, d
            printf "\"numjobs\": \"%s\"}", nj
            for (i = 1; i <= 2; i++) {
                f = k[i] == dir
                printf ", \"%s\": {\"iops\": %f, \"bw_bytes\": %f}", k[i], f * bw / bsb, f * bw
            }
            print "}]}"
        }' >"$json"
    printf '%s\t%s\tok\t%s\t-\t-\t%s\n' "$jname" "$name" "$json" "$hwm" >>"$results"
}

# run_one JOB SERVER ROUND: one fio run of JOB against a fresh SERVER (or the raw file);
# appends a line to $results: job server status json cpu_s wall_s hwm_kib.
run_one() {
    local job=$1 name=$2 round=$3 jname rw bs depth nj raw_engine
    read -r jname rw bs depth nj raw_engine <<<"$job"
    if [[ $name == *-tls ]]; then
        run_copy "$jname" "$rw" "$bs" "$depth" "$nj" "$name" "$round"
        return 0
    fi
    local sock=$tmp/$name.sock log=$tmp/$jname.$name.$round.log
    local json=$tmp/$jname.$name.$round.json
    local pid='' target margin t0 c1 c2 w1 w2 hwm=- cpu=- wall=-
    local args=(--name="$jname" --rw="$rw" --bs="$bs" --iodepth="$depth" --numjobs="$nj"
                --group_reporting --time_based --runtime="$runtime" --ramp_time="$ramp"
                --norandommap --randrepeat=0 --output-format=json --output="$json")

    if [[ $name == raw ]]; then
        target=(--ioengine="$raw_engine" --filename="$img" --direct=0)
    else
        rm -f "$sock"
        if ! start_nbd "$name" "$sock" "$log"; then
            note "$name did not start for $jname, skipped; log:"
            sed 's/^/    /' "$log" | tail -n 5 >&2
            printf '%s\t%s\tskipped\t-\t-\t-\t-\n' "$jname" "$name" >>"$results"
            return 0
        fi
        pid=$started_pid
        target=(--ioengine=nbd --uri="nbd+unix:///disk?socket=$sock")
    fi

    # Server CPU is sampled inside the measured period (after the ramp, away from either
    # end), as a rate; CPU per op is that rate over fio's ops per second.
    margin=$((runtime >= 4 ? 500000 : 250000))
    echo "+ fio ${args[*]} ${target[*]}" >>"$log"
    t0=$(now_us)
    "${client_pin[@]}" "$fio" "${args[@]}" "${target[@]}" >>"$log" 2>&1 &
    local fio_pid=$! fio_rc=0
    pids+=("$fio_pid")
    if [[ -n $pid ]]; then
        sleep_until_us $((t0 + ramp * 1000000 + margin))
        c1=$(cpu_ticks "$pid") && w1=$(now_us)
        sleep_until_us $((t0 + (ramp + runtime) * 1000000 - margin))
        c2=$(cpu_ticks "$pid") && w2=$(now_us)
    fi
    wait "$fio_pid" || fio_rc=$?
    forget "$fio_pid"
    if ((fio_rc != 0)); then
        note "fio failed: $jname against $name; log:"
        sed 's/^/    /' "$log" | tail -n 5 >&2
        printf '%s\t%s\tfailed\t-\t-\t-\t-\n' "$jname" "$name" >>"$results"
        [[ -z $pid ]] || stop "$pid"
        return 0
    fi
    if [[ -n $pid ]]; then
        if [[ -n ${c1:-} && -n ${c2:-} ]]; then
            cpu=$(awk -v d=$((c2 - c1)) -v hz="$hz" 'BEGIN { printf "%.4f", d / hz }')
            wall=$(awk -v d=$((w2 - w1)) 'BEGIN { printf "%.6f", d / 1e6 }')
        fi
        hwm=$(awk '/^VmHWM:/ { print $2 }' "/proc/$pid/status")
        stop "$pid"
    fi
    printf '%s\t%s\tok\t%s\t%s\t%s\t%s\n' "$jname" "$name" "$json" "$cpu" "$wall" "$hwm" \
        >>"$results"
}

version() {
    case $1 in
    thinblkd | thinblkd-tls) echo "${bin[$1]}" ;;
    nbdkit) "${bin[nbdkit]}" --version | head -n 1 ;;
    qsd | qsd-tls) "${bin[$1]}" --version | head -n 1 ;;
    qemu-nbd) "${bin[qemu-nbd]}" --version | head -n 1 ;;
    raw) "$fio" --version ;;
    esac
}


cpu_model=$(awk -F': ' '/^model name/ { print $2; exit }' /proc/cpuinfo)
echo "NBD benchmark: $(date -u '+%Y-%m-%d %H:%M:%SZ'), $(uname -sr)"
echo "CPU: ${cpu_model:-unknown}, $(nproc) CPUs online; $pin_note"
echo "load average before: $(loadavg) (other work on the machine skews every number)"
echo "image: $size random data on $img_fs ($img_dir), all servers buffered"
echo "each job: ${ramp} s ramp + ${runtime} s measured; a fresh server per job and server;" \
     "$repeat round(s)"
echo "fio: $("$fio" --version), nbd engine over a Unix socket; raw: psync (qd1) or io_uring"
for s in "${servers[@]}"; do
    [[ $s == raw ]] || echo "$s: $(version "$s")"
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
grep -q $'\tok\t' "$results" || die "no job ran"
