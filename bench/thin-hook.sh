#!/bin/bash
# bench/thin-hook.sh VOLUME CURRENT_SIZE NEW_SIZE: a thinblk-agent extension hook for a loop
# device (what the built-in method "loop" does, as a program), which also records when it ran.
#
# Grows the backing file of the loop device VOLUME to NEW_SIZE bytes and has the kernel take the
# new capacity (losetup -c). Appends one line to $THIN_HOOK_LOG (if set) when done:
#   <start> <end> <volume> <current> <new> <status>
# start and end are wall-clock times in nanoseconds (date +%s%N): "end" is when the space is
# there, after losetup -c returned. $THIN_HOOK_DELAY (seconds, default 0) adds a pause before
# growing, to stand for slower storage (LVM, a SAN) in the benchmark.
set -u
start=$(date +%s%N)
dev=$1 cur=$2 new=$3
status=0
if [[ ${THIN_HOOK_DELAY:-0} != 0 ]]; then
    sleep "$THIN_HOOK_DELAY"
fi
backing=$(losetup -n -O BACK-FILE "$dev" 2>/dev/null | sed 's/[[:space:]]*$//')
if [[ -z $backing || ! -f $backing ]]; then
    echo "thin-hook: $dev is not a loop device on a regular file" >&2
    status=1
elif ! truncate -s ">$new" "$backing" || ! losetup -c "$dev"; then
    status=1
fi
end=$(date +%s%N)
if [[ -n ${THIN_HOOK_LOG:-} ]]; then
    echo "$start $end $dev $cur $new $status" >>"$THIN_HOOK_LOG"
fi
exit $status
