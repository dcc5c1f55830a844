"""The suite's cases through pytest-benchmark, for people who track them with its tooling.

    pytest benchmarks/ --benchmark-only                          # quick sizes
    EMA_BENCH_SIZE=full pytest benchmarks/ --benchmark-only --benchmark-json=out.json

Environment: ``EMA_BENCH_SIZE`` = ``tiny`` | ``quick`` (default) | ``full`` picks the
models (``models.TINY`` / ``QUICK`` / ``FULL``); ``EMA_BENCH_DTYPES`` (default
``bf16,fp16,fp32``); ``EMA_BENCH_DEVICE`` (default cuda when available);
``EMA_BENCH_ROUNDS`` (default 20 on a GPU, 11 on the CPU).  One test per
(model, dtype, provider), grouped by model and dtype; a provider that cannot run
here, or would not fit in memory, is skipped with the reason.  On a GPU each round
is the update plus a synchronize (pytest-benchmark times with the host clock).
``run.py`` gives more (percentiles from CUDA events, memory, launches); this file
is for trend tracking.  ``pytest``'s default ``testpaths`` is ``tests``, so a plain
test run never collects these.
"""
from __future__ import annotations

import functools
import os

import pytest
import torch

from benchmarks import run
from benchmarks.common import models, providers, timing

pytest.importorskip("pytest_benchmark")

DEVICE = torch.device(os.environ.get("EMA_BENCH_DEVICE")
                      or ("cuda" if torch.cuda.is_available() else "cpu"))
SIZE = os.environ.get("EMA_BENCH_SIZE", "quick")
MODELS = {"tiny": models.TINY, "quick": models.QUICK, "full": models.FULL}[SIZE]
DTYPES = [d for d in os.environ.get("EMA_BENCH_DTYPES", "bf16,fp16,fp32").split(",") if d]
ROUNDS = int(os.environ.get("EMA_BENCH_ROUNDS") or (20 if DEVICE.type == "cuda" else 11))

USABLE, SKIPPED = providers.discover(DEVICE)
BY_NAME = {p.name: p for p in USABLE}
CASES = [(m, d, p) for m in MODELS for d in DTYPES for p in list(BY_NAME) + list(SKIPPED)]


@functools.lru_cache(maxsize=1)  # one model at a time: the cases run model by model
def _model(name: str, dtype: str):
    timing.release(DEVICE)
    return models.build(models.SPECS[name], models.DTYPES[dtype], DEVICE)


@pytest.mark.parametrize("model,dtype,provider", CASES,
                         ids=[f"{m}-{d}-{p.replace(' ', '_')}" for m, d, p in CASES])
def test_ema_update(benchmark, model, dtype, provider):
    if provider in SKIPPED:
        pytest.skip(SKIPPED[provider])
    p, spec = BY_NAME[provider], models.SPECS[model]
    module = _model(model, dtype)
    _, fits, too_big = run.plan([p], spec, models.DTYPES[dtype], 1, timing.free_bytes(DEVICE))
    if not fits:
        pytest.skip(too_big[p.name])
    fn = p.make(module, run.DECAY)
    fn()  # a first update may only copy (ema-pytorch, AveragedModel)
    def step():
        fn()
        if DEVICE.type == "cuda":  # the host clock must see the GPU's work
            torch.cuda.synchronize(DEVICE)
    benchmark.group = f"{model} {dtype}"
    moved = p.bytes_moved(spec.numel, models.DTYPES[dtype])
    shadow = p.shadow_dtype(models.DTYPES[dtype])
    benchmark.extra_info.update(bytes_moved=moved, device=str(DEVICE),
                                shadow_dtype=str(shadow).replace("torch.", "") if shadow else None)
    benchmark.pedantic(step, rounds=ROUNDS, warmup_rounds=1, iterations=1)
    benchmark.extra_info["gb_per_s_median"] = moved / benchmark.stats.stats.median / 1e9
