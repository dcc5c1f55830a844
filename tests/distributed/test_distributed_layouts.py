"""Sharded layouts beyond one FSDP2 mesh, and models that change under the EMA.

HSDP (a 2-D mesh) and tensor-parallel ``distribute_tensor`` params mixed with plain
tensors; an EMA made before ``fully_shard``; FSDP2 re-creating its local shards
(``model.float()``); unsharded modules (``reshard_after_forward=False``); bad loads.
All on 2 gloo ranks in one spawned run.
"""
from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from helpers.dist_utils import full, local, make_model, set_value, spawn, step_models


def _assert_equal(sharded_ema, plain_ema) -> None:
    plain = dict(plain_ema.named_shadows())
    for name, shadow in sharded_ema.named_shadows():
        assert torch.equal(full(shadow), plain[name]), name


def _hsdp_and_tensor_parallel() -> None:
    from torch.distributed.fsdp import fully_shard
    from torch.distributed.tensor import Replicate, Shard, distribute_tensor, init_device_mesh
    from ema_fused import EMA
    plain = make_model()
    hsdp = copy.deepcopy(plain)
    fully_shard(hsdp, mesh=init_device_mesh("cpu", (1, 2), mesh_dim_names=("rep", "shard")))
    assert hsdp[0].weight.placements == (Replicate(), Shard(0))
    ema_h, ema_p = EMA(hsdp, decay=0.6), EMA(plain, decay=0.6)
    for step in range(1, 4):
        step_models([plain, hsdp], step)
        ema_h.update()
        ema_p.update()
        _assert_equal(ema_h, ema_p)
    # tensor parallel: dim 1 split 4 + 3, a replicated DTensor, a plain tensor; a list
    mesh = init_device_mesh("cpu", (2,))
    fulls = [torch.zeros(13, 7), torch.zeros(5), torch.zeros(3)]
    tp = [nn.Parameter(distribute_tensor(fulls[0], mesh, [Shard(1)])),
          nn.Parameter(distribute_tensor(fulls[1], mesh, [Replicate()])), torch.zeros(3)]
    ema_t, ema_f = EMA(tp, decay=0.5, dtype=None), EMA(fulls, decay=0.5, dtype=None)
    for step in range(1, 4):
        for i, (t, f) in enumerate(zip(tp, fulls)):
            value = torch.randn(f.shape, generator=torch.Generator().manual_seed(step * 10 + i))
            set_value(t, value)
            f.copy_(value)
        ema_t.update()
        ema_f.update()
        _assert_equal(ema_t, ema_f)


def _made_before_sharding() -> None:
    """The documented choice: an EMA made before fully_shard follows the shards at its
    next use; it never keeps a full-size shadow beside the sharded model."""
    from torch.distributed.fsdp import fully_shard
    from torch.distributed.tensor import DTensor
    from ema_fused import EMA
    plain = make_model()
    model = copy.deepcopy(plain)
    ema, ema_p = EMA(model, decay=0.5), EMA(plain, decay=0.5)
    step_models([plain, model], 1)
    ema.update()
    ema_p.update()
    fully_shard(model)
    shadows = ema.state_dict()["shadows"]  # follows here already: DTensor shards
    for name, p in model.named_parameters():
        assert isinstance(shadows[name], DTensor), name
        assert shadows[name].to_local().shape == p.to_local().shape, name
    _assert_equal(ema, ema_p)
    for step in range(2, 5):
        step_models([plain, model], step)
        ema.update()
        ema_p.update()
        _assert_equal(ema, ema_p)


def _stale_local_shards(python_check: bool) -> None:
    """FSDP2 gives its DTensor params new local tensors on model.float(): the EMA
    follows them and never writes the old ones; forward/backward cycles (params
    swapped to unsharded and back) keep the cached plan."""
    from torch.distributed.fsdp import fully_shard
    from ema_fused import EMA
    from ema_fused.ema import host_path as _host_path
    from ema_fused.backends import extension
    plain = make_model(torch.bfloat16)
    model = copy.deepcopy(plain)
    fully_shard(model[0], reshard_after_forward=False)
    fully_shard(model)
    ema, ema_p = EMA(model, decay=0.5), EMA(plain, decay=0.5)
    original = _host_path.snapshot
    if python_check:
        _host_path.snapshot = lambda *args: None
    try:
        step_models([plain, model], 1)
        ema.update()
        ema_p.update()
        assert (ema._plan.snapshot is not None) == (extension.load(build=False)
                                                    and not python_check)
        plan = ema._plan
        for step in (2, 3):  # real forward/backward: unshard, reshard, same shards
            model(torch.randn(3, 7, dtype=torch.bfloat16)).sum().backward()
            step_models([plain, model], step)
            ema.update()
            ema_p.update()
            assert ema._plan is plan
        old = {n: p.to_local() for n, p in model.named_parameters()}
        kept = {n: t.clone() for n, t in old.items()}
        model.float()
        plain.float()
        assert all(p.to_local() is not old[n] for n, p in model.named_parameters())
        step_models([plain, model], 4)
        ema.update()
        ema_p.update()
        _assert_equal(ema, ema_p)
        assert all(torch.equal(old[n], kept[n]) for n in old)  # never written through
    finally:
        _host_path.snapshot = original


def _unsharded_modules(dtype: torch.dtype) -> None:
    """reshard_after_forward=False keeps full params after a forward: update() names
    the tensor and changes nothing; average_parameters() (swap path for fp32, store
    path for bf16) reshards, so the forward inside uses the EMA weights and the one
    after it the model's own."""
    from torch.distributed.fsdp import fully_shard
    from ema_fused import EMA, ModelChangedError
    plain = make_model(dtype)
    model = copy.deepcopy(plain)
    fully_shard(model, reshard_after_forward=False)
    ema, ema_p = EMA(model, decay=0.5), EMA(plain, decay=0.5)
    step_models([plain, model], 1)
    ema.update()
    ema_p.update()
    step_models([plain, model], 2)
    x = torch.randn(4, 7, generator=torch.Generator().manual_seed(0)).to(dtype)
    with torch.no_grad():
        raw = model(x)  # now unsharded
        before = {n: local(s).clone() for n, s in ema.named_shadows()}
        with pytest.raises(ModelChangedError, match=r"'0.weight' is now a plain tensor but its shadow is a DTensor"):
            ema.update()
        assert all(torch.equal(local(s), before[n]) for n, s in ema.named_shadows())
        with ema.average_parameters(), ema_p.average_parameters():
            torch.testing.assert_close(model(x), plain(x))
        torch.testing.assert_close(model(x), raw)
    model.reshard()
    ema.update()
    ema_p.update()
    _assert_equal(ema, ema_p)


def _bad_loads() -> None:
    """A DTensor checkpoint of another mesh or placement is refused naming the tensor,
    with nothing written; a full plain one loads shard by shard."""
    from torch.distributed.tensor import Replicate, Shard, distribute_tensor, init_device_mesh
    from ema_fused import EMA, ModelChangedError
    mesh, mesh2 = init_device_mesh("cpu", (2,)), init_device_mesh("cpu", (1, 2))
    value = torch.randn(13, 7, generator=torch.Generator().manual_seed(3))

    def ema_of(m, placements, scale=1.0):
        return EMA([nn.Parameter(distribute_tensor(value * scale, m, placements))])

    sharded = ema_of(mesh, [Shard(0)])
    plain = EMA([value * 2])
    for other in (ema_of(mesh, [Replicate()], 3.0), ema_of(mesh2, [Replicate(), Shard(0)], 3.0)):
        before = other.state_dict()["shadows"]["0"].to_local().clone()
        with pytest.raises(ValueError, match=r"shadow '0' is a DTensor .* checkpoint holds"):
            other.load_state_dict(sharded.state_dict())
        assert torch.equal(other.state_dict()["shadows"]["0"].to_local(), before)
    with pytest.raises(ValueError, match=r"shadow '0' is a plain tensor .* holds a DTensor"):
        plain.load_state_dict(sharded.state_dict())
    assert torch.equal(plain.state_dict()["shadows"]["0"], value * 2)
    sharded.load_state_dict(plain.state_dict())  # each rank takes its rows of the full one
    assert torch.equal(full(sharded.state_dict()["shadows"]["0"]), value * 2)
    target = [value.clone()]
    with pytest.raises(ModelChangedError, match=r"tensor '0' of the given model is a plain"):
        sharded.copy_to(target)
    assert torch.equal(target[0], value)


def _layouts_worker(rank: int, world_size: int) -> None:
    _hsdp_and_tensor_parallel()
    _made_before_sharding()
    _stale_local_shards(python_check=False)
    _stale_local_shards(python_check=True)
    _unsharded_modules(torch.float32)
    _unsharded_modules(torch.bfloat16)
    _bad_loads()


def test_layouts_and_model_changes():
    spawn(_layouts_worker, 2)
