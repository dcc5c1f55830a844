#!/usr/bin/env bash
# Make (or reuse) the project's virtual environment in .venv and install everything:
# torch 2.14.1 (the CUDA 13.0 build, which the extension build will need), the
# package in editable mode, and its test and benchmark extras (peer EMA packages too).
# Safe to run again: it only installs what is missing.
set -euo pipefail
cd "$(dirname "$0")/.."
PY="${PYTHON:-python3}"
if [ ! -x .venv/bin/python ]; then
    "$PY" -m venv .venv
fi
export PIP_DISABLE_PIP_VERSION_CHECK=1
.venv/bin/python -m pip install -q "torch==2.14.1" "setuptools>=64" wheel
# --no-build-isolation: build with the torch installed above, never a second one.
.venv/bin/python -m pip install -q --no-build-isolation -e ".[test,bench]"
.venv/bin/python -c "import torch, ema_fused; print('ready: torch', torch.__version__, '| ema_fused', ema_fused.__version__)"
