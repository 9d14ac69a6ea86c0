#!/usr/bin/env bash
# Run the OCI distribution-spec conformance suite against berth.
#
#   scripts/conformance.sh single CONFORMANCE_BIN   # one node
#   scripts/conformance.sh lb CONFORMANCE_BIN       # cluster-config/local's three nodes
#                                                   # behind haproxy, round robin, no stickiness
#   scripts/conformance.sh secure CONFORMANCE_BIN   # one node serving TLS (a CA made here) with
#                                                   # an htpasswd user, whom the suite logs in as
#   scripts/conformance.sh secure-lb CONFORMANCE_BIN  # the three nodes, each serving TLS with that
#                                                   # user, behind haproxy ending and re-opening TLS
#
# CONFORMANCE_BIN is the suite built from opencontainers/distribution-spec
# (`conformance/`, e.g. `go test -c`); it is not part of this repository.
# Needs a release build (target/release/berth, or $BERTH) and, for `lb`,
# haproxy. Prints the suite's summary; its report lands in $OUT (default: a
# temporary directory). Exits non-zero if any test failed.
set -euo pipefail
mode=${1:?single, lb, secure or secure-lb}
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

scheme=http
curl_opts=()
wait_http() {
  for _ in $(seq 1 300); do
    code=$(curl -s "${curl_opts[@]}" -o /dev/null -w '%{http_code}' "$scheme://$1/v2/" || true)
    if [ "$code" = 200 ] || [ "$code" = 401 ]; then return 0; fi
    sleep 0.2
  done
  echo "no answer from $1" >&2
  return 1
}

# make_tls: a CA and a certificate for localhost (made with openssl), one
# user whose password the suite logs in with, and a config layer with both.
make_tls() {
  mkdir -p "$work/tls"
  openssl req -x509 -newkey ec -pkeyopt ec_paramgen_curve:P-256 -nodes -days 2 -subj /CN=conformance-ca \
    -keyout "$work/tls/ca.key" -out "$work/tls/ca.pem" 2>/dev/null
  openssl req -newkey ec -pkeyopt ec_paramgen_curve:P-256 -nodes -subj /CN=localhost \
    -keyout "$work/tls/api.key" -out "$work/tls/api.csr" 2>/dev/null
  printf 'subjectAltName=DNS:localhost,IP:127.0.0.1\n' >"$work/tls/ext"
  openssl x509 -req -in "$work/tls/api.csr" -CA "$work/tls/ca.pem" -CAkey "$work/tls/ca.key" -CAcreateserial \
    -days 2 -extfile "$work/tls/ext" -out "$work/tls/api.pem" 2>/dev/null
  cat "$work/tls/api.pem" "$work/tls/api.key" >"$work/tls/haproxy.pem"
  password=$(head -c 12 /dev/urandom | od -An -tx1 | tr -d ' \n')
  "$berth" htpasswd conformance "$password" >"$work/htpasswd"
  cat >"$work/secure.toml" <<EOF
[tls]
cert = "$work/tls/api.pem"
key = "$work/tls/api.key"
[auth]
htpasswd = "$work/htpasswd"
EOF
  scheme=https
  curl_opts=(--cacert "$work/tls/ca.pem")
  export OCI_USERNAME=conformance OCI_PASSWORD=$password SSL_CERT_FILE="$work/tls/ca.pem"
  # On a registry with users, a mount names its source (`from`): one
  # without it is answered with an upload session, as the spec allows.
  export OCI_API_BLOBS_MOUNT_ANONYMOUS=false
}

# start_three [CONFIG_LAYER]: cluster-config/local's three nodes, each with
# the layer over its own file when given.
start_three() {
  # The local configs name their certificates relative to the repository.
  cd "$root"
  if grep -q cluster_tls cluster-config/local/node1.toml && [ ! -f cluster-config/local/tls/ca.pem ]; then
    "$berth" certs --out cluster-config/local/tls --nodes 1,2,3,4 >/dev/null
  fi
  local layer=()
  [ -z "${1:-}" ] || layer=(--config "$1")
  for n in 1 2 3; do
    "$berth" serve --config "$root/cluster-config/local/node$n.toml" "${layer[@]}" --data-dir "$work/data/node$n" \
      2>"$work/node$n.log" &
    pids+=($!)
  done
  for n in 1 2 3; do wait_http "localhost:500$n"; done
}

# start_haproxy BIND_OPTIONS SERVER_OPTIONS: round robin over the three
# nodes, request by request, no stickiness.
start_haproxy() {
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
    bind 127.0.0.1:5000 $1
    default_backend berth
backend berth
    balance roundrobin
    server node1 127.0.0.1:5001 $2
    server node2 127.0.0.1:5002 $2
    server node3 127.0.0.1:5003 $2
EOF
  haproxy -f "$work/haproxy.cfg" -db 2>"$work/haproxy.log" &
  pids+=($!)
  wait_http localhost:5000
}

case "$mode" in
  single)
    "$berth" serve --http 127.0.0.1:5000 --grpc 127.0.0.1:5100 --data-dir "$work/data/single" 2>"$work/node.log" &
    pids+=($!)
    wait_http 127.0.0.1:5000
    ;;
  lb)
    start_three
    start_haproxy "" ""
    ;;
  secure)
    make_tls
    cat >"$work/single.toml" <<EOF
http = "127.0.0.1:5000"
grpc = "127.0.0.1:5100"
data_dir = "$work/data/secure"
EOF
    "$berth" serve --config "$work/single.toml" --config "$work/secure.toml" 2>"$work/node.log" &
    pids+=($!)
    wait_http localhost:5000
    ;;
  secure-lb)
    # Every node serves TLS and checks the user; haproxy ends the client's
    # TLS, balances each request, and speaks TLS again to the nodes
    # (verifying their certificate).
    make_tls
    start_three "$work/secure.toml"
    start_haproxy "ssl crt $work/tls/haproxy.pem alpn h2,http/1.1" "ssl verify required ca-file $work/tls/ca.pem"
    ;;
  *) echo "mode: single, lb, secure or secure-lb" >&2; exit 2 ;;
esac

if [ "$scheme" = https ]; then registry=localhost:5000 tls=enabled; else registry=127.0.0.1:5000 tls=disabled; fi
cd "$out"
set +e
OCI_REGISTRY=$registry OCI_TLS=$tls OCI_RESULTS_DIR="$out" \
  OCI_API_BLOBS_UPLOAD_CANCEL=true OCI_API_MANIFESTS_TAG_PARAM=true \
  "$suite" >"$out/suite.log" 2>&1
rc=$?
set -e
tail -15 "$out/suite.log"
echo "report: $out (exit $rc)"
exit $rc
