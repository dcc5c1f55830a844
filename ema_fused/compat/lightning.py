"""Lightning's ``WeightAveraging`` and ``EMAWeightAveraging`` callbacks over
:class:`ema_fused.compat.swa_utils.AveragedModel`.

    from ema_fused.compat.lightning import EMAWeightAveraging
    # was: from lightning.pytorch.callbacks import EMAWeightAveraging

They subclass Lightning's own classes, so every hook, argument, ``should_update`` rule
(``update_every_n_steps`` counts zero-based step indices: updates after global steps
1, n + 1, 2n + 1, ...), checkpoint key and attribute (``_average_model``,
``_latest_update_step``, ...) is Lightning's, and a subclass written for Lightning's
``WeightAveraging`` works on ours.  What changes: the averaged model is ema_fused's
``AveragedModel`` (one fused update for ``get_ema_avg_fn`` / SWA; any other ``avg_fn``
passes through to torch's loop), and the swap at validation and the copy at train end
are fused too.  Needs Lightning (imported here).
"""
from __future__ import annotations

import itertools
from typing import Any, Optional, Union

import torch
from lightning.pytorch import callbacks as _callbacks
from lightning.pytorch.utilities.model_helpers import is_overridden
from lightning.pytorch.utilities.rank_zero import rank_zero_warn

from ..ops import ema_copy_, ema_swap_
from .swa_utils import AveragedModel, get_ema_avg_fn

__all__ = ["WeightAveraging", "EMAWeightAveraging"]

# Lightning's classes, bound at import (code that puts ours in their place in
# lightning.pytorch.callbacks must not make ours their own base)
_LightningWeightAveraging = _callbacks.WeightAveraging
_LightningEMAWeightAveraging = _callbacks.EMAWeightAveraging


def _pairs(pl_module, average: AveragedModel) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """(averaged, current) for every parameter and then buffer, in Lightning's order."""
    averaged = itertools.chain(average.module.parameters(), average.module.buffers())
    current = itertools.chain(pl_module.parameters(), pl_module.buffers())
    return [(a.detach(), c.detach()) for a, c in zip(averaged, current)]


def _fusable(a: torch.Tensor, c: torch.Tensor) -> bool:
    """Whether ``ema_swap_`` can exchange the pair (one float dtype, one device)."""
    return a.is_floating_point() and a.dtype == c.dtype and a.device == c.device


class WeightAveraging(_LightningWeightAveraging):
    """Lightning's ``WeightAveraging`` (same arguments: ``device``, ``use_buffers``, and
    ``AveragedModel`` keyword arguments such as ``avg_fn`` / ``multi_avg_fn``) with
    ema_fused's ``AveragedModel``."""

    def __init__(self, device: Optional[Union[torch.device, str, int]] = None,
                 use_buffers: bool = True, **kwargs: Any) -> None:
        _LightningWeightAveraging.__init__(self, device=device, use_buffers=use_buffers,
                                           **kwargs)

    def setup(self, trainer, pl_module, stage: str) -> None:
        """At fit: ``configure_model`` (if overridden), then the averaged model."""
        if stage != "fit":
            return
        device = self._device or pl_module.device
        if is_overridden("configure_model", pl_module):
            rank_zero_warn("You're using the WeightAveraging callback with a model that overrides "
                           "the configure_model callback. WeightAveraging doesn't support "
                           "sharding model layers, so you may run out of memory.")
            pl_module.configure_model()
        self._average_model = AveragedModel(model=pl_module, device=device,
                                            use_buffers=self._use_buffers, **self._kwargs)

    @torch.no_grad()
    def _swap_models(self, pl_module) -> None:
        """Exchange the values of the current and the averaged weights (fused where both
        sides have one float dtype and device; others through a temporary, as Lightning)."""
        pairs = _pairs(pl_module, self._average_model)
        fused = [(a, c) for a, c in pairs if _fusable(a, c)]
        if fused:
            ema_swap_([a for a, _ in fused], [c for _, c in fused])
        for a, c in pairs:
            if not _fusable(a, c):
                tmp = a.clone()
                a.copy_(c)
                c.copy_(tmp)

    @torch.no_grad()
    def _copy_average_to_current(self, pl_module) -> None:
        """Write the averaged weights into the current model."""
        pairs = _pairs(pl_module, self._average_model)
        fused = [(a, c) for a, c in pairs if a.is_floating_point() and c.is_floating_point()]
        if fused:
            ema_copy_([c for _, c in fused], [a.to(c.device) for a, c in fused])
        for a, c in pairs:
            if not (a.is_floating_point() and c.is_floating_point()):
                c.copy_(a)


class EMAWeightAveraging(WeightAveraging, _LightningEMAWeightAveraging):
    """Lightning's ``EMAWeightAveraging`` (``decay``, ``update_every_n_steps``,
    ``update_starting_at_step``, ``update_starting_at_epoch`` and its ``should_update``)
    with the fused EMA."""

    def __init__(self, device: Optional[Union[torch.device, str, int]] = None,
                 use_buffers: bool = True, decay: float = 0.999, update_every_n_steps: int = 1,
                 update_starting_at_step: Optional[int] = None,
                 update_starting_at_epoch: Optional[int] = None, **kwargs: Any) -> None:
        WeightAveraging.__init__(self, device=device, use_buffers=use_buffers, **kwargs,
                                 avg_fn=get_ema_avg_fn(decay=decay))
        self.update_every_n_steps = update_every_n_steps
        self.update_starting_at_step = update_starting_at_step
        self.update_starting_at_epoch = update_starting_at_epoch
