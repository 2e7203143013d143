#!/usr/bin/env bash
# `make fuzz`: runs every fuzzer of fuzz/ for SECONDS each, one after the
# other, each from a fresh copy of its committed seed corpus
# (fuzz/corpus/<fuzzer>/, which never grows here), and prints per fuzzer
# the inputs it ran and whether it found anything. Exits 1 if any fuzzer
# found a crash, an abort, a leak, a timeout (over 10 s for one input), an
# out-of-memory (over 2 GiB) or undefined behaviour; the input that did it
# is saved as <work>/<fuzzer>/crash-*, leak-*, timeout-* or oom-*.
#
# Usage: scripts/fuzz.sh BUILD_DIR SECONDS [FUZZER...]   (default: all)
# The fuzzers must be built (cmake --build BUILD_DIR --target fuzzers).
set -euo pipefail
cd "$(dirname "$0")/.."
build=$1
seconds=$2
shift 2
fuzzers=("$@")
if [[ ${#fuzzers[@]} -eq 0 ]]; then
  for dir in fuzz/corpus/*/; do fuzzers+=("$(basename "$dir")"); done
fi
work=$build/fuzz-runs
# The fuzzers that write a file per input (safetensors, sst_chunk) run
# about 17x faster with their temp dir on tmpfs (fuzz/fuzz_support.h).
if [[ -z ${TMPDIR:-} && -d /dev/shm && -w /dev/shm ]]; then
  export TMPDIR=/dev/shm
fi
export ASAN_OPTIONS=detect_leaks=1:abort_on_error=1:allocator_may_return_null=1
export LSAN_OPTIONS=suppressions=$PWD/tests/sanitizers/lsan.supp:print_suppressions=0
export UBSAN_OPTIONS=print_stacktrace=1:halt_on_error=1
failed=()
for name in "${fuzzers[@]}"; do
  bin=$build/fuzz/$name
  if [[ ! -x $bin ]]; then
    echo "fuzz: $bin is missing: build the fuzzers first" >&2
    exit 2
  fi
  rm -rf "${work:?}/$name"
  mkdir -p "$work/$name"
  cp -r "fuzz/corpus/$name" "$work/$name/corpus"
  seeds=$(find "$work/$name/corpus" -type f | wc -l)
  log=$work/$name/log
  rc=0
  "$bin" -max_total_time="$seconds" -timeout=10 -rss_limit_mb=2048 \
    -use_value_profile=1 -print_final_stats=1 \
    -artifact_prefix="$work/$name/" "$work/$name/corpus" > "$log" 2>&1 || rc=$?
  runs=$(sed -n 's/^stat::number_of_executed_units: *//p' "$log" | tail -1)
  rate=$(sed -n 's/^stat::average_exec_per_sec: *//p' "$log" | tail -1)
  corpus=$(find "$work/$name/corpus" -type f | wc -l)
  findings=$(find "$work/$name" -maxdepth 1 -type f \
    \( -name 'crash-*' -o -name 'leak-*' -o -name 'timeout-*' \
       -o -name 'oom-*' \))
  if [[ $rc -ne 0 || -n $findings ]]; then
    echo "fuzz: $name: FOUND something after ${runs:-?} runs (exit $rc):" \
         "${findings:-see the log}; log: $log"
    grep -m1 -E 'ERROR: |runtime error|FUZZ_CHECK|Check failed' "$log" || true
    failed+=("$name")
  else
    echo "fuzz: $name: ${runs:-?} runs (${rate:-?}/s) in ${seconds} s," \
         "corpus $seeds -> $corpus inputs, nothing found"
  fi
done
if [[ ${#failed[@]} -ne 0 ]]; then
  echo "fuzz: findings in: ${failed[*]}"
  exit 1
fi
echo "fuzz: ${#fuzzers[@]} fuzzers, nothing found"
