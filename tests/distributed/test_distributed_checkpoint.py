"""Checkpoints of a sharded EMA: DCP across world sizes, resume, per-rank torch.save, export.

The test process itself is the 1-process world: it writes a DCP checkpoint of an
unsharded EMA, the 2 spawned ranks load it into FSDP2 shadows (1 -> 2), run an
interrupted-and-resumed and an uninterrupted trajectory, and save again; the test
process loads that into an unsharded EMA (2 -> 1).  Every comparison is bit for bit.
"""
from __future__ import annotations

import os

import torch

from helpers.dist_utils import dcp_module, sharded_model, full, local, make_model, spawn, step_models
from ema_fused import EMA, schedules

K, M = 3, 3  # steps before and after the interruption
CONFIG = dict(schedule=schedules.tau_ramp(0.9, tau=3), bias_correction=True)




def _run(model, ema, steps) -> None:
    for step in steps:
        step_models([model], step)
        ema.update()


def _assert_same_state(a: EMA, b: EMA) -> None:
    assert (a.num_updates, a.decay, a._decay_product) == (b.num_updates, b.decay, b._decay_product)
    theirs = dict(b.named_shadows())
    for name, s in a.named_shadows():
        assert type(s) is type(theirs[name]) and torch.equal(local(s), local(theirs[name])), name


def _dcp_worker(rank: int, world_size: int, root: str) -> None:
    from torch.distributed.checkpoint.stateful import Stateful
    dcp = dcp_module()
    # 1 -> 2: the unsharded checkpoint lands in each rank's shards
    model, one = sharded_model(), torch.load(os.path.join(root, "one.pt"), weights_only=True)
    ema = EMA(model, **CONFIG)
    assert isinstance(ema, Stateful)
    dcp.load({"ema": ema}, checkpoint_id=os.path.join(root, "one"))
    assert (ema.num_updates, ema.decay) == (one["step"], one["decay"])
    for name, s in ema.named_shadows():
        assert torch.equal(full(s), one["shadows"][name]), name
    # an interrupted and resumed sharded run continues exactly like an uninterrupted one
    uninterrupted, interrupted = sharded_model(), sharded_model()
    ema_u, ema_i = EMA(uninterrupted, **CONFIG), EMA(interrupted, **CONFIG)
    _run(uninterrupted, ema_u, range(1, K + M + 1))
    _run(interrupted, ema_i, range(1, K + 1))
    dcp.save({"ema": ema_i}, checkpoint_id=os.path.join(root, "mid"))
    resumed = sharded_model()
    ema_r = EMA(resumed, **CONFIG)
    dcp.load({"ema": ema_r}, checkpoint_id=os.path.join(root, "mid"))
    _assert_same_state(ema_r, ema_i)
    _run(resumed, ema_r, range(K + 1, K + M + 1))
    _assert_same_state(ema_r, ema_u)
    # 2 -> 1 (checked by the test process), and the full weights of rank 0 to compare with
    dcp.save({"ema": ema_u}, checkpoint_id=os.path.join(root, "two"))
    offloaded = ema_u.averaged_weights(full_state_dict=True, cpu_offload=True)
    everywhere = ema_u.averaged_weights(full_state_dict=True)
    sharded = ema_u.averaged_weights()
    sharded_cpu = ema_u.averaged_weights(cpu_offload=True)  # still DTensors, every rank
    assert (offloaded == {}) == (rank != 0)
    for name, value in everywhere.items():
        assert type(value) is torch.Tensor and torch.equal(value, full(sharded[name])), name
        assert type(sharded_cpu[name]) is type(sharded[name]), name
        assert local(sharded_cpu[name]).device.type == "cpu"
        assert torch.equal(local(sharded_cpu[name]), local(sharded[name])), name
        if rank == 0:
            assert offloaded[name].device.type == "cpu" and torch.equal(offloaded[name], value)
    if rank == 0:
        torch.save(offloaded, os.path.join(root, "two_full.pt"))
    # plain per-rank torch.save of the DTensor state_dict still works
    path = os.path.join(root, f"rank{rank}.pt")
    torch.save(ema_u.state_dict(), path)
    ema_again = EMA(sharded_model(), **CONFIG)
    ema_again.load_state_dict(torch.load(path, weights_only=True))
    _assert_same_state(ema_again, ema_u)
    ema_again.load_state_dict(one)  # a full plain checkpoint: each rank takes its shards
    for name, s in ema_again.named_shadows():
        assert torch.equal(full(s), one["shadows"][name]), name


def test_dcp_reshards_across_world_sizes_and_resumes_bit_identically(tmp_path):
    dcp = dcp_module()
    model = make_model()
    ema = EMA(model, **CONFIG)
    _run(model, ema, range(1, K + 1))
    dcp.save({"ema": ema}, checkpoint_id=str(tmp_path / "one"))
    torch.save(ema.state_dict(), tmp_path / "one.pt")
    spawn(_dcp_worker, 2, str(tmp_path))
    fresh = EMA(make_model(), **CONFIG)
    dcp.load({"ema": fresh}, checkpoint_id=str(tmp_path / "two"))
    assert fresh.num_updates == K + M
    expected = torch.load(tmp_path / "two_full.pt", weights_only=True)
    got = fresh.averaged_weights()
    assert set(got) == set(expected)
    for name, value in got.items():
        assert torch.equal(value, expected[name]), name
