#!/usr/bin/env bash
# Set up the environment (scripts/setup_env.sh) and run the whole test suite.
# Extra arguments go to pytest.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup_env.sh
exec .venv/bin/python -m pytest -q -ra "$@"
