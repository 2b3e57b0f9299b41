#!/bin/bash
# Set up, build and run every test: twice (a normal build and an AddressSanitizer +
# UndefinedBehaviorSanitizer build, warnings as errors in both), then the fuzz target for a
# bounded number of runs. Exits non-zero on the first failure.
#   FUZZ_RUNS=N   iterations of each fuzz target (default 50000; 0 skips fuzzing)
#   FUZZ_TIME=S   at most S seconds per fuzz target, whichever of the two comes first (default
#                 240: the qcow2 target's writable opens make 50000 runs take 6 to 15 minutes)
set -euo pipefail
cd "$(dirname "$0")"
root=$PWD

scripts/deps.sh

# Debian's interpreter: it sees python3-pytest and python3-libnbd.
PYTEST=(/usr/bin/python3 -m pytest -q -p no:cacheprovider)

run_suite() {  # BUILD_DIR MESON_ARGS...
    local dir=$1; shift
    echo "=== $dir: build ===" >&2
    if [ -d "$dir/meson-private" ]; then
        meson configure "$dir" -Dwerror=true "$@"
    else
        meson setup "$dir" -Dwerror=true "$@"
    fi
    ninja -C "$dir"
    echo "=== $dir: unit tests ===" >&2
    meson test -C "$dir" --print-errorlogs
    echo "=== $dir: integration tests ===" >&2
    THINBLK_BUILD="$root/$dir" "${PYTEST[@]}" tests/integration
}

export ASAN_OPTIONS=detect_leaks=1:abort_on_error=1
export UBSAN_OPTIONS=halt_on_error=1:print_stacktrace=1

run_suite build
run_suite build-asan -Db_sanitize=address,undefined -Db_lundef=false

runs=${FUZZ_RUNS:-50000}
if [ "$runs" -gt 0 ]; then
    echo "=== build-fuzz: libFuzzer, $runs runs per target ===" >&2
    [ -d build-fuzz ] || CC=clang meson setup build-fuzz -Dwerror=true -Dfuzz=true -Dtests=false \
        -Ddocs=disabled -Db_sanitize=address,undefined -Db_lundef=false \
        -Dc_args=-fsanitize=fuzzer-no-link
    ninja -C build-fuzz
    for corpus in fuzz/corpus/*/; do
        target=$(basename "$corpus")
        scratch=$(mktemp -d)
        # New inputs go to the scratch folder: the seed corpus in git stays as it is.
        build-fuzz/fuzz/fuzz-"$target" -runs="$runs" -max_total_time="${FUZZ_TIME:-240}" -max_len=4096 \
            -dict=fuzz/"$target".dict "$scratch" "$corpus"
        rm -rf "$scratch"
    done
fi
echo "=== all tests passed ===" >&2
