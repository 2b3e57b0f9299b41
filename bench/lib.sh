# shellcheck shell=bash disable=SC2154  # prog, server_pin, nbdinfo: set by the sourcing script
# Shared by bench/nbd.sh, bench/qcow2.sh and bench/thin.sh (sourced, not run): messages, the
# background processes a benchmark starts (in the array pids, so that its cleanup can stop
# them), CPU time and clocks. The sourcing script sets prog (its name, for messages) first.

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

# start_nbd NAME SOCK LOG: starts NBD server NAME, whose command line server_cmd NAME SOCK puts
# in the array cmd (pinned with server_pin, stdin closed, output to LOG), and waits up to 10 s
# until nbdinfo ($nbdinfo) can connect to its export "disk". Sets started_pid. Returns 1 if it
# exits or never answers (the process is then stopped).
start_nbd() {
    local name=$1 sock=$2 log=$3 deadline=$((SECONDS + 10)) cmd
    server_cmd "$name" "$sock"
    echo "+ ${cmd[*]}" >>"$log"
    "${server_pin[@]}" "${cmd[@]}" </dev/null >>"$log" 2>&1 &
    started_pid=$!
    pids+=("$started_pid")
    while kill -0 "$started_pid" 2>/dev/null; do
        if "$nbdinfo" --can connect "nbd+unix:///disk?socket=$sock" 2>/dev/null; then
            return 0
        fi
        if ((SECONDS >= deadline)); then
            echo "$prog: no NBD server on $sock after 10 s" >>"$log"
            stop "$started_pid" "$log"
            return 1
        fi
        sleep 0.05
    done
    wait "$started_pid" 2>/dev/null || true
    forget "$started_pid"
    return 1
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
