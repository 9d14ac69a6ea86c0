#!/usr/bin/env bash
# The test command: every unit and integration test, in release mode (one
# build profile for tests, benchmarks and the binary the tests start). It
# ends with every part of a test that was skipped, and why, then one line
# adding up cargo's results.
set -euo pipefail
cd "$(dirname "$0")/.."
"$(dirname "$0")/setup.sh"
log=$(mktemp)
BERTH_SKIP_LOG=$(mktemp)
export BERTH_SKIP_LOG
trap 'rm -f "$log" "$BERTH_SKIP_LOG"' EXIT
set +e
cargo test --release --workspace -- --test-threads 2 "$@" 2>&1 | tee "$log"
rc=${PIPESTATUS[0]}
set -e
passed=$(grep -oE '^test result: [A-Za-z]+\. [0-9]+ passed' "$log" | awk '{s += $4} END {print s + 0}')
failed=$(grep -oE '^test result: [A-Za-z]+\. [0-9]+ passed; [0-9]+ failed' "$log" | awk '{s += $6} END {print s + 0}')
skips=$(sort -u "$BERTH_SKIP_LOG" | grep -c . || true)
echo
if [ "$skips" -gt 0 ]; then
  echo "skipped ($skips):"
  sort -u "$BERTH_SKIP_LOG" | sed 's/^/  - /'
else
  echo "skipped: nothing"
fi
[ "$rc" = 0 ] || echo "cargo test exited $rc"
echo "tests: $passed passed, $failed failed, $skips skipped"
exit "$rc"
