"""The EMA tests' small model, its stand-in optimizer step, and the documented step rules
in float64 (the reference every EMA test compares with)."""
from __future__ import annotations

import torch
from torch import nn

from helpers.numerics import rand


def make_model(dtype=torch.float32, seed=0) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(7, 13), nn.BatchNorm1d(13), nn.ReLU(), nn.Linear(13, 5)).to(dtype)


def train_step(model: nn.Module, gen: torch.Generator) -> None:
    """A stand-in for an optimizer step: move every parameter, and the BatchNorm stats."""
    with torch.no_grad():
        for p in model.parameters():
            p.add_(rand(p.shape, p.dtype, gen, scale=0.1))
        model.train()
        dtype = next(model.parameters()).dtype
        model(rand((9, 7), dtype, gen))


class Reference:
    """The documented rules in float64, on a dict of tensors."""

    def __init__(self, tensors, schedule, update_after_step=0, update_every=1, bias=False):
        self.s = {n: (torch.zeros_like(t, dtype=torch.float64) if bias else t.double().clone())
                  if t.is_floating_point() else t.clone() for n, t in tensors.items()}
        self.schedule, self.a, self.k, self.bias = schedule, update_after_step, update_every, bias
        self.counter, self.prod, self.decay = 0, 1.0, None

    def update(self, tensors, step=None):
        step = self.counter + 1 if step is None else step
        self.counter = step
        if step % self.k:
            return
        d = 0.0 if step <= self.a else self.schedule(step - self.a)
        for n, t in tensors.items():
            if t.is_floating_point():
                self.s[n] = d * self.s[n] + (1 - d) * t.double()
            else:  # integer buffers are copied
                self.s[n] = t.clone()
        self.prod *= d
        self.decay = d

    def read(self):
        scale = 1 / (1 - self.prod) if self.bias else 1.0
        return {n: v * scale if v.is_floating_point() else v for n, v in self.s.items()}
