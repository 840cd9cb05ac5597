#!/usr/bin/env bash
# Compile-checks the CUDA sources without a GPU: every csrc/cuda/*.cu with nvcc for sm_80 and
# sm_90a (they include no torch headers), and a syntax check of every *_bind.cpp against the
# installed torch's headers (CPU wheels ship the c10/cuda headers the glue uses).
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-.venv/bin/python}
NVCC=${NVCC:-nvcc}
command -v "$NVCC" >/dev/null || { echo "check_cuda: $NVCC not found" >&2; exit 1; }
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
n=0
for f in csrc/cuda/*.cu; do
  for arch in sm_80 sm_90a; do
    "$NVCC" -std=c++17 -O3 -arch="$arch" -Icsrc -c "$f" -o "$tmp/$(basename "$f").$arch.o"
    echo "nvcc $arch: $f ok"
    n=$((n + 1))
  done
done
torch_inc=$("$PY" -c "import os, torch; print(os.path.join(os.path.dirname(torch.__file__), 'include'))")
py_inc=$("$PY" -c "import sysconfig; print(sysconfig.get_paths()['include'])")
cuda_inc=$(dirname "$(dirname "$(command -v "$NVCC")")")/include
[ -f "$cuda_inc/cuda_runtime_api.h" ] || cuda_inc=/usr/local/cuda/include
for f in csrc/cuda/*_bind.cpp; do
  g++ -std=c++20 -fsyntax-only -DC10_CUDA_NO_CMAKE_CONFIGURE_FILE -Icsrc -I"$torch_inc" \
    -I"$torch_inc/torch/csrc/api/include" -I"$py_inc" -I"$cuda_inc" "$f"
  echo "g++ syntax: $f ok"
  n=$((n + 1))
done
echo "check_cuda: $n CUDA compile checks passed"
