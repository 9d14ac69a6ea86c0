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
fi
if [ ${#need[@]} -gt 0 ]; then
  echo "setup: installing ${need[*]}"
  if [ "$(id -u)" = 0 ]; then SUDO=; else SUDO=sudo; fi
  $SUDO apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq "${need[@]}" >/dev/null
fi
# ORAS, the artifact client, is a Python SDK on PyPI.
python3 -c 'import oras.client' 2>/dev/null || python3 -m pip install -q oras 2>/dev/null || echo "setup: could not install oras (PyPI); its test will say SKIPPED"
