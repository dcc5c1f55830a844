#!/usr/bin/env bash
# Make (or reuse) the project's virtual environment in .venv and install everything:
# torch 2.14.1 (the CUDA 13.0 build, which the extension build needs), the package in
# editable mode with its C++/CUDA extension, and its test and benchmark extras (peer
# EMA packages too).
# Safe to run again: it only installs what is missing.
set -euo pipefail
cd "$(dirname "$0")/.."
PY="${PYTHON:-python3}"
if [ ! -x .venv/bin/python ]; then
    "$PY" -m venv .venv
fi
export PIP_DISABLE_PIP_VERSION_CHECK=1
.venv/bin/python -m pip install -q "torch==2.14.1" "setuptools>=64" wheel
# The C++/CUDA extension (ema_fused._C) is built ahead of time against that torch: the
# CPU kernels always, the CUDA kernels wherever a CUDA toolkit is found (this proves on
# every CI run that the CUDA code compiles, GPU or not).  Two arches only, to keep the
# build short (about 40 s on 2 cores); set TORCH_CUDA_ARCH_LIST for others.
export EMA_FUSED_BUILD_EXT=1 MAX_JOBS="${MAX_JOBS:-2}"
export TORCH_CUDA_ARCH_LIST="${TORCH_CUDA_ARCH_LIST:-8.0;9.0}"
if [ -z "${CUDA_HOME:-}" ] && [ -d /usr/local/cuda ]; then
    export CUDA_HOME=/usr/local/cuda  # torch would guess /usr/local from nvcc's wrapper
fi
# --no-build-isolation: build with the torch installed above, never a second one.
.venv/bin/python -m pip install -q --no-build-isolation -e ".[test,bench]"
.venv/bin/python -c "import torch, ema_fused; print('ready: torch', torch.__version__, '| ema_fused', ema_fused.__version__)"
.venv/bin/python -m ema_fused | grep '^extension'
