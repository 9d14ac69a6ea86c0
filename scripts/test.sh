#!/usr/bin/env bash
# The test command: every unit and integration test, in release mode (one
# build profile for tests, benchmarks and the binary the tests start).
set -euo pipefail
cd "$(dirname "$0")/.."
"$(dirname "$0")/setup.sh"
cargo test --release --workspace -- --test-threads 2 "$@"
