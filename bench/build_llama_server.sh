#!/usr/bin/env bash
# Build llama.cpp's `llama-server` for bench/server.py from the llama.cpp sources inside the llama-cpp-python sdist
# (PyPI is reachable here, GitHub is not). No native/AMX code: llama.cpp's AMX kernels SIGILL on VMs that report AMX
# without enabling it; AVX-512 stays on, chosen at run time.
#   bench/build_llama_server.sh [OUTPUT]        (default build/llama-server; ~20 min on 2 cores)
set -euo pipefail
cd "$(dirname "$0")/.."
out=${1:-build/llama-server}
work=$(mktemp -d)
.venv/bin/pip download -q --no-deps --no-binary :all: llama-cpp-python -d "$work"
tar -xzf "$work"/llama_cpp_python-*.tar.gz -C "$work"
src=$(ls -d "$work"/llama_cpp_python-*/vendor/llama.cpp)
cmake -S "$src" -B "$work/build" -DCMAKE_BUILD_TYPE=Release -DGGML_NATIVE=OFF -DGGML_AVX512=ON \
  -DGGML_AMX_TILE=OFF -DGGML_AMX_INT8=OFF -DGGML_AMX_BF16=OFF -DLLAMA_CURL=OFF -DLLAMA_BUILD_SERVER=ON \
  -DBUILD_SHARED_LIBS=OFF > "$work/cmake.log"
cmake --build "$work/build" --target llama-server -j "$(nproc)" > "$work/build.log"
mkdir -p "$(dirname "$out")"
cp "$work/build/bin/llama-server" "$out"
echo "$out"
