"""Test helpers for the training-loop integrations: record the parameter trajectory that a
real optimizer produced, and replay it by hand into a reference ``EMA``.

The integration under test and the reference run the same kernels on the same values,
so their shadows must be bit-identical, not merely close.
"""
from __future__ import annotations

import copy
from typing import Mapping, Optional

import torch
from torch import nn

from ema_fused import EMA
from ema_fused.ema.checkpoint import plain_name


def snapshot(model: nn.Module) -> dict[str, torch.Tensor]:
    """A detached copy of every tensor in ``model.state_dict()``, under plain names."""
    return {plain_name(k): v.detach().clone() for k, v in model.state_dict().items()}


class Recorder:
    """Keeps ``snapshot(model)`` after every optimizer step, from a step post-hook."""

    def __init__(self, model: nn.Module, optimizer: torch.optim.Optimizer) -> None:
        self.model = model
        self.states: list[dict[str, torch.Tensor]] = []
        self.handle = optimizer.register_step_post_hook(self._hook)

    def _hook(self, optimizer, args, kwargs) -> None:
        self.states.append(snapshot(self.model))


def replay(initial: Mapping[str, torch.Tensor], template: nn.Module, states: list,
           steps: Optional[list[int]] = None, **ema_kwargs) -> EMA:
    """A reference EMA made from ``initial`` weights and updated by hand on ``states``
    (``update(step=k)`` for the k-th state, or the given ``steps``)."""
    model = copy.deepcopy(template)
    model.load_state_dict(dict(initial))
    ema = EMA(model, **ema_kwargs)
    for k, state in enumerate(states, start=1):
        model.load_state_dict(state)
        ema.update(step=k if steps is None else steps[k - 1])
    return ema


def shadows(ema: EMA) -> dict[str, torch.Tensor]:
    """``ema``'s raw shadows under plain names (``module.`` / ``_orig_mod.`` dropped)."""
    return {plain_name(k): v for k, v in ema.named_shadows()}


def assert_same_shadows(ours: EMA, ref: EMA) -> None:
    """Every shadow of ``ref`` equals ours bit for bit, same dtype; nothing extra either side."""
    a, b = shadows(ours), shadows(ref)
    assert a.keys() == b.keys()
    for name in b:
        assert a[name].dtype == b[name].dtype, name
        assert torch.equal(a[name], b[name]), f"{name}: max diff {(a[name] - b[name]).abs().max()}"
    assert ours.num_updates == ref.num_updates


def assert_state_equal(a: Mapping[str, torch.Tensor], b: Mapping[str, torch.Tensor]) -> None:
    """Two plain-named state dicts hold the same tensors, bit for bit."""
    assert a.keys() == b.keys()
    for name in a:
        assert torch.equal(a[name], b[name]), name
