#!/usr/bin/env bash
# Installs what building moekit needs when it is missing (Debian/Ubuntu: meson, ninja, pkg-config,
# Catch2) and puts nvcc on PATH. Safe to run again; installs nothing that is already there.
# Source it (". scripts/setup.sh") or run it.
set -euo pipefail

if ! command -v nvcc >/dev/null 2>&1 && [ -x /usr/local/cuda/bin/nvcc ]; then
  export PATH=/usr/local/cuda/bin:$PATH
fi
if ! command -v nvcc >/dev/null 2>&1; then
  echo "setup: nvcc not found: install the CUDA toolkit (13.x) or put its bin/ on PATH" >&2
  exit 1
fi

missing=()
command -v meson >/dev/null 2>&1 || missing+=(meson)
command -v ninja >/dev/null 2>&1 || missing+=(ninja-build)
command -v pkg-config >/dev/null 2>&1 || missing+=(pkg-config)
if ! pkg-config --exists catch2 2>/dev/null; then missing+=(catch2); fi
# The Python bindings' CPU tests (header sync, error paths) run under pytest when it is there.
if command -v apt-get >/dev/null 2>&1 && ! python3 -c "import pytest" >/dev/null 2>&1; then
  missing+=(python3-pytest)
fi

if [ ${#missing[@]} -gt 0 ]; then
  echo "setup: installing ${missing[*]}"
  sudo=""
  if [ "$(id -u)" -ne 0 ]; then sudo=sudo; fi
  export DEBIAN_FRONTEND=noninteractive
  $sudo apt-get update -qq
  $sudo apt-get install -y -qq "${missing[@]}" >/dev/null
fi

meson_version=$(meson --version)
case "$meson_version" in
  0.*) echo "setup: meson $meson_version is too old (need >= 1.0; try: pip install meson)" >&2; exit 1 ;;
esac
