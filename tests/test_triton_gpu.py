"""The Triton backend on a real GPU (skipped without one): real sizes, one launch per
update, no host sync, and CUDA-graph capture with a changing decay."""
from __future__ import annotations

import itertools

import pytest
import torch
from torch import nn

from ema_fused import EMA, available_backends, ema_update_, schedules

from conftest import assert_rounded_close, compute_dtype, lerp_reference, rand

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU"),
]
KERNEL_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


@pytest.fixture(autouse=True)
def _triton_usable():
    usable, why = available_backends("cuda")["triton"]
    if not usable:
        pytest.fail(f"Triton backend not usable on this GPU machine: {why}")


@pytest.mark.parametrize("sd,pd", list(itertools.product(KERNEL_DTYPES, KERNEL_DTYPES)))
def test_update_real_sizes_against_float64(sd, pd):
    gen = torch.Generator().manual_seed(0)
    sizes = [0, 1, 7, 2047, 2048, 2049, 278011, (1 << 24) + 3]
    shadows = [rand(n, sd, gen, "cuda") for n in sizes]
    params = [rand(n, pd, gen, "cuda") for n in sizes]
    shadows.append(rand(5000, sd, gen, "cuda")[1:])  # misaligned view
    params.append(rand(4999, pd, gen, "cuda"))
    exact = [lerp_reference(s, p, 0.1) for s, p in zip(shadows, params)]
    mags = [s.double().abs() + p.double().abs() for s, p in zip(shadows, params)]
    ema_update_(shadows, params, 0.1, backend="triton")
    for s, e, m in zip(shadows, exact, mags):
        assert_rounded_close(s, e, m, compute_dtype(sd, pd))


def _model(dtype=torch.bfloat16):
    torch.manual_seed(0)
    return nn.Sequential(*[nn.Linear(256, 256) for _ in range(8)], nn.LayerNorm(256)).cuda().to(dtype)


def test_exactly_one_kernel_launch_per_update():
    model = _model()
    ema = EMA(model, decay=0.999, backend="triton")
    ema.update()  # compiles and builds the tables
    torch.cuda.synchronize()
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
        ema.update()
        torch.cuda.synchronize()
    kernels = [e.name for e in prof.events() if e.device_type == torch.autograd.DeviceType.CUDA]
    assert kernels == ["update_kernel"], kernels


def test_update_does_not_sync_with_the_host():
    model = _model()
    ema = EMA(model, decay=0.999, backend="triton")
    ema.update()
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        for _ in range(3):
            ema.update()
    finally:
        torch.cuda.set_sync_debug_mode("default")


def test_copy_to_rounds_like_torch():
    model = _model()
    ema = EMA(model, decay=0.5, backend="triton")
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p))
    ema.update()
    expected = dict(ema.named_shadows())["0.weight"].to(torch.bfloat16)
    with ema.average_parameters():
        assert torch.equal(model[0].weight, expected)  # round to nearest even, as torch


def test_graph_capture_with_changing_decay_matches_eager():
    model = _model()
    sched = schedules.power_warmup(0.999, power=0.9)
    graphed = EMA(model, schedule=sched, backend="triton", capturable=True, update_after_step=2)
    eager = EMA(model, schedule=sched, backend="triton", update_after_step=2)
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):  # warm-up: compile, build tables
        graphed.update()
    torch.cuda.current_stream().wait_stream(side)
    eager.update()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        graphed.update()
    decays = []
    for _ in range(12):
        with torch.no_grad():
            for p in model.parameters():
                p.add_(torch.randn_like(p) * 0.01)  # in place: the graph's addresses stay valid
        graph.replay()
        eager.update()
        decays.append(graphed.decay)
        assert graphed.decay == pytest.approx(eager.decay, abs=1e-7)
    assert len(set(decays)) > 5  # the decay really changed between replays
    for (n, a), (_, b) in zip(graphed.named_shadows(), eager.named_shadows()):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-6, msg=n)
