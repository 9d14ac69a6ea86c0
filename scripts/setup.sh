#!/usr/bin/env bash
# Install what building and testing berth needs on a fresh Debian machine:
# libclang (rocksdb bindings), protoc (tonic code generation), and the real
# registry clients the tests drive (skopeo, podman, buildah). Installs only what is missing.
set -euo pipefail
need=()
[ -n "$(ls /usr/lib/llvm-*/lib/libclang.so* /usr/lib/llvm-*/lib/libclang-[0-9]*.so* 2>/dev/null | head -n1)" ] || need+=(libclang-dev)
command -v protoc >/dev/null || need+=(protobuf-compiler)
command -v skopeo >/dev/null || need+=(skopeo)
command -v podman >/dev/null || need+=(podman)
command -v buildah >/dev/null || need+=(buildah)
command -v curl >/dev/null || need+=(curl)
# The compose end-to-end test builds its base image with debootstrap.
if command -v docker >/dev/null; then
  command -v debootstrap >/dev/null || need+=(debootstrap)
  # jepsen-style-tests cuts links inside the containers with iptables.
  [ -x /usr/sbin/iptables ] || need+=(iptables)
  # The compose end-to-end tests and the jepsen-style run drive compose v1.
  command -v docker-compose >/dev/null || need+=(docker-compose)
fi
# The TLS tests make certificates with openssl; the conformance script too.
command -v openssl >/dev/null || need+=(openssl)
# The power-loss crash tests mount a FUSE filesystem (root mounts directly;
# anyone else needs fusermount3).
command -v fusermount3 >/dev/null || need+=(fuse3)
if [ ${#need[@]} -gt 0 ]; then
  echo "setup: installing ${need[*]}"
  if [ "$(id -u)" = 0 ]; then SUDO=; else SUDO=sudo; fi
  $SUDO apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq "${need[@]}" >/dev/null
fi
# ORAS, the artifact client, is a Python SDK on PyPI: installed into a
# virtual environment of berth's own (the tests run its python), so a system
# Python that refuses pip installs is no obstacle.
venv=${BERTH_VENV:-$HOME/.cache/berth-venv}
if ! "$venv/bin/python" -c 'import oras.client' 2>/dev/null; then
  if ! python3 -m venv "$venv" 2>/dev/null; then
    if [ "$(id -u)" = 0 ]; then SUDO=; else SUDO=sudo; fi
    $SUDO apt-get update -qq && DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq python3-venv >/dev/null
    python3 -m venv "$venv"
  fi
  "$venv/bin/python" -m pip install -q oras requests \
    || echo "setup: WARNING: could not install oras into $venv (PyPI); the ORAS tests will be listed as skipped" >&2
fi
