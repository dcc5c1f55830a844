#!/usr/bin/env bash
# The main job: set up the environment (scripts/setup_env.sh), run the built-in demo (a
# small model trained on generated data, raw vs EMA held-out loss; seconds), then the
# benchmark suite, benchmarks/run.py, on whatever device is present.  Extra arguments go
# to run.py (e.g. --models llama-1.1b --dtypes bf16).
#
# On a GPU it runs the full suite (125M, 1.1B, 7B where memory allows, the 505-tensor
# model; bf16/fp16/fp32; minutes on an H100).  Without a GPU it runs --quick (the 125M
# and 505-tensor models; about 2 minutes on a 2-core CPU), because the full suite's 1.1B
# and 7B models would take far longer on a CPU; EMA_BENCH_FULL=1 runs the full suite
# anyway.  Results (JSON, Markdown table, PNG plot) go to benchmarks/out/ (git-ignored)
# unless --out is given; the table is also printed at the end.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup_env.sh
.venv/bin/python -m ema_fused.demo
mode=()
if [ "${EMA_BENCH_FULL:-0}" = "0" ] && \
   ! .venv/bin/python -c "import sys, torch; sys.exit(0 if torch.cuda.is_available() else 1)"; then
    echo "no GPU: running the quick benchmark (EMA_BENCH_FULL=1 for the full suite)"
    mode=(--quick)
fi
exec .venv/bin/python benchmarks/run.py "${mode[@]}" --out benchmarks/out "$@"
