"""Writes legacy_checkpoints.pt: an ``EMA`` and a ``PostHocEMA`` ``state_dict()``
with the shadows they held, for the test that checkpoints keep loading across
releases (tests/ema/test_legacy_checkpoints.py).

The committed file was written at commit 5812783 (before the package was regrouped into
subpackages); run ``python tests/data/make_legacy_checkpoints.py`` only to make a new
one on purpose, never to refresh the old one.
"""
from __future__ import annotations

import os
import tempfile

import torch
from torch import nn

from ema_fused import EMA, PostHocEMA

HERE = os.path.dirname(os.path.abspath(__file__))
OUT = os.path.join(HERE, "legacy_checkpoints.pt")


def build_model() -> nn.Module:
    """A small model with a float buffer and an integer buffer, from a fixed seed."""
    torch.manual_seed(1234)
    return nn.Sequential(nn.Linear(5, 7), nn.BatchNorm1d(7), nn.ReLU(), nn.Linear(7, 3))


def drift(model: nn.Module, step: int) -> None:
    """A deterministic change of every parameter and of the BatchNorm statistics."""
    g = torch.Generator().manual_seed(step)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn(p.shape, generator=g) * 0.1)
        model(torch.randn(9, 5, generator=g))  # train mode: running stats move


def main() -> None:
    model = build_model()
    ema = EMA(model, decay=0.9, update_after_step=1, bias_correction=True)
    phema = PostHocEMA(model, sigma_rels=(0.05, 0.2), snapshot_every=2)
    for step in range(1, 6):
        drift(model, step)
        ema.update(step)
        phema.update(step)
    payload = {
        "ema": ema.state_dict(),
        "ema_shadows": {k: v.clone() for k, v in dict(ema.named_shadows()).items()},
        "phema": phema.state_dict(),
        "phema_shadows": [{k: v.clone() for k, v in dict(phema.named_shadows(k_)).items()}
                          for k_ in range(2)],
        "phema_synthesized": phema.synthesize(0.1),
    }
    torch.save(payload, OUT)
    print("wrote", OUT)


if __name__ == "__main__":
    main()
