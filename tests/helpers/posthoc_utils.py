"""Shared helpers of the PostHocEMA tests: a small model with every kind of tensor, a
seeded trajectory, and bit-for-bit comparison with separate EMAs."""
from __future__ import annotations

import torch
from torch import nn

from ema_fused import EMA
from ema_fused.schedules import karras_power


class Net(nn.Module):
    """Linear layers, a tied embedding/head pair, and BatchNorm (float + int buffers)."""

    def __init__(self, dtype: torch.dtype = torch.bfloat16, width: int = 13) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.emb = nn.Embedding(7, width)
        self.mid = nn.Linear(width, width)
        self.bn = nn.BatchNorm1d(width)
        self.head = nn.Linear(width, 7, bias=False)
        self.head.weight = self.emb.weight
        self.to(dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.bn(self.mid(self.emb(x))))


def train_step(model: nn.Module, gen: torch.Generator, drift: float = 0.0) -> None:
    """One simulated optimizer step (noise plus an optional drift) and a forward pass
    that moves the BatchNorm statistics."""
    with torch.no_grad():
        for p in model.parameters():
            noise = torch.randn(p.shape, generator=gen, dtype=torch.float64)
            p.add_((noise * 0.05 + drift).to(p.dtype))
        model.train()
        model(torch.randint(0, 7, (5,), generator=gen))


def separate(model: nn.Module, sigma_rels, **kwargs) -> list[EMA]:
    """The reference: one plain EMA per profile."""
    return [EMA(model, schedule=karras_power(sigma_rel=s), **kwargs) for s in sigma_rels]


def assert_profiles_equal(phema, refs: list[EMA]) -> None:
    """Every profile of ``phema`` equals its reference bit for bit, counters too."""
    assert len(phema.profiles) == len(refs)
    for k, ref in enumerate(refs):
        ours, theirs = phema.named_shadows(k), dict(ref.named_shadows())
        assert ours.keys() == theirs.keys()
        for name, t in theirs.items():
            assert ours[name].dtype == t.dtype, (k, name)
            assert torch.equal(ours[name], t), (
                f"profile {k}, {name}: max diff {(ours[name].double() - t.double()).abs().max()}")
        assert phema._emas[k].decay == ref.decay, k
        assert phema._emas[k].num_updates == ref.num_updates == phema.num_updates, k
