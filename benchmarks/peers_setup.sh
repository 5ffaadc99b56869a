#!/usr/bin/env bash
# The peer benchmark's own environment: llama-cpp-python built from source (about 10 minutes on
# 2 cores), kept out of the project's dependencies. AMX is off: llama.cpp's AMX kernels crash on
# some server CPUs that report it.
set -euo pipefail
cd "$(dirname "$0")"
if [ ! -x .venv-peers/bin/python ]; then
  "${PYTHON:-python3}" -m venv .venv-peers
fi
export PIP_DISABLE_PIP_VERSION_CHECK=1
CMAKE_ARGS="-DGGML_NATIVE=OFF -DGGML_AMX_TILE=OFF -DGGML_AMX_INT8=OFF -DGGML_AMX_BF16=OFF -DGGML_AVX2=ON -DGGML_AVX512=ON -DGGML_FMA=ON -DGGML_F16C=ON" \
  .venv-peers/bin/pip install -q "llama-cpp-python>=0.3"
