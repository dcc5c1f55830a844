#!/usr/bin/env bash
# GPU check for a machine with a GPU and no network, run from a checkout:
#
#   bash scripts/gpu_check.sh [OUT_DIR]          # default: $OUT, else gpu_results
#
# In order of what matters most when time is short:
# 1. installs this checkout into the python3 on PATH without touching its torch/Triton
#    (pip --no-deps --no-build-isolation --no-index -e .), then builds the C++/CUDA
#    extension for the GPU it finds (EMA_FUSED_BUILD_EXT=0 skips it; a failure is
#    logged and the run goes on without the cuda backend);
# 2. records the environment (python -m ema_fused, nvidia-smi);
# 3. runs the GPU tests (pytest -m gpu: the kernels, streams, graph capture, overlaps);
# 4. the update's fraction of the copy bandwidth per backend, bf16 params with fp32
#    shadows, aligned and unaligned (benchmarks/bench_bandwidth.py; its models in
#    $BANDWIDTH_MODELS, default llama-1.1b mix500);
# 5. unless EMA_SANITIZE=0: the kernel GPU tests under compute-sanitizer memcheck (out
#    of bounds, misaligned accesses) and initcheck (reads of unwritten memory, e.g. a
#    table read before its copy landed), each capped at $SANITIZE_TIMEOUT seconds;
# 6. the host cost of ema.update() for 500 tensors (benchmarks/bench_host.py), then the
#    whole tests folder; with EMA_SUITE=1 also the full benchmark suite
#    (benchmarks/run.py, extra arguments in $BENCH_ARGS);
# and prints a status table and the bandwidth table last.  Everything lands in OUT_DIR:
# setup.log, tests.log, sanitizer.log, bench.log, summary.txt,
# bandwidth_<gpu>_<date>.{json,md}, host_<gpu>_<date>.json and, with EMA_SUITE=1, the
# suite's bench_<gpu>_<date>.{json,md,png}.  EMA_SKIP_TESTS=1 / EMA_SKIP_BENCH=1 leave
# a part out.  Exit status: non-zero if any step failed.
set -uo pipefail
cd "$(dirname "$0")/.."
PY="${PYTHON:-python3}"
OUT_DIR="${1:-${OUT:-gpu_results}}"
mkdir -p "$OUT_DIR"
SUMMARY="$OUT_DIR/summary.txt"
: > "$SUMMARY"
failed=0

# step NAME LOG COMMAND...: run COMMAND, show its output and append it to LOG, record the status.
step() {
    local name="$1" log="$2"
    shift 2
    local t0=$SECONDS
    echo "== $name: $*" | tee -a "$log"
    "$@" 2>&1 | tee -a "$log"
    local rc=${PIPESTATUS[0]}
    [ $rc -eq 0 ] || failed=1
    printf '%-28s exit %-3s %5ss  %s\n' "$name" "$rc" "$((SECONDS - t0))" "$log" >> "$SUMMARY"
    return $rc
}

export PIP_DISABLE_PIP_VERSION_CHECK=1 PYTHONUNBUFFERED=1
PIP=("$PY" -m pip install --no-deps --no-build-isolation --no-index -e .)
step install "$OUT_DIR/setup.log" "${PIP[@]}"
if [ "${EMA_FUSED_BUILD_EXT:-1}" != "0" ]; then
    if [ -z "${TORCH_CUDA_ARCH_LIST:-}" ] && command -v nvidia-smi > /dev/null; then
        # only the arch of the GPU present: the shortest build
        TORCH_CUDA_ARCH_LIST=$(nvidia-smi --query-gpu=compute_cap --format=csv,noheader | head -n 1)
        export TORCH_CUDA_ARCH_LIST
    fi
    if [ -z "${CUDA_HOME:-}" ] && [ -d /usr/local/cuda ]; then
        export CUDA_HOME=/usr/local/cuda
    fi
    step "build extension" "$OUT_DIR/setup.log" env EMA_FUSED_BUILD_EXT=1 \
        MAX_JOBS="${MAX_JOBS:-8}" NVCC_THREADS="${NVCC_THREADS:-2}" "${PIP[@]}"
fi
step "environment" "$OUT_DIR/setup.log" "$PY" -m ema_fused
if command -v nvidia-smi > /dev/null; then
    step "nvidia-smi" "$OUT_DIR/setup.log" nvidia-smi
fi

KERNEL_TESTS=(tests/kernels/test_kernels_gpu.py tests/kernels/test_kernel_edges.py)
if [ "${EMA_SKIP_TESTS:-0}" = "0" ]; then
    step "tests -m gpu" "$OUT_DIR/tests.log" "$PY" -m pytest -q -ra -p no:cacheprovider tests -m gpu
fi
if [ "${EMA_SKIP_BENCH:-0}" = "0" ]; then
    # shellcheck disable=SC2086  # a list of words on purpose
    step "bandwidth" "$OUT_DIR/bench.log" "$PY" benchmarks/bench_bandwidth.py --out "$OUT_DIR" \
        --models ${BANDWIDTH_MODELS:-llama-1.1b mix500}
fi
if [ "${EMA_SKIP_TESTS:-0}" = "0" ] && [ "${EMA_SANITIZE:-1}" != "0" ]; then
    if command -v compute-sanitizer > /dev/null; then
        for tool in memcheck initcheck; do
            step "compute-sanitizer $tool" "$OUT_DIR/sanitizer.log" \
                timeout "${SANITIZE_TIMEOUT:-300}" compute-sanitizer --tool "$tool" \
                --error-exitcode 1 "$PY" -m pytest -q -x -p no:cacheprovider \
                "${KERNEL_TESTS[@]}" -m gpu
        done
    else
        echo "compute-sanitizer not on PATH: skipped" >> "$SUMMARY"
        failed=1
    fi
fi
if [ "${EMA_SKIP_BENCH:-0}" = "0" ]; then
    step "host cost" "$OUT_DIR/bench.log" "$PY" benchmarks/bench_host.py --out "$OUT_DIR"
fi
if [ "${EMA_SKIP_TESTS:-0}" = "0" ]; then
    step "tests (all)" "$OUT_DIR/tests.log" "$PY" -m pytest -q -ra -p no:cacheprovider tests
fi
if [ "${EMA_SUITE:-0}" != "0" ]; then
    # shellcheck disable=SC2086  # BENCH_ARGS is a list of words on purpose
    step "benchmark suite" "$OUT_DIR/bench.log" "$PY" benchmarks/run.py --out "$OUT_DIR" \
        ${BENCH_ARGS:-}
fi

echo
echo "== gpu_check summary ($OUT_DIR)"
cat "$SUMMARY"
grep -h -E " in [0-9.]+s( \([0-9:]+\))?( =+)?$" "$OUT_DIR/tests.log" 2>/dev/null
table=$(ls -t "$OUT_DIR"/bandwidth_*.md 2>/dev/null | head -n 1)
if [ -n "$table" ]; then
    echo
    cat "$table"
fi
exit $failed
