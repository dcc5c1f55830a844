"""DDP on 2 gloo ranks: ``EMA(ddp_model)`` and ``EMA(ddp_model.module)`` are the same EMA.

Real optimizer steps on different data per rank (DDP averages the gradients), so
every rank holds the same model and must hold the same shadows; rank 0's checkpoint
loads on every rank.
"""
from __future__ import annotations

import os

import pytest
import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel as DDP

from helpers.numerics import rand, seeded
from helpers.dist_utils import make_model, spawn
from ema_fused import EMA

DECAY = 0.9


def _train_step(ddp: DDP, opt: torch.optim.Optimizer, tag: str, rank: int, step: int,
                emas) -> None:
    """One optimizer step on this rank's own data (DDP averages the gradients), then an
    update of every EMA in ``emas``."""
    ddp(rand((6, 7), torch.float32, seeded(tag, rank, step))).square().mean().backward()
    opt.step()
    opt.zero_grad()
    for ema in emas:
        ema.update()


def _ddp_worker(rank: int, world_size: int, root: str) -> None:
    from helpers.ema_reference import Reference
    model = make_model()
    ddp = DDP(model)
    ema_wrapped, ema_inner = EMA(ddp, decay=DECAY), EMA(ddp.module, decay=DECAY)
    names = set(model.state_dict())
    assert set(dict(ema_wrapped.named_shadows())) == names  # no "module." segment
    assert set(ema_wrapped.state_dict()["shadows"]) == set(ema_inner.state_dict()["shadows"])
    floats = {n for n, t in model.state_dict().items() if t.is_floating_point()}
    ref = Reference({n: t for n, t in model.state_dict().items() if n in floats},
                    lambda n: DECAY)
    opt = torch.optim.SGD(ddp.parameters(), lr=0.1)
    for step in range(4):
        _train_step(ddp, opt, "ddp", rank, step, (ema_wrapped, ema_inner))
        ref.update({n: t for n, t in model.state_dict().items() if n in floats})
    inner, expected = dict(ema_inner.named_shadows()), ref.read()
    for name, s in ema_wrapped.named_shadows():
        assert torch.equal(s, inner[name]), name
        every = [torch.empty_like(s) for _ in range(world_size)]
        dist.all_gather(every, s.contiguous())
        assert all(torch.equal(other, s) for other in every), f"{name} differs across ranks"
        if name in floats:
            torch.testing.assert_close(s.double(), expected[name], rtol=2e-6, atol=2e-6)
    with ema_wrapped.average_parameters(ddp):
        for name, t in model.state_dict().items():
            assert torch.equal(t, inner[name].to(t.dtype)), name
    path = os.path.join(root, "rank0.pt")
    if rank == 0:
        torch.save(ema_wrapped.state_dict(), path)
    dist.barrier()
    for fresh in (EMA(DDP(make_model()), decay=DECAY), EMA(make_model(), decay=DECAY)):
        fresh.load_state_dict(torch.load(path, weights_only=True))
        assert fresh.num_updates == 4
        for name, s in fresh.named_shadows():
            assert torch.equal(s, inner[name]), name


def test_ddp_both_constructions_equal_on_every_rank(tmp_path):
    spawn(_ddp_worker, 2, str(tmp_path))


def _gathered(t: torch.Tensor, world_size: int) -> list[torch.Tensor]:
    every = [torch.empty_like(t) for _ in range(world_size)]
    dist.all_gather(every, t.contiguous())
    return every


def _before_ddp_worker(rank: int, world_size: int) -> None:
    """Unseeded init (each rank its own weights), the EMA made before DDP(model): DDP
    broadcasts rank 0's weights into the model, not into the shadows, which hold each
    rank's own copy.  broadcast_shadows() makes them rank 0's; afterwards they equal an
    EMA made after DDP on every rank, step after step."""
    torch.manual_seed(100 + rank)  # a different init on every rank
    model = torch.nn.Sequential(torch.nn.Linear(7, 13), torch.nn.LayerNorm(13),
                                torch.nn.Linear(13, 3))
    early = EMA(model, decay=DECAY)
    ddp = DDP(model)
    after = EMA(ddp, decay=DECAY)  # the documented order: made from the broadcast weights
    shadow = dict(early.named_shadows())["0.weight"]
    assert not torch.equal(*_gathered(shadow, world_size)), "the README's caveat holds"
    early.broadcast_shadows()
    opt = torch.optim.SGD(ddp.parameters(), lr=0.1)
    for step in range(3):
        _train_step(ddp, opt, "early", rank, step, (early, after))
        theirs = dict(after.named_shadows())
        for name, s in early.named_shadows():
            assert torch.equal(s, theirs[name]), (step, name)
            assert all(torch.equal(o, s) for o in _gathered(s, world_size)), (step, name)
    # sharded shadows hold different shards by design: refused, nothing sent
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import Shard, distribute_tensor
    mesh = init_device_mesh("cpu", (world_size,))
    sharded = EMA([distribute_tensor(torch.ones(4, 3), mesh, [Shard(0)])])
    with pytest.raises(TypeError, match="shadow '0' is a DTensor"):
        sharded.broadcast_shadows()


def test_ema_made_before_ddp_is_equalized_by_broadcast_shadows():
    spawn(_before_ddp_worker, 2)


def test_broadcast_shadows_needs_a_process_group():
    ema = EMA(make_model(), decay=DECAY)
    with pytest.raises(RuntimeError, match="broadcast_shadows.*init_process_group"):
        ema.broadcast_shadows()
