#!/usr/bin/env bash
# Run one fuzz target (or `all`, in turn) until QUIET seconds pass with no new
# coverage (libFuzzer's NEW lines), at most CAP seconds, then minimize its
# corpus. Prints, per target: runs, seconds, corpus size, and any crash.
# Seconds are the fuzzer's CPU seconds, not the wall clock's: on a machine
# shared with builds and tests (or with the fuzzer stopped by SIGSTOP to keep
# a benchmark's machine quiet) time it does not run never counts as quiet.
#   fuzz/run.sh TARGET|all [QUIET=600] [CAP=3600]
set -euo pipefail
cd "$(dirname "$0")"
target=${1:?target or all}
quiet=${2:-600}
cap=${3:-3600}
export RUSTC_BOOTSTRAP=1
# Link the RocksDB that `cargo build --release` already compiled, if any
# (in CARGO_TARGET_DIR, ../target or .ci/run's cache), instead of compiling
# its C++ again; the fuzz build itself goes to fuzz/target.
lib=$(for t in "${CARGO_TARGET_DIR:-}" ../target "$HOME/.cache/berth-target"; do
  [ -n "$t" ] && ls "$t"/release/build/librocksdb-sys-*/out/librocksdb.a 2>/dev/null; done | head -n1 || true)
# (absolute: the build script runs elsewhere).
if [ -n "$lib" ] && [ -z "${ROCKSDB_LIB_DIR:-}" ]; then
  ROCKSDB_LIB_DIR=$(cd "${lib%/*}" && pwd)
  export ROCKSDB_LIB_DIR ROCKSDB_STATIC=1
fi
unset CARGO_TARGET_DIR
flags=(--sanitizer none --release --debug-assertions)

run_one() {
  local t=$1 log start last now pid
  mkdir -p "corpus/$t" "artifacts/$t"
  cargo fuzz build "${flags[@]}" "$t" >/dev/null
  log=$(mktemp)
  start=$(date +%s)
  # In a process group of its own, so that the stop below reaches the
  # fuzzer itself and not only cargo-fuzz, its parent.
  setsid cargo fuzz run "${flags[@]}" "$t" "corpus/$t" -- -print_final_stats=1 \
    -artifact_prefix="artifacts/$t/" >"$log" 2>&1 &
  pid=$!
  # setsid gave the fuzzer a scheduler autogroup of its own, which competes
  # with everything else at equal weight whatever its nice value: lower it,
  # so that on a shared machine the fuzzer takes only idle CPU.
  echo 19 >"/proc/$pid/autogroup" 2>/dev/null || true
  # now: CPU seconds of the group so far; last: CPU seconds at the newest NEW line.
  now=0; last=0
  while kill -0 "$pid" 2>/dev/null; do
    sleep 5
    now=$(ps -o cputimes= -g "$pid" | awk '{s += $1} END {print s + 0}')
    if grep -q 'NEW ' "$log"; then
      n=$(grep -c 'NEW ' "$log")
      if [ "$n" != "${seen:-0}" ]; then seen=$n; last=$now; fi
    fi
    if [ $((now - last)) -ge "$quiet" ] || [ "$now" -ge "$cap" ]; then
      kill -CONT -- "-$pid" 2>/dev/null || true
      kill -INT -- "-$pid" 2>/dev/null || true
      break
    fi
  done
  wait "$pid" 2>/dev/null || true
  local why="the ${cap}s cap, last new coverage $((now - last))s before"
  [ $((now - last)) -lt "$quiet" ] || why="${quiet}s without new coverage"
  seen=0
  local runs; runs=$(grep -o 'stat::number_of_executed_units: [0-9]*' "$log" | awk '{print $2}' | tail -n1)
  [ -n "$runs" ] || runs=$(grep -oE '^#[0-9]+' "$log" | tail -n1 | tr -d '#')
  # libFuzzer also saves units slow on the clock (slow-unit-*): a fuzzer
  # stopped by SIGSTOP mid-unit makes one. They are not failures.
  local crashes; crashes=$(ls "artifacts/$t" | grep -vc '^slow-unit-' || true)
  cargo fuzz cmin "${flags[@]}" "$t" "corpus/$t" >/dev/null 2>&1 || true
  echo "fuzz $t: ${runs:-?} runs in ${now} CPU seconds ($(( $(date +%s) - start ))s on the clock), stopped by $why; corpus $(ls "corpus/$t" | wc -l) files, crashes: $crashes"
  if [ "$crashes" != 0 ]; then grep -A20 -m1 'panicked\|ERROR' "$log" || true; fi
  rm -f "$log"
  [ "$crashes" = 0 ]
}

if [ "$target" = all ]; then
  rc=0
  for t in digest name_reference ranges manifest htpasswd token; do run_one "$t" || rc=1; done
  exit $rc
fi
run_one "$target"
