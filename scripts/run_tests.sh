#!/usr/bin/env bash
# Set up the environment (scripts/setup_env.sh) and run the whole test suite.
# Extra arguments go to pytest.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup_env.sh
if [ -z "${CUDA_HOME:-}" ] && [ -f /usr/local/cuda/include/cuda_runtime.h ]; then
    export CUDA_HOME=/usr/local/cuda  # as setup_env.sh built with it (the JIT-build tests need it)
fi
exec .venv/bin/python -m pytest -q -ra "$@"
