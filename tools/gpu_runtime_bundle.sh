#!/usr/bin/env bash
# Bundle TVM's runtime, with CUDA, for a GPU machine that has Python and a driver but no TVM
# (tools/bench_gpu.py run). The apache-tvm wheel's runtime has no CUDA device API; this compiles
# TVM's own CUDA runtime sources (cuda_device_api.cc, cuda_module.cc) against the wheel's
# headers into libtvm_cuda_ext.so, next to a copy of the wheel's Python package without the
# compiler library (260 MB), and downloads the apache-tvm-ffi wheel for the GPU machine's Python.
#
#   tools/gpu_runtime_bundle.sh TVM_SRC [OUT=.dev] [PYTHON_VERSION=3.12]
#
# TVM_SRC: an apache/tvm checkout (the CUDA runtime files are under src/backend/cuda/runtime;
# the include/tvm/support headers come from it too). Needs g++ and the CUDA toolkit headers
# and static cudart (/usr/local/cuda). The bundle is ~22 MB: carry OUT to the GPU machine and
#   pip install --target /tmp/site OUT/whl/*.whl; PYTHONPATH=/tmp/site:OUT/site python3 tools/bench_gpu.py run ...
set -euo pipefail
src=${1:?usage: gpu_runtime_bundle.sh TVM_SRC [OUT] [PYTHON_VERSION]}
out=${2:-.dev}
pyver=${3:-3.12}
here=$(cd "$(dirname "$0")/.." && pwd)
sp=$("$here/.venv/bin/python" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')
cuda=${CUDA_HOME:-/usr/local/cuda}

work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
mkdir -p "$work/src/backend/cuda/runtime" "$work/src/runtime" "$work/include/tvm"
cp "$src"/src/backend/cuda/runtime/cuda_device_api.cc "$src"/src/backend/cuda/runtime/cuda_module.cc "$work/src/backend/cuda/runtime/"
mkdir -p "$work/src/support" && cp "$src/src/support/bytes_io.h" "$work/src/support/"
cp -r "$src/include/tvm/support" "$work/include/tvm/"
cp "$sp"/tvm/src/runtime/*.h "$work/src/runtime/"   # the wheel's own private runtime headers

rm -rf "$out/site" "$out/whl" && mkdir -p "$out/site" "$out/whl"
cp -r "$sp/tvm" "$out/site/"
rm -rf "$out/site/tvm/lib/libtvm_compiler.so" "$out/site/tvm/3rdparty" "$out/site/tvm/src" "$out/site/tvm/include"
find "$out/site" -name __pycache__ -prune -exec rm -rf {} +

# libcuda is not linked (no driver here): bench_gpu.py loads it RTLD_GLOBAL first
g++ -std=c++17 -O2 -fPIC -shared -o "$out/site/tvm/lib/libtvm_cuda_ext.so" \
  "$work"/src/backend/cuda/runtime/cuda_device_api.cc "$work"/src/backend/cuda/runtime/cuda_module.cc \
  -I"$sp/tvm/include" -I"$work/include" -I"$sp/tvm_ffi/include" -I"$cuda/include" \
  -L"$sp/tvm/lib" -L"$sp/tvm_ffi/lib" -ltvm_runtime -ltvm_ffi -L"$cuda/lib64" -lcudart_static -ldl -lrt -lpthread

ffi=$("$here/.venv/bin/python" -c 'import importlib.metadata as m; print(m.version("apache-tvm-ffi"))')
"$here/.venv/bin/python" -m pip download -q --no-deps --only-binary=:all: --python-version "$pyver" --implementation cp \
  --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
  -d "$out/whl" "apache-tvm-ffi==$ffi"
du -sh "$out/site" "$out/whl"
