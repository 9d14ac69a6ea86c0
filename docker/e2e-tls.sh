#!/usr/bin/env bash
# End-to-end test of the compose cluster with TLS and users, both ways
# berth supports: TLS ending at the load balancer (docker-compose.tls-lb.yml)
# and at the nodes (docker-compose.tls-nodes.yml, haproxy passing TCP
# through). In each: anonymous pushes refused, `docker login` then push and
# pull (the engine trusting the test's CA), skopeo, podman and ORAS with
# credentials verifying the certificate, a public repository pulled without
# credentials, HTTP/2 offered, and pushes and pulls going on with a node
# killed. Everything it creates is removed on exit, pass or fail.
#   BERTH_BIN=target/release/berth BERTH_PORT=5091 docker/e2e-tls.sh [lb|nodes]...
set -euo pipefail
cd "$(dirname "$0")/.."
E2E_NAME=e2e-tls E2E_PORT=5091
# shellcheck source=docker/e2e-lib.sh
source docker/e2e-lib.sh
# localhost, not 127.0.0.1: the certificate names both, and the engine's
# trust directory is per host:port.
REG="localhost:$BERTH_PORT"
MODES=("$@")
[ ${#MODES[@]} -gt 0 ] || MODES=(lb nodes)
export BERTH_SECURE_DIR="$WORK/secure"
# The Python with the ORAS SDK (scripts/setup.sh's virtual environment).
PY=${BERTH_PYTHON:-python3}
USER_NAME=e2e
PASSWORD=$(head -c 12 /dev/urandom | od -An -tx1 | tr -d ' \n')
CERTS_D="/etc/docker/certs.d/$REG"
# docker's logins go to a config dir of the test's own, which skopeo and
# podman are not told of (they would read it through DOCKER_CONFIG).
mkdir -p "$WORK/docker-config"
dk() { DOCKER_CONFIG="$WORK/docker-config" docker "$@"; }
cleanup() {
  dc --profile join down -v --remove-orphans >/dev/null 2>&1 || true
  docker images -q --filter "label=berth-e2e=$P" | sort -u | xargs -r docker rmi -f >/dev/null 2>&1 || true
  docker rmi -f "$BERTH_IMAGE" >/dev/null 2>&1 || true
  rm -rf "$CERTS_D" "$WORK"
}
trap cleanup EXIT

CA="$BERTH_SECURE_DIR/ca.pem"
curl_s() { curl -s --cacert "$CA" "$@"; }
# The load balancer answers over TLS with the registry's certificate, and
# the nodes are serving (401: credentials needed).
healthy() { [ "$(curl_s -o /dev/null -w '%{http_code}' "https://$REG/v2/")" = 401 ] && [ "$(count_answering node1)" = "$1" ]; }

step "building images (offline path)"
docker/build-images.sh "$BIN" >/dev/null || fail "image build"
docker/certs.sh "$BIN" || fail "cluster certificates"
docker/api-certs.sh "$BIN" "$BERTH_SECURE_DIR" "$USER_NAME" "$PASSWORD" || fail "API certificates"
mkdir -p "$CERTS_D" && cp "$CA" "$CERTS_D/ca.crt"
CERT_DIR="$WORK/cert-dir"; mkdir -p "$CERT_DIR"; cp "$CA" "$CERT_DIR/ca.crt"
# podman's own storage: the test neither sees nor leaves images elsewhere.
PODMAN=(podman --root "$WORK/podman/root" --runroot "$WORK/podman/run" --storage-driver vfs)
export REGISTRY_AUTH_FILE="$WORK/podman-auth.json"

for mode in "${MODES[@]}"; do
  COMPOSE_FILES=(-f docker-compose.yml -f "docker-compose.tls-$mode.yml")
  t=$(date +%s)
  dc up -d >/dev/null 2>&1 || fail "compose up ($mode)"
  wait_until "cluster healthy over TLS ($mode)" 90 healthy 3
  step "[$mode] compose up and healthy over TLS in $(( $(date +%s) - t ))s"

  # Plain HTTP is not served on the registry port.
  code=$(curl -s -o /dev/null -w '%{http_code}' --max-time 5 "http://$REG/v2/" || true)
  [ "$code" != 200 ] && [ "$code" != 401 ] || fail "[$mode] plain HTTP answered $code"
  # HTTP/2 by ALPN, and the certificate verified against the test CA.
  v=$(curl_s --http2 -o /dev/null -w '%{http_version}' "https://$REG/v2/")
  [ "$v" = 2 ] || fail "[$mode] HTTP version $v, expected 2"
  # Anonymous: 401 with a Basic challenge; public/** may be read.
  curl_s -D - -o /dev/null "https://$REG/v2/e2e/app/tags/list" | grep -qi '^www-authenticate: Basic' \
    || fail "[$mode] no Basic challenge for an anonymous read"
  code=$(curl_s -o /dev/null -w '%{http_code}' "https://$REG/v2/public/none/tags/list")
  [ "$code" = 404 ] || fail "[$mode] anonymous read of public/** answered $code, expected 404 (allowed, unknown)"
  step "[$mode] TLS verified, HTTP/2, anonymous refused (public/** readable)"

  img="$REG/e2e/app:$mode"
  make_image "$img" "$mode"
  dk logout "$REG" >/dev/null 2>&1 || true
  ! dk push "$img" >/dev/null 2>&1 || fail "[$mode] push without login accepted"
  ! echo "wrong" | dk login "$REG" -u "$USER_NAME" --password-stdin >/dev/null 2>&1 \
    || fail "[$mode] login with a wrong password accepted"
  echo "$PASSWORD" | dk login "$REG" -u "$USER_NAME" --password-stdin >/dev/null 2>&1 \
    || fail "[$mode] docker login"
  id=$(image_id "$img")
  dk push "$img" >/dev/null || fail "[$mode] docker push"
  docker rmi "$img" >/dev/null
  dk pull "$img" >/dev/null || fail "[$mode] docker pull"
  [ "$(image_id "$img")" = "$id" ] || fail "[$mode] image id changed through the registry"
  step "[$mode] docker login, push, pull: ok"

  if command -v skopeo >/dev/null; then
    ! skopeo copy -q --src-no-creds --src-cert-dir "$CERT_DIR" "docker://$img" "oci:$WORK/layout-$mode:x" 2>/dev/null \
      || fail "[$mode] skopeo without credentials accepted"
    skopeo copy -q --src-cert-dir "$CERT_DIR" --src-creds "$USER_NAME:$PASSWORD" \
      "docker://$img" "oci:$WORK/layout-$mode:x" || fail "[$mode] skopeo copy out"
    skopeo copy -q --dest-cert-dir "$CERT_DIR" --dest-creds "$USER_NAME:$PASSWORD" \
      "oci:$WORK/layout-$mode:x" "docker://$REG/public/copy:$mode" || fail "[$mode] skopeo copy in"
    # public/** is pulled without credentials.
    skopeo inspect --cert-dir "$CERT_DIR" "docker://$REG/public/copy:$mode" >/dev/null \
      || fail "[$mode] anonymous inspect of public/copy"
    step "[$mode] skopeo with credentials, anonymous pull of public/**: ok"
  else
    step "SKIPPED [$mode] skopeo steps: skopeo not installed"
  fi

  if command -v podman >/dev/null; then
    "${PODMAN[@]}" logout "$REG" >/dev/null 2>&1 || true
    ! "${PODMAN[@]}" pull -q --cert-dir "$CERT_DIR" "$img" >/dev/null 2>&1 \
      || fail "[$mode] podman pull without credentials accepted"
    echo "$PASSWORD" | "${PODMAN[@]}" login --cert-dir "$CERT_DIR" -u "$USER_NAME" --password-stdin "$REG" \
      >/dev/null 2>&1 || fail "[$mode] podman login"
    "${PODMAN[@]}" pull -q --cert-dir "$CERT_DIR" "$img" >/dev/null || fail "[$mode] podman pull"
    "${PODMAN[@]}" tag "$img" "$REG/e2e/podman:$mode"
    "${PODMAN[@]}" push -q --cert-dir "$CERT_DIR" "$REG/e2e/podman:$mode" || fail "[$mode] podman push"
    step "[$mode] podman login, pull, push: ok"
  else
    step "SKIPPED [$mode] podman steps: podman not installed"
  fi

  if "$PY" -c 'import oras.client' 2>/dev/null; then
    mkdir -p "$WORK/oras-$mode"
    ORAS_USER=$USER_NAME ORAS_PASSWORD=$PASSWORD REQUESTS_CA_BUNDLE=$CA \
      "$PY" tests/oras_round_trip.py "$REG" "$WORK/oras-$mode" >/dev/null || fail "[$mode] oras"
    step "[$mode] oras with credentials (chunked push, referrers, pull): ok"
  else
    step "SKIPPED [$mode] oras steps: the oras Python SDK is not installed"
  fi

  # A node down: the balancer's TLS-aware health check takes it out, and
  # clients go on.
  dc kill node2 >/dev/null 2>&1
  img2="$REG/e2e/app:$mode-2"
  make_image "$img2" "$mode-2"
  dk push "$img2" >/dev/null || fail "[$mode] push with node2 down"
  docker rmi "$img" "$img2" >/dev/null
  dk pull "$img" >/dev/null || fail "[$mode] pull with node2 down"
  dk pull "$img2" >/dev/null || fail "[$mode] pull of the new image with node2 down"
  step "[$mode] push and pull with node2 down: ok"
  dk logout "$REG" >/dev/null 2>&1 || true
  dc --profile join down -v --remove-orphans >/dev/null 2>&1 || true
done
echo "e2e-tls: 1 passed, 0 failed"
