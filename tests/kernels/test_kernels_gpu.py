"""The kernel backends (Triton and C++/CUDA) on a real GPU (skipped without one): real
sizes against float64 and against each other, one launch per update, no host sync,
and CUDA-graph capture with a changing decay."""
from __future__ import annotations

import itertools

import pytest
import torch
from torch import nn

from ema_fused import EMA, available_backends, ema_copy_, ema_swap_, ema_update_
from ema_fused.backends import extension as _extension
from ema_fused import schedules

from helpers.gpu import warm_up_and_capture
from helpers.numerics import assert_rounded_close, compute_dtype, lerp_reference, rand

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU"),
]
KERNEL_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


# the kernel each backend launches for an update (profiler names)
KERNEL_NAMES = {"triton": "update_kernel", "cuda": "tiles_kernel"}
# tile sizes: Triton's BLOCK and the CUDA kernels' kTile, each +-1
SIZES = [0, 1, 7, 2047, 2048, 2049, 4095, 4096, 4097, 278011, (1 << 24) + 3]


def _usable(name: str) -> str:
    if name == "cuda":
        _extension.load(build=True)  # an AOT build, or a just-in-time one
    usable, why = available_backends("cuda")[name]
    if not usable:
        pytest.fail(f"backend {name!r} not usable on this GPU machine: {why}")
    return name


@pytest.fixture(params=["triton", "cuda"])
def backend(request):
    return _usable(request.param)


@pytest.fixture(params=["triton", "cuda", "foreach"])
def any_backend(request):
    return _usable(request.param)


@pytest.mark.parametrize("sd,pd", list(itertools.product(KERNEL_DTYPES, KERNEL_DTYPES)))
def test_update_real_sizes_against_float64(backend, sd, pd):
    gen = torch.Generator().manual_seed(0)
    sizes = SIZES
    shadows = [rand(n, sd, gen, "cuda") for n in sizes]
    params = [rand(n, pd, gen, "cuda") for n in sizes]
    shadows.append(rand(5000, sd, gen, "cuda")[1:])  # misaligned view
    params.append(rand(4999, pd, gen, "cuda"))
    exact = [lerp_reference(s, p, 0.1) for s, p in zip(shadows, params)]
    mags = [s.double().abs() + p.double().abs() for s, p in zip(shadows, params)]
    ema_update_(shadows, params, 0.1, backend=backend)
    for s, e, m in zip(shadows, exact, mags):
        assert_rounded_close(s, e, m, compute_dtype(sd, pd))


@pytest.mark.parametrize("dd,sd", list(itertools.product(KERNEL_DTYPES, KERNEL_DTYPES)))
def test_copy_and_swap_real_sizes(backend, dd, sd):
    gen = torch.Generator().manual_seed(1)
    src = [rand(n, sd, gen, "cuda") for n in SIZES]
    dst = [torch.full((n,), float("nan"), dtype=dd, device="cuda") for n in SIZES]
    ema_copy_(dst, src, 0.75, backend=backend)
    for d, s in zip(dst, src):
        exact = s.double() * 0.75
        assert_rounded_close(d, exact, exact.abs(), compute_dtype(dd, sd))
    a = [rand(n, sd, gen, "cuda") for n in SIZES]
    a0, b0 = [x.clone() for x in a], [x.clone() for x in src]
    ema_swap_(a, src, backend=backend)
    assert all(torch.equal(x, y) for x, y in zip(a, b0))
    assert all(torch.equal(x, y) for x, y in zip(src, a0))


def test_cuda_and_triton_agree_within_one_rounding(backend):
    """The same update through both kernel families: equal up to one rounding of the
    shadow's dtype (fp32 contraction choices may differ)."""
    if backend != "cuda":
        pytest.skip("compared once, from the cuda parametrisation")
    gen = torch.Generator().manual_seed(2)
    for sd, pd in itertools.product(KERNEL_DTYPES, KERNEL_DTYPES):
        shadows = [rand(n, sd, gen, "cuda") for n in SIZES]
        params = [rand(n, pd, gen, "cuda") for n in SIZES]
        twins = [s.clone() for s in shadows]
        ema_update_(shadows, params, 0.01, backend="cuda")
        ema_update_(twins, params, 0.01, backend="triton")
        for a, b in zip(shadows, twins):
            ulp = torch.finfo(sd).eps * torch.maximum(a.double().abs(), b.double().abs())
            assert bool(((a.double() - b.double()).abs() <= ulp + torch.finfo(sd).tiny).all())


def test_a_table_miss_during_capture_is_refused_clearly(backend):
    """A table miss inside graph capture fails with a message (the same on both kernel
    backends) instead of caching an empty table or breaking the capture; after a warm-up
    outside capture, a fresh graph captures and replays."""
    s = [torch.zeros(4096 + 5, device="cuda")]
    p = [torch.ones(4096 + 5, device="cuda", dtype=torch.bfloat16)]
    with pytest.raises(RuntimeError, match="cannot be built while a CUDA graph is being captured"):
        with torch.cuda.graph(torch.cuda.CUDAGraph()):
            ema_update_(s, p, 0.5, backend=backend)
    torch.cuda.synchronize()
    ema_update_(s, p, 0.5, backend=backend)  # eager: builds the table
    graph = torch.cuda.CUDAGraph()  # a refused capture leaves its graph unusable
    with torch.cuda.graph(graph):
        ema_update_(s, p, 0.5, backend=backend)
    graph.replay()
    torch.cuda.synchronize()
    assert bool((s[0] == 0.75).all())


def test_first_use_on_another_stream_waits_for_the_table_copy(backend):
    """Stream A is held up (torch.cuda._sleep) before the table's copy; stream B uses the
    same pairs at once, without waiting on A.  B must not read the table before A's copy
    lands.  A's own launch has a device weight of 0, so it touches no tensor."""
    gen = torch.Generator().manual_seed(3)
    shadows = [rand(n, torch.float32, gen, "cuda") for n in (4096 * 3 + 1, 7, 100_003)]
    params = [rand(s.numel(), torch.bfloat16, gen, "cuda") for s in shadows]
    exact = [lerp_reference(s, p, 0.25) for s, p in zip(shadows, params)]
    zero = torch.zeros(1, device="cuda")
    stream_a, stream_b = torch.cuda.Stream(), torch.cuda.Stream()
    torch.cuda.synchronize()
    with torch.cuda.stream(stream_a):
        torch.cuda._sleep(200_000_000)  # ~0.1 s of GPU time before the copy
        ema_update_(shadows, params, zero, backend=backend)  # table miss: built on A
    with torch.cuda.stream(stream_b):
        ema_update_(shadows, params, 0.25, backend=backend)  # a hit, first use on B
    torch.cuda.synchronize()
    for s, e, p in zip(shadows, exact, params):
        assert_rounded_close(s, e, e.abs() + p.double().abs(), torch.float32)


def test_a_captured_update_survives_other_tables_being_built_and_freed(backend):
    """A captured graph keeps its table's address.  Build 17 other pair sets (more than
    the cache holds), free them and fill fresh allocations with garbage, then replay:
    the result must equal the same steps run eagerly."""
    gen = torch.Generator().manual_seed(4)
    shadows = [rand(n, torch.float32, gen, "cuda") for n in (4096 * 5 + 3, 11, 70_001)]
    params = [rand(s.numel(), torch.bfloat16, gen, "cuda") for s in shadows]
    twins = [s.clone() for s in shadows]
    ema_update_(shadows, params, 0.5, backend=backend)  # warm-up: builds the table
    ema_update_(twins, params, 0.5, backend="foreach")
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        ema_update_(shadows, params, 0.125, backend=backend)
    for i in range(17):
        other = [torch.zeros(1000 + i, device="cuda"), torch.zeros(3 + i, device="cuda")]
        ema_update_(other, [torch.ones_like(o) for o in other], 0.5, backend=backend)
        del other
    torch.cuda.synchronize()
    junk = [torch.full((1 << 16,), -7.0, device="cuda") for _ in range(64)]  # reuse the memory
    for _ in range(3):
        graph.replay()
        ema_update_(twins, params, 0.125, backend="foreach")
    torch.cuda.synchronize()
    del junk
    for s, t in zip(shadows, twins):
        torch.testing.assert_close(s, t, rtol=2e-7, atol=2e-7)


@pytest.mark.parametrize("skip_nonfinite", [False, True], ids=["plain", "skip_nonfinite"])
def test_device_weight_update_against_float64(backend, skip_nonfinite):
    """The graph-safe update (the weight read on the device), run eagerly, so that the
    sanitizer subset of scripts/gpu_check.sh covers it without a graph: tile edges, a
    misaligned view, finite params (skip_nonfinite changes nothing for them)."""
    gen = torch.Generator().manual_seed(6)
    shadows = [rand(n, torch.float32, gen, "cuda") for n in SIZES[:-1]]
    shadows.append(rand(5000, torch.float32, gen, "cuda")[1:])
    params = [rand(s.numel(), torch.bfloat16, gen, "cuda") for s in shadows]
    exact = [lerp_reference(s, p, 0.25) for s, p in zip(shadows, params)]
    weight = torch.tensor([0.25], device="cuda")
    ema_update_(shadows, params, weight, skip_nonfinite=skip_nonfinite, backend=backend)
    for s, e, p in zip(shadows, exact, params):
        assert_rounded_close(s, e, e.abs() + p.double().abs(), torch.float32)


@pytest.mark.parametrize("offset_a,offset_b", [(1, 0), (0, 3), (2, 2), (3, 1)])
def test_unaligned_views_against_float64(backend, offset_a, offset_b):
    """Views off the 16-byte grid: a short head, then vector tiles for the shadow side
    (and for the param side when both are equally misaligned)."""
    gen = torch.Generator().manual_seed(5)
    n = (1 << 20) + 13
    shadows = [rand(n + 4, torch.float32, gen, "cuda")[offset_a:offset_a + n]]
    params = [rand(n + 4, torch.bfloat16, gen, "cuda")[offset_b:offset_b + n]]
    exact = [lerp_reference(s, p, 0.2) for s, p in zip(shadows, params)]
    ema_update_(shadows, params, 0.2, backend=backend)
    assert_rounded_close(shadows[0], exact[0], exact[0].abs() + params[0].double().abs(),
                         torch.float32)


def _model(dtype=torch.bfloat16):
    torch.manual_seed(0)
    return nn.Sequential(*[nn.Linear(256, 256) for _ in range(8)], nn.LayerNorm(256)).cuda().to(dtype)


def test_exactly_one_kernel_launch_per_update(backend):
    model = _model()
    ema = EMA(model, decay=0.999, backend=backend)
    ema.update()  # compiles and builds the tables
    torch.cuda.synchronize()
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
        ema.update()
        torch.cuda.synchronize()
    kernels = [e.name for e in prof.events() if e.device_type == torch.autograd.DeviceType.CUDA]
    assert len(kernels) == 1 and KERNEL_NAMES[backend] in kernels[0], kernels


def test_update_does_not_sync_with_the_host(any_backend):
    model = _model()
    ema = EMA(model, decay=0.999, backend=any_backend)
    ema.update()
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        for _ in range(3):
            ema.update()
    finally:
        torch.cuda.set_sync_debug_mode("default")


def test_copy_to_rounds_like_torch(backend):
    model = _model()
    ema = EMA(model, decay=0.5, backend=backend)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p))
    ema.update()
    expected = dict(ema.named_shadows())["0.weight"].to(torch.bfloat16)
    with ema.average_parameters():
        assert torch.equal(model[0].weight, expected)  # round to nearest even, as torch


def test_graph_capture_with_changing_decay_matches_eager(backend):
    model = _model()
    sched = schedules.power_warmup(0.999, power=0.9)
    graphed = EMA(model, schedule=sched, backend=backend, capturable=True, update_after_step=2)
    eager = EMA(model, schedule=sched, backend=backend, update_after_step=2)
    graph = warm_up_and_capture(graphed.update)  # the warm-up compiles and builds tables
    eager.update()
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
