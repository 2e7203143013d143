#!/usr/bin/env bash
# `make soak-tests`: the whole ctest suite PASSES times in a row beside CPU
# load (two busy loops, as many as this 2-core machine has cores), then the
# failures per test. A test that fails even once here is a flaky test: a bug
# in the code or in the test.
#
# Usage: scripts/soak_tests.sh [BUILD_DIR] [PASSES]   (defaults: build, 10)
# Environment: CTEST_ARGS, extra ctest arguments (e.g. -R WorkerService);
# SOAK_LOAD (default 2) busy loops.
set -uo pipefail
cd "$(dirname "$0")/.."
build=${1:-build}
passes=${2:-10}
load=${SOAK_LOAD:-2}
jobs=$(nproc)
busy=()
stop_load() {
  if ((${#busy[@]})); then kill "${busy[@]}" 2>/dev/null; fi
  wait 2>/dev/null
}
trap stop_load EXIT
for ((i = 0; i < load; i++)); do
  (while :; do :; done) &
  busy+=($!)
done
failures=$(mktemp)
for ((pass = 1; pass <= passes; pass++)); do
  start=$(date +%s)
  # shellcheck disable=SC2086
  (cd "$build" && ctest --output-on-failure --timeout 300 -j "$jobs" ${CTEST_ARGS:-} \
    > "../$build/soak-pass.log" 2>&1)
  rc=$?
  summary=$(grep -E "tests passed|tests failed" "$build/soak-pass.log" | tail -1)
  echo "soak pass $pass/$passes: ${summary:-no summary} ($(($(date +%s) - start)) s)"
  if ((rc != 0)); then
    grep -E '^\s+[0-9]+ - ' "$build/soak-pass.log" | sed -E 's/^\s+[0-9]+ - //' \
      >> "$failures"
    cp "$build/soak-pass.log" "$build/soak-pass-$pass-failed.log"
  fi
done
if [[ -s "$failures" ]]; then
  echo "soak: failures per test over $passes passes (logs: $build/soak-pass-*-failed.log):"
  sort "$failures" | uniq -c | sort -rn
  rm -f "$failures"
  exit 1
fi
rm -f "$failures"
echo "soak: 0 failures in $passes passes under load"
