"""Triton tables and CUDA-graph capture: a table a captured graph launched is kept (and
found by its key) for the graph's life on every path, EMA's prepared plans included; the
usability probe never runs (nor caches a failure) while a graph is captured; and an
all-zero multi-update captures any number of times.

On the CPU the launchers' one question about capture (``launch._capturing``) is answered
by the ``capture`` fixture, and the kernels run through Triton's interpreter: the same
code paths as on a GPU, minus the graph.  The tests marked ``gpu`` capture real graphs
and replay them.
"""
from __future__ import annotations

import gc
import types
import weakref
from collections import OrderedDict

import pytest
import torch
from torch import nn

from ema_fused import EMA, available_backends, ema_multi_update_, ema_update_

from helpers.gpu import gpu_backend, warm_up_and_capture
from helpers.numerics import rand, requires_gpu, seeded

triton = pytest.importorskip("triton")

from ema_fused.backends import triton as triton_backend  # noqa: E402  (after the skip)
from ema_fused.triton_kernels import launch, multi_update  # noqa: E402

# the simulated captures: Triton's interpreter on CPU tensors (machines without a GPU)
on_cpu = pytest.mark.skipif(not available_backends("cpu")["triton"][0],
                            reason=available_backends("cpu")["triton"][1])


@pytest.fixture
def capture(monkeypatch):
    """``capture.on = True`` makes the Triton launchers see a graph being captured (CPU
    tensors: no real graph).  The table caches start empty and are put back after."""
    state = types.SimpleNamespace(on=False)
    monkeypatch.setattr(launch, "_capturing", lambda device: state.on)
    for module in (launch, multi_update):
        monkeypatch.setattr(module, "_plans", OrderedDict())
        monkeypatch.setattr(module, "_pinned", {})
    monkeypatch.setattr(launch, "_graph_tables", {}, raising=False)
    return state


def _fill_the_cache(device) -> None:
    """More pair sets than the cache holds: every table not pinned is evicted."""
    for i in range(launch._CACHE_SIZE + 1):
        other = torch.zeros(i + 3, device=device)
        launch.plan_for([(other, torch.ones_like(other))], other.device)


def _pairs(device="cpu"):
    gen = seeded("graph-tables", device)
    s = rand(2 * launch.BLOCK + 5, torch.float32, gen, device)
    return [(s, rand(s.numel(), torch.bfloat16, gen, device))]


@on_cpu
@pytest.mark.parametrize("call", ["update", "update_tensor_weight", "copy"])
def test_a_prepared_table_launched_in_a_capture_outlives_its_holder(capture, call):
    pairs = _pairs()
    prepared = launch.Prepared(pairs)  # built before the capture (a warm-up)
    tables = weakref.ref(prepared.plan.tensors), weakref.ref(prepared.plan.tiles)
    capture.on = True
    if call == "update":
        prepared.update_(0.5)
    elif call == "update_tensor_weight":
        prepared.update_(torch.tensor([0.5]))
    else:
        prepared.copy_(1.0)
    capture.on = False
    _fill_the_cache("cpu")
    del prepared
    gc.collect()
    assert all(t() is not None for t in tables), "a table the graph replays was freed"
    capture.on = True  # and a later capture of the same pairs finds it (no warm-up needed)
    assert launch.Prepared(pairs).plan.tensors is tables[0]()


@on_cpu
def test_a_prepared_table_not_launched_in_a_capture_is_not_kept(capture):
    """Only what a capture launched is pinned: weight 0 launches nothing."""
    prepared = launch.Prepared(_pairs())
    tables = weakref.ref(prepared.plan.tensors)
    capture.on = True
    prepared.update_(0.0)
    capture.on = False
    _fill_the_cache("cpu")
    del prepared
    gc.collect()
    assert tables() is None


def _model(device):
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(40, 70), nn.Linear(70, 3)).to(device)


def _launched_plans(monkeypatch) -> list:
    seen = []
    real = launch.run
    monkeypatch.setattr(launch, "run", lambda k, plan, *a, **kw: (seen.append(plan),
                                                                   real(k, plan, *a, **kw)))
    return seen


@on_cpu
def test_ema_keeps_its_captured_table_through_a_plan_rebuild(capture, monkeypatch):
    """The issue's case: EMA's update launches its held plan directly; after 16 other
    pair sets and a rebuild of EMA's plan (a parameter object replaced over the same
    storage), the table the graph replays must still be alive."""
    model = _model("cpu")
    ema = EMA(model, decay=0.9, backend="triton", capturable=True)
    ema.update()  # warm-up
    seen = _launched_plans(monkeypatch)
    capture.on = True
    ema.update()
    capture.on = False
    (captured,) = {id(p): p for p in seen}.values()
    tables = weakref.ref(captured.tensors)
    del captured, seen[:]
    _fill_the_cache("cpu")
    model[0].weight = nn.Parameter(model[0].weight.detach())  # same storage, new object
    ema.update()  # rebuilds EMA's plan; the old holder is dropped
    gc.collect()
    assert tables() is not None, "the captured table was freed with EMA's old plan"


@on_cpu
def test_the_probe_is_neither_run_nor_cached_while_capturing(capture, monkeypatch):
    monkeypatch.setattr(triton_backend, "_probed", {})
    capture.on = True
    usable, why = available_backends("cpu")["triton"]
    capture.on = False
    assert not usable and "captur" in why, why  # not tried: it would launch and sync
    assert triton_backend._probed == {}
    usable, why = available_backends("cpu")["triton"]
    assert usable, why  # probed now, outside the capture


@on_cpu
def test_an_all_zero_multi_update_captures_again_and_again(capture):
    gen = seeded("multi-zero")
    params = [rand(n, torch.bfloat16, gen) for n in (7, 2 * launch.BLOCK + 1)]
    shadows = [[rand(p.numel(), torch.float32, gen) for p in params] for _ in range(2)]
    before = [[s.clone() for s in profile] for profile in shadows]
    ema_multi_update_(shadows, params, [0.0, 0.0], backend="triton")  # warm-up
    for _ in range(3):
        capture.on = True
        ema_multi_update_(shadows, params, [0.0, 0.0], backend="triton")
        capture.on = False
    _fill_the_cache("cpu")
    capture.on = True
    ema_multi_update_(shadows, params, [0.0, 0.0], backend="triton")
    capture.on = False
    assert all(torch.equal(s, b) for ps, pb in zip(shadows, before) for s, b in zip(ps, pb))


@on_cpu
def test_a_multi_update_table_launched_in_a_capture_is_kept(capture):
    gen = seeded("multi-kept")
    params = [rand(2 * launch.BLOCK + 3, torch.bfloat16, gen)]
    shadows = [[rand(params[0].numel(), torch.float32, gen)] for _ in range(2)]
    ema_multi_update_(shadows, params, [0.5, 0.25], backend="triton")  # warm-up
    capture.on = True
    ema_multi_update_(shadows, params, [0.5, 0.25], backend="triton")
    capture.on = False
    for i in range(multi_update._CACHE_SIZE + 1):  # other sets: evict what is not pinned
        other = torch.zeros(i + 3)
        ema_multi_update_([[torch.zeros_like(other)]], [other], [0.5], backend="triton")
    capture.on = True  # the same pairs in a new capture: found, no "table not built"
    ema_multi_update_(shadows, params, [0.5, 0.25], backend="triton")
    capture.on = False


# ------------------------------------------------------------------ real graphs (GPU)

def _replay_over_junk(graph: torch.cuda.CUDAGraph, eager, times: int = 2) -> None:
    """Fill fresh allocations (over whatever was just freed) with garbage, then replay
    the graph ``times`` times, running ``eager`` after each replay."""
    torch.cuda.synchronize()
    junk = [torch.full((1 << 12,), -7.0, device="cuda") for _ in range(256)]
    for _ in range(times):
        graph.replay()
        eager()
    torch.cuda.synchronize()
    del junk


def _same(got, want) -> None:
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w, rtol=2e-7, atol=2e-7)


@pytest.mark.gpu
@requires_gpu()
@pytest.mark.parametrize("weight", [0.25, 1.0])  # 1.0: Prepared's copy path
def test_gpu_a_prepared_table_outlives_its_holder(weight):
    gpu_backend("triton")
    (s, p), = _pairs("cuda")
    twin = s.clone()
    prepared = launch.Prepared([(s, p)])
    prepared.update_(0.5)  # warm-up
    ema_update_([twin], [p], 0.5, backend="foreach")
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        prepared.update_(weight)
    del prepared
    _fill_the_cache("cuda")
    gc.collect()
    _replay_over_junk(graph, lambda: ema_update_([twin], [p], weight, backend="foreach"))
    _same([s], [twin])


@pytest.mark.gpu
@requires_gpu()
def test_gpu_ema_replays_its_graph_after_a_plan_rebuild(monkeypatch):
    """The issue's case on a real graph: capturable EMA on Triton, captured; 17 other
    pair sets; a parameter object replaced over the same storage (EMA rebuilds its plan
    and drops the old holder of the captured table); garbage over freed memory; replays
    must match an eager twin."""
    gpu_backend("triton")
    model = _model("cuda")
    graphed = EMA(model, decay=0.9, backend="triton", capturable=True)
    eager = EMA(model, decay=0.9, backend="foreach")
    graph = warm_up_and_capture(graphed.update)
    eager.update()
    _fill_the_cache("cuda")
    built = []
    real = launch.plan_for
    monkeypatch.setattr(launch, "plan_for", lambda *a, **kw: (built.append(1), real(*a, **kw))[1])
    model[0].weight = nn.Parameter(model[0].weight.detach())  # same storage, new object
    graphed.update()
    eager.update()
    assert built, "EMA did not rebuild its plan: the test would not show the defect"
    gc.collect()
    _replay_over_junk(graph, eager.update, times=3)
    _same([s for _, s in graphed.named_shadows()], [s for _, s in eager.named_shadows()])


@pytest.mark.gpu
@requires_gpu()
def test_gpu_the_probe_is_not_run_inside_a_capture(monkeypatch):
    gpu_backend("triton")
    monkeypatch.setattr(triton_backend, "_probed", {})
    with torch.cuda.graph(torch.cuda.CUDAGraph()):
        usable, why = available_backends("cuda")["triton"]
    assert not usable and "captur" in why, why
    assert available_backends("cuda")["triton"][0], "a failure in the capture was cached"


@pytest.mark.gpu
@requires_gpu()
def test_gpu_an_all_zero_multi_update_captures_twice():
    gpu_backend("triton")
    gen = seeded("multi-zero-gpu")
    params = [rand(n, torch.bfloat16, gen, "cuda") for n in (7, 2 * launch.BLOCK + 1)]
    shadows = [[rand(p.numel(), torch.float32, gen, "cuda") for p in params] for _ in range(2)]
    before = [[s.clone() for s in profile] for profile in shadows]
    ema_multi_update_(shadows, params, [0.0, 0.0], backend="triton")  # warm-up
    graphs = [torch.cuda.CUDAGraph() for _ in range(2)]
    for graph in graphs:
        with torch.cuda.graph(graph):
            ema_multi_update_(shadows, params, [0.0, 0.0], backend="triton")
    for graph in graphs:
        graph.replay()
    torch.cuda.synchronize()
    assert all(torch.equal(s, b) for ps, pb in zip(shadows, before) for s, b in zip(ps, pb))
