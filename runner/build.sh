#!/usr/bin/env bash
# Build the hwcompress deploy runner for one architecture.
#
#   runner/build.sh aarch64        (also: x86_64)
#
# Downloads the apache-tvm / apache-tvm-ffi wheels of that architecture into
# third_party/wheels (skipped when they are there already), extracts the TVM runtime
# libraries and the tvm/ffi headers into third_party/tvm-runtime/ARCH, and builds
#   build/runner/ARCH/hwc_runner
#   build/runner/ARCH/libtvm_runtime.so
#   build/runner/ARCH/libtvm_ffi.so
# The runner has rpath $ORIGIN: copy the three files together.
#
# Environment: PYTHON (interpreter with pip; default .venv/bin/python, then python3),
#              CXX (cross compiler; default aarch64-linux-gnu-g++ for aarch64, g++ for x86_64).
set -euo pipefail

TVM_VERSION=0.27.0.post1
TVM_FFI_VERSION=0.1.14.post0

ARCH="${1:-}"
case "$ARCH" in
  aarch64|arm64) ARCH=aarch64; DEFAULT_CXX=aarch64-linux-gnu-g++ ;;
  x86_64|amd64) ARCH=x86_64; DEFAULT_CXX=g++ ;;
  *) echo "usage: runner/build.sh aarch64|x86_64" >&2; exit 2 ;;
esac
PLATFORM="manylinux_2_28_${ARCH}"
CXX="${CXX:-$DEFAULT_CXX}"

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
WHEELS="$ROOT/third_party/wheels"
RT="$ROOT/third_party/tvm-runtime/$ARCH"
OUT="$ROOT/build/runner/$ARCH"

if [[ -z "${PYTHON:-}" ]]; then
  if [[ -x "$ROOT/.venv/bin/python" ]]; then PYTHON="$ROOT/.venv/bin/python"; else PYTHON=python3; fi
fi
command -v "$CXX" >/dev/null || { echo "runner/build.sh: compiler '$CXX' not found (apt-get install g++-aarch64-linux-gnu)" >&2; exit 1; }

find_wheel() {  # $1: distribution file prefix
  compgen -G "$WHEELS/$1-*${ARCH}*.whl" | head -n1 || true
}

mkdir -p "$WHEELS"
TVM_WHL="$(find_wheel "apache_tvm-$TVM_VERSION")"
FFI_WHL="$(find_wheel "apache_tvm_ffi-$TVM_FFI_VERSION")"
if [[ -z "$TVM_WHL" || -z "$FFI_WHL" ]]; then
  echo "runner/build.sh: downloading apache-tvm==$TVM_VERSION apache-tvm-ffi==$TVM_FFI_VERSION for $PLATFORM"
  "$PYTHON" -m pip download --quiet --platform "$PLATFORM" --only-binary=:all: --no-deps \
    "apache-tvm==$TVM_VERSION" "apache-tvm-ffi==$TVM_FFI_VERSION" -d "$WHEELS"
  TVM_WHL="$(find_wheel "apache_tvm-$TVM_VERSION")"
  FFI_WHL="$(find_wheel "apache_tvm_ffi-$TVM_FFI_VERSION")"
  [[ -n "$TVM_WHL" && -n "$FFI_WHL" ]] || { echo "runner/build.sh: wheel download failed" >&2; exit 1; }
fi

# Extract libraries and headers (only what the runner needs; redone when a wheel is newer).
STAMP="$RT/.extracted"
if [[ ! -f "$STAMP" || "$TVM_WHL" -nt "$STAMP" || "$FFI_WHL" -nt "$STAMP" ]]; then
  rm -rf "$RT"
  mkdir -p "$RT/lib" "$RT/include"
  "$PYTHON" - "$TVM_WHL" "$FFI_WHL" "$RT" <<'EOF'
import shutil, sys, zipfile
from pathlib import Path
tvm_whl, ffi_whl, rt = sys.argv[1], sys.argv[2], Path(sys.argv[3])
def copy(z, name, dest):
    dest.parent.mkdir(parents=True, exist_ok=True)
    with z.open(name) as src, open(dest, "wb") as dst:
        shutil.copyfileobj(src, dst)
with zipfile.ZipFile(tvm_whl) as z:
    copy(z, "tvm/lib/libtvm_runtime.so", rt / "lib/libtvm_runtime.so")
with zipfile.ZipFile(ffi_whl) as z:
    copy(z, "tvm_ffi/lib/libtvm_ffi.so", rt / "lib/libtvm_ffi.so")
    for name in z.namelist():
        if name.startswith("tvm_ffi/include/") and not name.endswith("/"):
            copy(z, name, rt / "include" / name[len("tvm_ffi/include/"):])
EOF
  touch "$STAMP"
fi

mkdir -p "$OUT"
TMP="$OUT/.hwc_runner.tmp"
"$CXX" -std=c++17 -O2 -Wall -Wno-unused-function \
  -I "$RT/include" "$ROOT/runner/hwc_runner.cc" -o "$TMP" \
  -L "$RT/lib" -Wl,-rpath-link,"$RT/lib" -Wl,--no-as-needed -ltvm_runtime -ltvm_ffi -Wl,--as-needed \
  -ldl -lpthread -Wl,-rpath,'$ORIGIN' -s
mv -f "$TMP" "$OUT/hwc_runner"
cp -f "$RT/lib/libtvm_runtime.so" "$RT/lib/libtvm_ffi.so" "$OUT/"
echo "runner/build.sh: built $OUT/hwc_runner ($(du -sh "$OUT" | cut -f1) with libs)"
