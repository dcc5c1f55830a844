"""An offloaded, non-blocking EMA of an FSDP2 model (issue 23): each rank averages its
local shards in the background, bit for bit like ``non_blocking=False``; ``dcp.save`` /
``dcp.load`` of it round-trip (2 ranks -> 2 ranks, then 2 -> 1 in the test process)."""
from __future__ import annotations

import os

import torch

from helpers.dist_utils import dcp_module, sharded_model, full, local, make_model, spawn, step_models
from ema_fused import EMA, schedules

K, M = 3, 2  # steps before and after the checkpoint
CONFIG = dict(schedule=schedules.tau_ramp(0.9, tau=3), device="cpu")




def _assert_same_state(a: EMA, b: EMA) -> None:
    assert (a.num_updates, a.decay) == (b.num_updates, b.decay)
    theirs = dict(b.named_shadows())
    for name, s in a.named_shadows():
        assert type(s) is type(theirs[name]) and torch.equal(local(s), local(theirs[name])), name


def _worker(rank: int, world_size: int, root: str) -> None:
    dcp = dcp_module()
    blocking, background = sharded_model(), sharded_model()
    ema_b, ema_o = EMA(blocking, **CONFIG), EMA(background, non_blocking=True, **CONFIG)
    for step in range(1, K + 1):
        step_models([blocking, background], step)
        ema_b.update()
        ema_o.update()
    _assert_same_state(ema_o, ema_b)  # waits; local shards, bit for bit
    assert all(local(s).device.type == "cpu" for _, s in ema_o.named_shadows())
    dcp.save({"ema": ema_o}, checkpoint_id=os.path.join(root, "two"))
    resumed_model = sharded_model()
    step_models([resumed_model], K)
    resumed = EMA(resumed_model, non_blocking=True, **CONFIG)
    dcp.load({"ema": resumed}, checkpoint_id=os.path.join(root, "two"))
    _assert_same_state(resumed, ema_o)
    for step in range(K + 1, K + M + 1):
        step_models([blocking, resumed_model], step)
        ema_b.update()
        resumed.update()
    _assert_same_state(resumed, ema_b)
    weights = {name: full(s) for name, s in ema_o.named_shadows()}
    if rank == 0:
        torch.save(weights, os.path.join(root, "two_full.pt"))


def test_fsdp2_offloaded_background_ema_with_dcp(tmp_path):
    spawn(_worker, 2, str(tmp_path))
    one = EMA(make_model(), non_blocking=True, **CONFIG)
    dcp_module().load({"ema": one}, checkpoint_id=str(tmp_path / "two"))
    expected = torch.load(tmp_path / "two_full.pt", weights_only=True)
    got = dict(one.named_shadows())
    assert set(got) == set(expected) and one.num_updates == K
    for name, value in expected.items():
        assert torch.equal(got[name], value), name
