#!/usr/bin/env bash
# Build berth's container images without pulling anything from a registry:
#   1. berth-base:bookworm, a minimal Debian root made with debootstrap and
#      `docker import` (built once, then reused);
#   2. berth:local (or $BERTH_IMAGE), that base plus the berth binary built
#      on this host, stripped;
#   3. berth-lb:local, that base plus Debian's haproxy.
# Usage: docker/build-images.sh [path/to/berth-binary]
# With internet access, `docker build -t berth:local .` (the Dockerfile at the
# top level) builds the same berth image from source instead.
set -euo pipefail
cd "$(dirname "$0")/.."
# One build at a time on this machine: two end-to-end runs at once would
# otherwise both debootstrap the base, or both rebuild the balancer image.
exec 9>"${TMPDIR:-/tmp}/berth-build-images.lock"
flock 9
BIN=${1:-${CARGO_TARGET_DIR:-target}/release/berth}
MIRROR=${DEBIAN_MIRROR:-http://deb.debian.org/debian}

if ! docker image inspect berth-base:bookworm >/dev/null 2>&1; then
  command -v debootstrap >/dev/null || { apt-get update -qq && apt-get install -y -qq debootstrap >/dev/null; }
  root=$(mktemp -d)
  trap 'rm -rf "$root"' EXIT
  echo "build-images: debootstrap bookworm (minbase)"
  debootstrap --variant=minbase bookworm "$root" "$MIRROR" >/dev/null
  # Documentation, manuals and translations are dead weight in a container.
  rm -rf "$root"/var/cache/apt/archives/*.deb "$root"/var/lib/apt/lists/* \
    "$root"/usr/share/doc/* "$root"/usr/share/man/* "$root"/usr/share/info/* "$root"/usr/share/locale/*
  tar -C "$root" -c . | docker import - berth-base:bookworm >/dev/null
fi

[ -x "$BIN" ] || { echo "build-images: no berth binary at $BIN (cargo build --release first)" >&2; exit 1; }
ctx=$(mktemp -d)
trap 'rm -rf "$ctx"' EXIT
# The release profile keeps line tables for profiling; the image does not need them.
strip -o "$ctx/berth" "$BIN"
cp docker/Dockerfile.offline "$ctx/Dockerfile"
TAG=${BERTH_IMAGE:-berth:local}
echo "build-images: $TAG"
DOCKER_BUILDKIT=0 docker build -q -t "$TAG" "$ctx" >/dev/null 2>&1 || DOCKER_BUILDKIT=0 docker build -t "$TAG" "$ctx"

lbctx=$(mktemp -d)
cp docker/Dockerfile.lb "$lbctx/Dockerfile"
cp docker/haproxy.cfg docker/lb-*.cfg "$lbctx/"
# Rebuilt whenever its Dockerfile or configs change (a label keeps their hash).
lbhash=$(cat "$lbctx"/* | sha256sum | cut -c1-16)
echo "LABEL berth-lb-inputs=$lbhash" >>"$lbctx/Dockerfile"
have=$(docker image inspect --format '{{index .Config.Labels "berth-lb-inputs"}}' berth-lb:local 2>/dev/null || true)
if [ "$have" != "$lbhash" ] || [ -n "${REBUILD_LB:-}" ]; then
  echo "build-images: berth-lb:local"
  DOCKER_BUILDKIT=0 docker build -q -t berth-lb:local "$lbctx" >/dev/null 2>&1 || DOCKER_BUILDKIT=0 docker build -t berth-lb:local "$lbctx"
fi
rm -rf "$lbctx"
docker image ls --format '{{.Repository}}:{{.Tag}} {{.Size}}' | grep -E '^berth' || true
