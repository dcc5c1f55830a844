"""The extension's host-path helpers (csrc/host_path.cpp): ``Snapshot`` says whether a
cached plan still fits the model; ``PairSet`` runs the kernel ops on held pairs.

The EMA-level behaviour (every kind of model change, with and without the snapshot)
is in test_model_changes.py; this file checks the two classes directly.
"""
from __future__ import annotations

import pytest
import torch
from torch import nn

from ema_fused import EMA
from ema_fused.backends import extension as _extension

from helpers.numerics import assert_rounded_close, compute_dtype, lerp_reference, rand, seeded


@pytest.fixture(scope="module")
def C():
    if not _extension.load(build=True):
        pytest.fail(f"the extension neither loads nor builds here: {_extension.error()}")
    return _extension.module()


def _model():
    return nn.Sequential(nn.Linear(3, 4), nn.BatchNorm1d(4), nn.Sequential(nn.Linear(4, 2)))


def _snapshot(C, model, shadows=()):
    ema = EMA(model)  # only to reuse its Tracked
    tracked = ema._tracked
    live = tracked.read()
    lists = tracked.watch_lists()
    return C.Snapshot(*lists, live, list(shadows))


def test_snapshot_is_valid_until_something_changes(C):
    model = _model()
    snap = _snapshot(C, model)
    assert snap.still_valid()
    with torch.no_grad():
        for p in model.parameters():
            p.mul_(2.0)  # values may change
    model.train(False)
    assert snap.still_valid()


CHANGES = {
    "storage replaced (p.data = ...)":
        lambda m: setattr(m[0].weight, "data", torch.zeros(4, 3)),
    "same storage, transposed view":
        lambda m: setattr(m[0].weight, "data", m[0].weight.data.view(3, 4).t()),
    "same storage, another dtype":
        lambda m: setattr(m[0].weight, "data", m[0].weight.data.view(torch.float16)),
    "parameter object replaced":
        lambda m: setattr(m[0], "bias", nn.Parameter(torch.zeros(4))),
    "buffer object replaced":
        lambda m: setattr(m[1], "running_var", torch.ones(4)),
    "TensorImpl swapped":
        lambda m: torch.utils.swap_tensors(m[0].weight, nn.Parameter(torch.zeros(4, 3))),
    "submodule replaced":
        lambda m: m.__setitem__(2, nn.Sequential(nn.Linear(4, 2))),
    "nested submodule replaced":
        lambda m: m[2].__setitem__(0, nn.Linear(4, 2)),
    "submodule deleted":
        lambda m: m.__delitem__(2),
    "parameter added":
        lambda m: m[1].register_parameter("extra", nn.Parameter(torch.zeros(1))),
    "buffer removed":
        lambda m: delattr(m[1], "num_batches_tracked"),
    "module added":
        lambda m: m.append(nn.ReLU()),
}


@pytest.mark.parametrize("change", list(CHANGES))
def test_snapshot_sees_every_kind_of_change(C, change):
    model = _model()
    snap = _snapshot(C, model)
    CHANGES[change](model)
    assert not snap.still_valid()


def test_snapshot_watches_the_fixed_tensors_too(C):
    model = _model()
    shadow = torch.zeros(5)
    snap = _snapshot(C, model, [shadow])
    assert snap.still_valid()
    shadow.data = torch.zeros(5)
    assert not snap.still_valid()


def test_snapshot_of_a_tensor_list_watches_layouts(C):
    ts = [torch.zeros(3), torch.zeros(2, 2)]
    snap = C.Snapshot([], [], [], [], [], [], ts, [])
    assert snap.still_valid()
    ts[1].data = ts[1].data.t()
    assert not snap.still_valid()


def test_snapshot_refuses_bad_input(C):
    with pytest.raises(RuntimeError, match="sized dicts must be dicts, got list"):
        C.Snapshot([], [], [], [[]], [], [], [], [])
    with pytest.raises(RuntimeError, match="expected tensors, got int"):
        C.Snapshot([], [], [], [], [], [], [3], [])
    with pytest.raises(RuntimeError, match="slot lists and the tensors differ"):
        C.Snapshot([], [], [], [], [{}], ["a"], [], [])
    with pytest.raises(RuntimeError, match="link lists differ in length"):
        C.Snapshot([{}], [], [], [], [], [], [], [])


@pytest.mark.parametrize("n", [16, 300_000])  # borrowed (short call) and owned (long call)
def test_pairset_runs_the_ops_against_float64(C, n):
    gen = seeded("pairset", n)
    dtypes = [(torch.float32, torch.bfloat16), (torch.float32, torch.float16),
              (torch.bfloat16, torch.bfloat16), (torch.float32, torch.float32)]
    shadows = [rand(n + i, sd, gen) for i, (sd, _) in enumerate(dtypes * 2)]
    params = [rand(n + i, pd, gen) for i, (_, pd) in enumerate(dtypes * 2)]
    held = C.PairSet(shadows, params)
    assert len(held) == len(shadows)
    exact = [lerp_reference(s, p, 0.3) for s, p in zip(shadows, params)]
    mags = [s.double().abs() + p.double().abs() for s, p in zip(shadows, params)]
    versions = [s._version for s in shadows] + [p._version for p in params]
    held.update_(0.3)
    for s, e, m, p in zip(shadows, exact, mags, params):
        assert_rounded_close(s, e, m, compute_dtype(s.dtype, p.dtype))
    # the written list's version counters move, the read list's do not
    assert [s._version for s in shadows] == [v + 1 for v in versions[:len(shadows)]]
    assert [p._version for p in params] == versions[len(shadows):]
    exact = [lerp_reference(s, p, 0.25) for s, p in zip(shadows, params)]
    held.update_graph_safe_(torch.tensor(0.25))
    for s, e, p in zip(shadows, exact, params):
        assert_rounded_close(s, e, e.abs() + p.double().abs(), compute_dtype(s.dtype, p.dtype))
    held.copy_(2.0)
    for s, p in zip(shadows, params):
        torch.testing.assert_close(s, (p.double() * 2.0).to(s.dtype), rtol=0, atol=0)


def test_pairset_follows_the_objects_and_holds_no_tensor_references(C):
    s, p = torch.zeros(4), nn.Parameter(torch.ones(4))
    held = C.PairSet([s], [p])
    held.update_(0.5)
    assert torch.equal(s, torch.full((4,), 0.5))
    # no extra reference to p's TensorImpl, else swap_tensors refuses it
    torch.utils.swap_tensors(p, nn.Parameter(torch.full((4,), 3.0)))
    held.update_(0.5)  # reads p's new tensor
    assert torch.equal(s, torch.full((4,), 1.75))
    p.data = torch.full((4,), -1.0)
    held.update_(1.0)
    assert torch.equal(s, torch.full((4,), -1.0))


def test_pairset_errors_come_from_the_op_checks(C):
    buf = torch.zeros(100)
    first = torch.zeros(8)
    held = C.PairSet([first, buf[:60]], [torch.ones(8), buf[10:70]])
    with pytest.raises(ValueError, match=r"kernel_update_: tensors\[1\] partially overlap"):
        held.update_(0.5)
    assert not first.any() and not buf.any()
    with pytest.raises(RuntimeError, match="weight must be in"):
        C.PairSet([first], [torch.ones(8)]).update_(1.5)
    with pytest.raises(RuntimeError, match="the first list has 1 tensors but the second has 0"):
        C.PairSet([first], [])
    with pytest.raises(RuntimeError, match="expected tensors, got str"):
        C.PairSet(["x"], [first])


def test_pairset_borrowed_path_keeps_reference_counts(C):
    """Off the CPU the tensors are borrowed (no reference counting): meta tensors take
    that path here (the ops' fake kernels run); swap_tensors afterwards proves that no
    reference was leaked or dropped."""
    a = [torch.empty(5, device="meta") for _ in range(3)]
    b = [torch.empty(5, device="meta") for _ in range(3)]
    held = C.PairSet(a, b)
    before = a[0]._version
    for _ in range(3):
        held.update_(0.5)
    held.copy_(1.0)
    assert a[0]._version == before + 4 and b[0]._version == 0
    torch.utils.swap_tensors(a[0], torch.empty(5, device="meta"))
    torch.utils.swap_tensors(b[1], torch.empty(5, device="meta"))


def test_ema_uses_both_helpers_on_the_cpu_backend(C):
    model = _model()
    ema = EMA(model, decay=0.5, backend="cpu")
    ema.update()
    plan = ema._plan
    assert plan.snapshot is not None and plan.snapshot.still_valid()
    prepared = plan.groups[0][3]
    assert prepared._held is not None and len(prepared._held) == len(prepared.ks) > 0
    ema.update()
    assert ema._plan is plan


def test_an_ema_kept_on_its_own_model_is_freed(C):
    """model.head -> ema -> plan -> snapshot -> the model's modules: a cycle through the
    C++ objects, which the garbage collector must see to free it."""
    import gc
    import weakref
    model = nn.Sequential(nn.Linear(2, 2), nn.Sequential(nn.Linear(2, 2)))
    ema = EMA(model, backend="cpu")
    ema.update()
    assert ema._plan.snapshot is not None and ema._plan.groups[0][3]._held is not None
    model[1][0].ema = ema  # kept on a submodule, as training frameworks often do
    refs = [weakref.ref(ema), weakref.ref(model), weakref.ref(model[1][0].weight)]
    del ema, model
    gc.collect()
    assert [r() for r in refs] == [None, None, None]
