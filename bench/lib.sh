# shellcheck shell=bash disable=SC2154  # prog, server_pin, nbdinfo: set by the sourcing script
# Shared by bench/nbd.sh, bench/qcow2.sh, bench/thin.sh and bench/vhost.sh (sourced, not
# run): messages, the background processes a benchmark starts (in the array pids, so that its
# cleanup can stop them), starting servers, CPU time and clocks, and the settings the data-path
# benchmarks share (JOBS, PIN, the image directory, KEEP). The sourcing script sets prog (its
# name, for messages) first.

die() { echo "$prog: $*" >&2; exit 1; }
note() { echo "$prog: $*" >&2; }

need() {  # need BINARY WHAT: the full path of BINARY, or die naming WHAT needs it
    command -v "$1" 2>/dev/null || die "missing $1 in PATH ($2)"
}

pids=()

# kill_all: SIGTERM to every process in pids, then wait for them (the scripts' cleanup).
kill_all() {
    local pid
    for pid in "${pids[@]}"; do
        kill -TERM "$pid" 2>/dev/null || true
    done
    for pid in "${pids[@]}"; do
        wait "$pid" 2>/dev/null || true
    done
}

# forget PID: drops PID from pids once it has been reaped, so cleanup never signals a
# number the kernel may have handed to another process since.
forget() {
    local p keep=()
    for p in "${pids[@]}"; do
        [[ $p == "$1" ]] || keep+=("$p")
    done
    pids=("${keep[@]}")
}

# stop PID [LOG]: SIGTERM, then SIGKILL after stop_wait seconds (default 5; said in LOG and on
# stderr: a killed server may not have written its cached metadata); waits, so the image is
# closed and its lock free afterwards.
stop() {
    local pid=$1 log=${2:-/dev/null} i
    if kill -TERM "$pid" 2>/dev/null; then
        for ((i = 0; i < ${stop_wait:-5} * 10; i++)); do
            kill -0 "$pid" 2>/dev/null || break
            sleep 0.1
        done
        if kill -KILL "$pid" 2>/dev/null; then
            echo "$prog: SIGKILL after ${stop_wait:-5} s" >>"$log"
            note "process $pid ignored SIGTERM for ${stop_wait:-5} s, killed"
        fi
    fi
    wait "$pid" 2>/dev/null || true
    forget "$pid"
}

# start_server NAME SOCK LOG READY: starts server NAME, whose command line server_cmd NAME SOCK
# puts in the array cmd (pinned with server_pin, stdin closed, output to LOG), and waits up to
# 10 s until the command READY SOCK succeeds. Sets started_pid. Returns 1 if it exits or never
# gets ready (the process is then stopped).
start_server() {
    local name=$1 sock=$2 log=$3 ready=$4 deadline=$((SECONDS + 10)) cmd
    server_cmd "$name" "$sock"
    echo "+ ${cmd[*]}" >>"$log"
    "${server_pin[@]}" "${cmd[@]}" </dev/null >>"$log" 2>&1 &
    started_pid=$!
    pids+=("$started_pid")
    while kill -0 "$started_pid" 2>/dev/null; do
        if "$ready" "$sock"; then
            return 0
        fi
        if ((SECONDS >= deadline)); then
            echo "$prog: $name not ready on $sock after 10 s" >>"$log"
            stop "$started_pid" "$log"
            return 1
        fi
        sleep 0.05
    done
    wait "$started_pid" 2>/dev/null || true
    forget "$started_pid"
    return 1
}

# nbd_ready SOCK: whether nbdinfo ($nbdinfo) can connect to the export "disk" on SOCK.
nbd_ready() {
    "$nbdinfo" --can connect "nbd+unix:///disk?socket=$1" 2>/dev/null
}

# start_nbd NAME SOCK LOG: start_server with nbd_ready.
start_nbd() {
    start_server "$1" "$2" "$3" nbd_ready
}

# cpu_ticks PID: utime+stime+cutime+cstime of PID in clock ticks. /proc/PID/stat sums every
# thread of the process, including threads that have already exited (qemu's thread pool).
cpu_ticks() {
    local s f
    read -r s <"/proc/$1/stat" || return 1
    s=${s##*) }  # skip "pid (comm) "; comm may contain spaces
    read -ra f <<<"$s"
    echo $((f[11] + f[12] + f[13] + f[14]))
}

now_us() { echo "${EPOCHREALTIME/./}"; }

# cpu_window PID FROM_US TO_US: sleeps until FROM_US (now_us time), reads PID's CPU time,
# sleeps until TO_US, reads it again; sets window_cpu (CPU seconds) and window_wall (seconds
# between the two readings), or both to "-" if a reading failed (the process is gone).
cpu_window() {
    local pid=$1 c1 c2 w1 w2
    window_cpu=- window_wall=-
    sleep_until_us "$2"
    c1=$(cpu_ticks "$pid") && w1=$(now_us) || return 0
    sleep_until_us "$3"
    c2=$(cpu_ticks "$pid") && w2=$(now_us) || return 0
    window_cpu=$(awk -v d=$((c2 - c1)) -v hz="$(getconf CLK_TCK)" 'BEGIN { printf "%.4f", d / hz }')
    window_wall=$(awk -v d=$((w2 - w1)) 'BEGIN { printf "%.6f", d / 1e6 }')
}

# sleep_until_us T: sleeps until now_us >= T. In the background, so that a signal's trap runs
# at once (bash defers traps until a foreground command ends) rather than after the sleep.
sleep_until_us() {
    local d=$(($1 - $(now_us))) sp
    ((d > 0)) || return 0
    sleep "$((d / 1000000)).$(printf %06d $((d % 1000000)))" &
    sp=$!
    pids+=("$sp")
    wait "$sp" || true
    forget "$sp"
}

loadavg() { cut -d' ' -f1-3 /proc/loadavg; }

# select_jobs: job_list from all_jobs (lines starting with the job's name), in JOBS' order
# when JOBS is set, else all of them; dies on an unknown name.
select_jobs() {
    local want j found
    job_list=()
    if [[ -z ${JOBS:-} ]]; then
        job_list=("${all_jobs[@]}")
        return 0
    fi
    for want in $JOBS; do
        found=
        for j in "${all_jobs[@]}"; do
            [[ ${j%% *} == "$want" ]] && { job_list+=("$j"); found=1; }
        done
        [[ -n $found ]] || die "unknown job in JOBS: $want"
    done
}

# setup_pin CLIENT: server_pin and client_pin (taskset prefixes) and pin_note from PIN (1:
# servers on CPU 0, CLIENT, the load generator's name, on CPU 1; else nothing pinned).
setup_pin() {
    if [[ ${PIN:-0} == 1 ]]; then
        [[ $(nproc) -ge 2 ]] || die "PIN=1 needs two CPUs"
        need taskset "PIN=1" >/dev/null
        server_pin=(taskset -c 0)
        client_pin=(taskset -c 1)
        pin_note="servers on CPU 0, $1 on CPU 1"
    else
        server_pin=()
        client_pin=()
        pin_note="nothing pinned (servers and $1 share all CPUs)"
    fi
}

# check_image_dir DIR SIZE: size_bytes (SIZE, IEC suffix, whole MiB) and img_fs (DIR's file
# system type, with a warning when it is not tmpfs); dies if DIR cannot hold the image.
check_image_dir() {
    local avail
    size_bytes=$(numfmt --from=iec "$2") || die "bad SIZE: $2"
    [[ -d $1 ]] || die "IMG_DIR not found: $1"
    img_fs=$(stat -f -c %T "$1")
    [[ $img_fs == tmpfs ]] || note "warning: $1 is $img_fs, not tmpfs; numbers include that file system"
    ((size_bytes > 0 && size_bytes % (1 << 20) == 0)) || die "SIZE must be a whole number of MiB"
    avail=$(($(stat -f -c '%a * %S' "$1")))
    ((avail > size_bytes + (64 << 20))) || die "$1 has $avail bytes free, the image needs $size_bytes"
}

# remove_tmp DIR: removes DIR, or keeps it and says where when KEEP=1.
remove_tmp() {
    if [[ ${KEEP:-0} == 1 ]]; then
        note "kept $1"
    else
        rm -rf "$1"
    fi
}
