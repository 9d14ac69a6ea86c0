#!/usr/bin/env bash
# Make what the TLS compose clusters mount at /etc/berth/secure (nodes) and
# /etc/haproxy/secure (load balancer): a development CA for the registry's
# public name (ca.pem, ca.key), a certificate for localhost, 127.0.0.1 and
# the compose host names (api.pem, api.key; haproxy.pem is both in one file,
# as haproxy reads them), and an htpasswd file with one user. Existing files
# are kept. Keys and the htpasswd file are given to uid 10001, the berth
# user inside the images. Needs openssl.
#   docker/api-certs.sh BERTH_BIN DIR USER PASSWORD
# Clients trust DIR/ca.pem: docker through /etc/docker/certs.d/HOST:PORT/ca.crt,
# skopeo and podman with --cert-dir, curl with --cacert.
set -euo pipefail
BIN=${1:?path to the berth binary}
DIR=${2:?directory to write to}
USER_NAME=${3:?user}
PASSWORD=${4:?password}
mkdir -p "$DIR"
chmod 755 "$DIR"
cd "$DIR"
if [ ! -f ca.pem ]; then
  openssl req -x509 -newkey ec -pkeyopt ec_paramgen_curve:P-256 -nodes -days 30 -subj /CN=berth-registry-ca \
    -keyout ca.key -out ca.pem 2>/dev/null
fi
if [ ! -f api.pem ]; then
  openssl req -newkey ec -pkeyopt ec_paramgen_curve:P-256 -nodes -subj /CN=localhost \
    -keyout api.key -out api.csr 2>/dev/null
  printf 'subjectAltName=DNS:localhost,IP:127.0.0.1,DNS:lb,DNS:node1,DNS:node2,DNS:node3,DNS:node4\n' >api.ext
  openssl x509 -req -in api.csr -CA ca.pem -CAkey ca.key -CAcreateserial -days 30 -extfile api.ext \
    -out api.pem 2>/dev/null
  rm -f api.csr api.ext ca.srl
  cat api.pem api.key >haproxy.pem
fi
[ -f htpasswd ] || "$BIN" htpasswd "$USER_NAME" "$PASSWORD" >htpasswd
chmod 600 ca.key api.key haproxy.pem htpasswd
chmod 644 ca.pem api.pem
if ! chown 10001 api.key htpasswd 2>/dev/null; then
  echo "api-certs: could not give the key and htpasswd to uid 10001 (not root?): the nodes cannot read them" >&2
  exit 1
fi
