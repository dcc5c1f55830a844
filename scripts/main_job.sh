#!/usr/bin/env bash
# Set up the environment (scripts/setup_env.sh) and run the main job on whatever
# device is present.  Until the benchmark suite exists this is the built-in demo:
# a small model trained on generated data, printing the loss of the raw and the
# EMA weights as it goes, then the fallback benchmark against the peers.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup_env.sh
.venv/bin/python -m ema_fused.demo "$@"
.venv/bin/python benchmarks/bench_fallback.py --quick
