#!/usr/bin/env bash
# Set up hwcompress on a fresh Debian machine: system toolchains, a virtual environment with
# the pinned TVM, the package itself, and the aarch64 deploy runner. Idempotent.
#   ./setup.sh            set up everything
#   ./setup.sh --no-apt   skip the Debian packages (already installed)
set -euo pipefail
cd "$(dirname "$0")"

if [[ "${1:-}" != "--no-apt" ]]; then
    # cross toolchain + emulator for ARM targets, the ONNX node test suite, real data
    pkgs=(gcc-aarch64-linux-gnu g++-aarch64-linux-gnu qemu-user libonnx-testdata dataset-fashion-mnist)
    missing=()
    for p in "${pkgs[@]}"; do dpkg -s "$p" >/dev/null 2>&1 || missing+=("$p"); done
    if (( ${#missing[@]} )); then
        SUDO=""; [[ $(id -u) -ne 0 ]] && SUDO="sudo"
        $SUDO apt-get update -qq
        DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq "${missing[@]}" >/dev/null
    fi
fi

PY=${PYTHON:-python3}
[[ -x .venv/bin/python ]] || "$PY" -m venv .venv
.venv/bin/pip install -q --upgrade pip
.venv/bin/pip install -q -e ".[test]"

# the deploy runner for aarch64 artifacts (needs the cross compiler; downloads the aarch64
# TVM runtime wheels from PyPI once)
if command -v aarch64-linux-gnu-g++ >/dev/null 2>&1 && [[ -x runner/build.sh ]]; then
    PYTHON=.venv/bin/python runner/build.sh aarch64
fi
# real exported models from PyPI packages, for tests and benchmarks
.venv/bin/python tools/fetch_models.py >/dev/null
echo "setup done: activate with 'source .venv/bin/activate'"
