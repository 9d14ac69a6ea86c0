#!/usr/bin/env bash
# Run the OCI distribution-spec conformance suite against berth.
#
#   scripts/conformance.sh single CONFORMANCE_BIN   # one node
#   scripts/conformance.sh lb CONFORMANCE_BIN       # cluster-config/local's three nodes
#                                                   # behind haproxy, round robin, no stickiness
#
# CONFORMANCE_BIN is the suite built from opencontainers/distribution-spec
# (`conformance/`, e.g. `go test -c`); it is not part of this repository.
# Needs a release build (target/release/berth, or $BERTH) and, for `lb`,
# haproxy. Prints the suite's summary; its report lands in $OUT (default: a
# temporary directory). Exits non-zero if any test failed.
set -euo pipefail
mode=${1:?single or lb}
suite=$(realpath "${2:?path to the conformance binary}")
root=$(cd "$(dirname "$0")/.." && pwd)
berth=${BERTH:-${CARGO_TARGET_DIR:-$root/target}/release/berth}
work=$(mktemp -d)
out=${OUT:-$work/report}
mkdir -p "$out"
pids=()
cleanup() {
  for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done
  wait 2>/dev/null || true
  rm -rf "$work/data"
}
trap cleanup EXIT

wait_http() {
  for _ in $(seq 1 300); do
    if [ "$(curl -s -o /dev/null -w '%{http_code}' "http://$1/v2/")" = 200 ]; then return 0; fi
    sleep 0.2
  done
  echo "no answer from $1" >&2
  return 1
}

case "$mode" in
  single)
    "$berth" serve --http 127.0.0.1:5000 --grpc 127.0.0.1:5100 --data-dir "$work/data/single" 2>"$work/node.log" &
    pids+=($!)
    wait_http 127.0.0.1:5000
    ;;
  lb)
    # The local configs name their certificates relative to the repository.
    cd "$root"
    if grep -q cluster_tls cluster-config/local/node1.toml && [ ! -f cluster-config/local/tls/ca.pem ]; then
      "$berth" certs --out cluster-config/local/tls --nodes 1,2,3,4 >/dev/null
    fi
    for n in 1 2 3; do
      "$berth" serve --config "$root/cluster-config/local/node$n.toml" --data-dir "$work/data/node$n" \
        2>"$work/node$n.log" &
      pids+=($!)
    done
    for n in 1 2 3; do wait_http "127.0.0.1:500$n"; done
    cat >"$work/haproxy.cfg" <<EOF
global
    maxconn 4096
defaults
    mode http
    option http-keep-alive
    timeout connect 2s
    timeout client 5m
    timeout server 5m
frontend registry
    bind 127.0.0.1:5000
    default_backend berth
backend berth
    balance roundrobin
    server node1 127.0.0.1:5001
    server node2 127.0.0.1:5002
    server node3 127.0.0.1:5003
EOF
    haproxy -f "$work/haproxy.cfg" -db 2>"$work/haproxy.log" &
    pids+=($!)
    wait_http 127.0.0.1:5000
    ;;
  *) echo "mode: single or lb" >&2; exit 2 ;;
esac

cd "$out"
set +e
OCI_REGISTRY=127.0.0.1:5000 OCI_TLS=disabled OCI_RESULTS_DIR="$out" \
  OCI_API_BLOBS_UPLOAD_CANCEL=true OCI_API_MANIFESTS_TAG_PARAM=true \
  "$suite" >"$out/suite.log" 2>&1
rc=$?
set -e
tail -15 "$out/suite.log"
echo "report: $out (exit $rc)"
exit $rc
