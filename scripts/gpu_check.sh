#!/usr/bin/env bash
# GPU check for a lent GPU machine (no network), run from a checkout, inside one 10-minute
# call: it must end within $EMA_GPU_CHECK_DEADLINE seconds (default 540: 9 minutes, the
# install and the extension build included).
#
#   bash scripts/gpu_check.sh [OUT_DIR]             # default: $OUT, else gpu_results
#   bash scripts/gpu_check.sh --dry-run [OUT_DIR]   # no GPU: check the plan (also EMA_GPU_CHECK_DRY_RUN=1)
#
# Every step runs under `timeout` with the cap below; before a step, the time left before
# the deadline is checked: a step that would start past it is SKIPPED (deadline), and one
# that would end past it gets only the time left.  After every step the summary table
# (OUT_DIR/summary.md: step, status, seconds, cap, log, the pytest tally) is written again,
# so it is there whatever happens; statuses are pass, FAILED (exit N), TIMED OUT,
# SKIPPED (deadline) and SKIPPED (why).  Exit status: 0 only if every step passed.
# The full test suite is CI's (2 cores, no GPU); here: what only a GPU can show.
#
# Budget, in seconds (caps add up to 540 = the deadline; nothing here was measured on a
# GPU yet: these are estimates, written down so that the first GPU run can correct them):
#   preflight             10  tools: nvcc, ninja, compute-sanitizer (PATH or $CUDA_HOME/bin),
#                             python modules pytest, numpy, torch, triton, a GPU torch sees;
#                             says what is missing (the summary lists it too)
#   install               30  pip -e without the extension: 4.5 s on the 2-core CI machine
#   build extension      150  the same pip with EMA_FUSED_BUILD_EXT=1 for the GPU's arch
#                             only.  Measured on the 2-core CI machine (one arch, 2 jobs, a
#                             load of ~5 from other work): 7 translation units, 441 s wall,
#                             268 s of CPU; shared by their wall times, the largest takes
#                             ~55 s of CPU (cpu_multi_shadow.cpp), the two .cu files ~40-45 s.
#                             On 16 cores (MAX_JOBS = cores) they compile side by side:
#                             estimate 60-90 s wall with pip and the link; 150 leaves room
#   extension check       15  the build must have CUDA kernels (a CPU-only build FAILS here,
#                             with its reason); `python -m ema_fused` report
#   nvidia-smi             5
#   GPU tests, newest kernels first (pytest -m gpu; each start ~7 s on the CI machine: torch,
#   the test modules; the first steps also compile the Triton kernels, then cached on disk):
#     multi-update        50  30 tests, K = 1..9 profiles (4 kernels to compile), <= 4M elements
#     weighted sum        25  18 tests, <= 4M elements
#     skip_nonfinite      25  18 tests, <= 278K elements
#     large tensor        25  4 tests, one 2^31 + 4099-element bf16 tensor (8-12 GiB)
#     graph tables        20  5 tests: tables of captured graphs pinned, no probe in a capture
#     the rest            55  ~180 tests: kernels first (65 at real sizes, <= 16M elements;
#                             93 edge cases of 4K elements), then EMA (18), FSDP (2 processes),
#                             sharded PostHocEMA on a 1-rank NCCL mesh,
#                             Lightning, transformers, the benchmark suite (one each, the
#                             slowest); those may not fit: then TIMED OUT, the log says where
#   bandwidth             40  benchmarks/bench_bandwidth.py: llama-1.1b and mix500, aligned and
#                             unaligned, 20 rounds of ~5 ms per backend
#   memcheck              50  compute-sanitizer memcheck (no caching allocator, so that an
#                             access past a tensor hits unowned memory) on 14 tests: every
#                             kernel kind on both backends (update, copy, swap, graph-safe
#                             update, weighted sum, multi-update, skip_nonfinite, a head)
#   initcheck             20  compute-sanitizer initcheck on the two stream tests (a table
#                             read before its copy landed)
#   host cost             20  benchmarks/bench_host.py: 500 tensors, every backend
# Options: $PYTHON (default python3), $MAX_JOBS (default: every core), $TORCH_CUDA_ARCH_LIST
# (default: the GPU's), EMA_FUSED_BUILD_EXT=0 (skip the build), $BANDWIDTH_MODELS.
set -uo pipefail
cd "$(dirname "$0")/.."

DRY_RUN="${EMA_GPU_CHECK_DRY_RUN:-0}"
OUT_DIR=""
for arg in "$@"; do
    case "$arg" in
        --dry-run) DRY_RUN=1 ;;
        -h|--help) sed -n '2,/^set -uo/p' "$0" | sed -e '$d' -e 's/^# \{0,1\}//'; exit 0 ;;
        -*) echo "gpu_check: unknown option $arg (see --help)" >&2; exit 2 ;;
        *) OUT_DIR="$arg" ;;
    esac
done
OUT_DIR="${OUT_DIR:-${OUT:-gpu_results}}"
mkdir -p "$OUT_DIR/logs"
PY="${PYTHON:-python3}"
DEADLINE="${EMA_GPU_CHECK_DEADLINE:-540}"
BUDGET=540
export PIP_DISABLE_PIP_VERSION_CHECK=1 PYTHONUNBUFFERED=1
if [ -z "${CUDA_HOME:-}" ] && [ -d /usr/local/cuda ]; then
    export CUDA_HOME=/usr/local/cuda
fi

PYTEST=(-m pytest -p no:cacheprovider -rfEs)
# the GPU tests of the newest kernels, one step each, in this order
MULTI=(tests/kernels/test_multi_update_gpu.py)
WSUM=(tests/ops/test_weighted_sum.py)
SKIPNF=(tests/ops/test_skip_nonfinite.py)
LARGE=(tests/kernels/test_large_tensor_gpu.py)
GRAPHS=(tests/kernels/test_graph_tables.py)
STOCHASTIC=(tests/ops/test_stochastic_gpu.py)
# then every other file with GPU-marked tests, most important first (the dry run checks
# that no such file is left out)
REST=(tests/kernels/test_kernels_gpu.py tests/kernels/test_kernel_edges.py tests/ema/test_gpu.py
      tests/ema/test_offload_gpu.py tests/ema/test_placement.py
      tests/distributed/test_distributed_fsdp.py tests/posthoc/test_posthoc_sharded.py
      tests/integrations/test_lightning.py
      tests/integrations/test_transformers.py tests/bench/test_bench_suite.py)
# memcheck: every kernel kind on both backends, the smallest tests that reach it, no
# profiler (CUPTI and the sanitizer do not mix), newest kernels first
MEMCHECK=()
for b in triton cuda; do
    MEMCHECK+=("tests/ops/test_stochastic_gpu.py::test_many_tensors_and_misaligned_views[$b]"
               "tests/kernels/test_multi_update_gpu.py::test_profile_counts_with_mixed_shadow_dtypes[$b-2]"
               "tests/ops/test_weighted_sum.py::test_gpu_backends_against_float64[float32-bfloat16-$b]"
               "tests/ops/test_skip_nonfinite.py::test_gpu_every_pair[float32-bfloat16-$b]"
               "tests/kernels/test_kernels_gpu.py::test_unaligned_views_against_float64[$b-1-0]"
               "tests/kernels/test_kernels_gpu.py::test_update_real_sizes_against_float64[$b-sd1-pd1]"
               "tests/kernels/test_kernels_gpu.py::test_copy_and_swap_real_sizes[$b-dd3-sd3]"
               "tests/kernels/test_kernels_gpu.py::test_device_weight_update_against_float64[$b-plain]")
done
INITCHECK=("tests/kernels/test_kernels_gpu.py::test_first_use_on_another_stream_waits_for_the_table_copy")

# ------------------------------------------------------------------ capped steps, summary
# shellcheck source=scripts/gpu_check_steps.sh
source scripts/gpu_check_steps.sh

# ------------------------------------------------------------------ the plan
# Each line: name|cap|kind|arguments.  kind: cmd (a shell function below), pytest (a test
# selection), sanitize-TOOL (a selection under compute-sanitizer), bench (a script and its
# options).  The dry run reads the same lines.
PLAN=(
    "preflight|5|cmd|preflight"
    "install|30|cmd|install"
    "build extension|150|cmd|build_extension"
    "extension check|15|cmd|extension_check"
    "nvidia-smi|5|cmd|nvidia-smi"
    "tests: stochastic rounding|25|pytest|${STOCHASTIC[*]}"
    "tests: multi-update|50|pytest|${MULTI[*]}"
    "tests: weighted sum|20|pytest|${WSUM[*]}"
    "tests: skip_nonfinite|20|pytest|${SKIPNF[*]}"
    "tests: large tensor|25|pytest|${LARGE[*]}"
    "tests: graph tables|15|pytest|${GRAPHS[*]}"
    "tests: the rest|50|pytest|${REST[*]}"
    "bandwidth|40|bench|benchmarks/bench_bandwidth.py --out $OUT_DIR --models ${BANDWIDTH_MODELS:-llama-1.1b mix500}"
    "stochastic bench|15|bench|benchmarks/bench_stochastic.py --device cuda --models llama-200m mix500 --repeats 5 --out $OUT_DIR"
    "memcheck|45|sanitize-memcheck|${MEMCHECK[*]}"
    "initcheck|15|sanitize-initcheck|${INITCHECK[*]}"
    "host cost|15|bench|benchmarks/bench_host.py --out $OUT_DIR"
)

find_tool() {  # on PATH, else under $CUDA_HOME/bin
    if command -v "$1" > /dev/null 2>&1; then
        command -v "$1"
    elif [ -n "${CUDA_HOME:-}" ] && [ -x "$CUDA_HOME/bin/$1" ]; then
        echo "$CUDA_HOME/bin/$1"
    fi
}
NVCC=$(find_tool nvcc)
SANITIZER=$(find_tool compute-sanitizer)

# The steps that are shell functions run as `bash -c NAME` under `timeout`: exported.
preflight() {
    local missing=()
    [ -n "$NVCC" ] || missing+=("nvcc (the extension would build without CUDA kernels)")
    command -v ninja > /dev/null 2>&1 || "$PY" -c "import ninja" 2> /dev/null \
        || missing+=("ninja (the extension build needs it)")
    [ -n "$SANITIZER" ] || missing+=("compute-sanitizer (memcheck and initcheck are skipped)")
    command -v nvidia-smi > /dev/null 2>&1 || missing+=("nvidia-smi")
    # one python start for the modules, the versions and the GPU (without a GPU torch can
    # use, every GPU test would be skipped and its step would pass)
    local python_ok=1
    "$PY" - <<'EOF' || python_ok=0
import importlib, sys
bad = []
for name in ("pytest", "numpy", "torch", "triton"):
    try:
        module = importlib.import_module(name)
        print(name, getattr(module, "__version__", "?"))
    except Exception as exc:
        bad.append(f"python module {name} ({type(exc).__name__}: {exc})")
if "torch" in sys.modules:
    import torch
    print("torch cuda", torch.version.cuda, "| device:",
          torch.cuda.get_device_name() if torch.cuda.is_available() else "none")
    if not torch.cuda.is_available():
        bad.append("a CUDA device torch can use (the GPU tests would all be skipped)")
for line in bad:
    print("MISSING:", line)
sys.exit(1 if bad else 0)
EOF
    echo "python: $(command -v "$PY"); CUDA_HOME=${CUDA_HOME:-unset}; nvcc: ${NVCC:-none}; compute-sanitizer: ${SANITIZER:-none}"
    if [ ${#missing[@]} -gt 0 ] || [ "$python_ok" = 0 ]; then
        [ ${#missing[@]} -eq 0 ] || printf 'MISSING: %s\n' "${missing[@]}"
        return 1
    fi
    echo "every tool found"
}

install() {
    "$PY" -m pip install --no-deps --no-build-isolation --no-index -e .
}

build_extension() {
    if [ -z "${TORCH_CUDA_ARCH_LIST:-}" ] && command -v nvidia-smi > /dev/null 2>&1; then
        # the arch of the GPU present only: the shortest build
        TORCH_CUDA_ARCH_LIST=$(nvidia-smi --query-gpu=compute_cap --format=csv,noheader | head -n 1)
        export TORCH_CUDA_ARCH_LIST
    fi
    env EMA_FUSED_BUILD_EXT=1 MAX_JOBS="${MAX_JOBS:-$(nproc)}" NVCC_THREADS="${NVCC_THREADS:-2}" \
        "$PY" -m pip install --no-deps --no-build-isolation --no-index -e .
}

extension_check() {
    "$PY" -m ema_fused
    "$PY" - <<'EOF'
import sys
from ema_fused.backends import extension
if not extension.load(build=False):
    sys.exit(f"FAILED: the extension does not load: {extension.error()}")
if not extension.has_kernels("CUDA"):
    sys.exit(f"FAILED: the extension ({extension.loaded()}) has no CUDA kernels: it was built "
             "without a CUDA toolkit or for another torch; see the build's log")
print(f"extension with CUDA kernels: {extension.loaded()}")
EOF
}
export PY NVCC SANITIZER
export -f preflight install build_extension extension_check

run_planned() {  # NAME CAP KIND ARGS
    local name="$1" cap="$2" kind="$3" args="$4"
    local -a words
    read -r -a words <<< "$args"
    case "$kind" in
        cmd)
            step "$name" "$cap" bash -c "${words[*]}" ;;
        pytest)
            step "$name" "$cap" "$PY" "${PYTEST[@]}" -q -m gpu "${words[@]}" ;;
        sanitize-*)
            local tool=${kind#sanitize-}
            if [ -z "$SANITIZER" ]; then
                skip "$name" "$cap" "no compute-sanitizer"
            else
                # memcheck without torch's caching allocator: an access past a tensor then
                # lands outside any allocation.  API errors are left to the tests (torch
                # raises them): torch and Triton probe the driver with calls that fail.
                local env_vars=()
                [ "$tool" = memcheck ] && env_vars=(PYTORCH_NO_CUDA_MEMORY_CACHING=1)
                step "$name" "$cap" env "${env_vars[@]}" "$SANITIZER" \
                    --tool "$tool" --error-exitcode 1 --report-api-errors no \
                    "$PY" "${PYTEST[@]}" -v -m gpu "${words[@]}"
            fi ;;
        bench)
            step "$name" "$cap" "$PY" "${words[@]}" ;;
    esac
}

# ------------------------------------------------------------------ the dry run
# scripts/gpu_check_plan.py prints the plan with each step's cap and the deadline, and
# checks it without a GPU (caps within the budget, every test file and node id there and
# every selection collecting, every GPU-marked test file in a step, every benchmark option
# known); it exits non-zero on any problem.
if [ "$DRY_RUN" = 1 ]; then
    printf '%s\n' "${PLAN[@]}" | "$PY" scripts/gpu_check_plan.py --budget "$BUDGET" \
        --deadline "$DEADLINE" --log "$OUT_DIR/dry_run_collect.log"
    exit $?
fi

# ------------------------------------------------------------------ the run
trap 'write_summary' EXIT
trap 'failed=1; write_summary; exit 130' INT TERM
for line in "${PLAN[@]}"; do
    IFS='|' read -r name cap kind args <<< "$line"
    if [ "$name" = "build extension" ] && [ "${EMA_FUSED_BUILD_EXT:-1}" = 0 ]; then
        skip "$name" "$cap" "EMA_FUSED_BUILD_EXT=0"
        continue
    fi
    run_planned "$name" "$cap" "$kind" "$args"
done

echo
cat "$SUMMARY"
table=$(ls -t "$OUT_DIR"/bandwidth_*.md 2> /dev/null | head -n 1)
if [ -n "$table" ]; then
    echo
    cat "$table"
fi
exit $failed
