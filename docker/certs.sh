#!/usr/bin/env bash
# Make the compose cluster's development CA and certificates once
# (`berth certs`) in cluster-config/compose/tls/, which docker-compose.yml
# mounts into every node at /etc/berth/tls. Keys stay 0600 and are given to
# uid 10001, the berth user inside the images.
#   docker/certs.sh path/to/berth
set -euo pipefail
BIN=${1:?path to the berth binary}
DIR="$(cd "$(dirname "$0")/.." && pwd)/cluster-config/compose/tls"
[ -f "$DIR/ca.pem" ] && exit 0
"$BIN" certs --out "$DIR" --nodes 1,2,3,4 >/dev/null
if ! chown 10001 "$DIR"/*.key 2>/dev/null; then
  echo "certs: could not give the keys to uid 10001 (not root?): the nodes cannot read them" >&2
  exit 1
fi
