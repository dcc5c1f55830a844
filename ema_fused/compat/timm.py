"""timm's ``ModelEmaV2`` and ``ModelEmaV3`` (``timm.utils``) over :class:`ema_fused.EMA`.

    from ema_fused.compat.timm import ModelEmaV3   # was: from timm.utils import ModelEmaV3

Same constructors, methods and attributes; ``.module`` is the averaged copy of the model
(``EMA.shadow_module()``: its tensors are the shadows), so ``model_ema.module`` evaluates
and ``state_dict()`` saves exactly as timm's (keys ``module.<name>``).  Needs no timm
installed.  Integer buffers (BatchNorm's ``num_batches_tracked``) are copied, not pushed
through the float formula as timm does.
"""
from __future__ import annotations

from typing import Optional

import torch
from torch import nn

from ..ema import EMA
from . import _decays


class ModelEmaV2(nn.Module):
    """Model exponential moving average V2 (timm's API): ``update(model)`` averages every
    parameter and buffer with ``decay``; ``set(model)`` copies them.

    The averages keep the model's dtypes (as timm's deep copy does); ``device`` puts
    them elsewhere (e.g. ``"cpu"``).
    """

    def __init__(self, model: nn.Module, decay: float = 0.9999,
                 device: Optional[torch.device] = None) -> None:
        super().__init__()
        self.decay = decay
        self.device = device  # where the averages live, if not beside the model
        self._ema = EMA(model, dtype=None, device=device)
        self.module = self._ema.shadow_module()
        self.module.eval()

    def update(self, model: nn.Module) -> None:
        """Average ``model`` in with ``self.decay``."""
        self._ema.update_from(model, decay=self.decay)

    def set(self, model: nn.Module) -> None:
        """Copy ``model`` into the averages."""
        self._ema.update_from(model, decay=0.0)

    def forward(self, *args, **kwargs):
        return self.module(*args, **kwargs)


def _rounds_bf16(model: nn.Module, dtype: Optional[torch.dtype]) -> bool:
    """Whether timm would round any averaged tensor stochastically: a bfloat16 one."""
    if dtype is not None:
        return dtype == torch.bfloat16
    return any(t.dtype == torch.bfloat16 for t in model.state_dict().values()
               if isinstance(t, torch.Tensor))


class ModelEmaV3(nn.Module):
    """Model exponential moving average V3 (timm's API).

    Args as timm's: ``decay``, ``min_decay``, ``update_after_step``, ``use_warmup``,
    ``warmup_gamma``, ``warmup_power`` (the decay at ``update(model, step)``; without a
    step, ``decay``), ``device``, ``dtype`` (the averages' dtype, e.g. ``torch.float32``
    for a bf16 model), ``stochastic_rounding`` and its seed (bfloat16 averages are
    rounded stochastically by ema_fused's kernels: the same statistics as timm's, not the
    same random bits), ``foreach`` (kept for the API: the update is fused either way) and
    ``exclude_buffers`` (buffers copied, not averaged).
    """

    def __init__(self, model: nn.Module, decay: float = 0.9999, min_decay: float = 0.0,
                 update_after_step: int = 0, use_warmup: bool = False,
                 warmup_gamma: float = 1.0, warmup_power: float = 2 / 3,
                 device: Optional[torch.device] = None, dtype: Optional[torch.dtype] = None,
                 stochastic_rounding: bool = True, stochastic_rounding_seed: int = 0,
                 foreach: bool = True, exclude_buffers: bool = False) -> None:
        super().__init__()
        self.decay, self.min_decay = decay, min_decay
        self.update_after_step = update_after_step
        self.use_warmup = use_warmup
        self.warmup_gamma, self.warmup_power = warmup_gamma, warmup_power
        self.foreach = foreach
        self.device, self.dtype = device, dtype
        self.stochastic_rounding = stochastic_rounding
        self.stochastic_rounding_seed = stochastic_rounding_seed
        self.exclude_buffers = exclude_buffers
        options = {}
        if stochastic_rounding and _rounds_bf16(model, dtype):
            options = {"rounding": "stochastic", "seed": stochastic_rounding_seed}
        self._ema = EMA(model, dtype=dtype, device=device,
                        buffers="copy" if exclude_buffers else "ema", **options)
        self.module = self._ema.shadow_module()
        self.module.eval()

    def get_decay(self, step: Optional[int] = None) -> float:
        """The decay of ``update(model, step)``: ``decay`` without a step; with one, 0.0 up
        to ``update_after_step + 1``, then ``decay`` or the warmup's value."""
        if step is None:
            return self.decay
        n = max(0, step - self.update_after_step - 1)
        if n <= 0:
            return 0.0
        if self.use_warmup:
            return _decays.power(n + 1, self.decay, self.warmup_gamma, self.warmup_power,
                                 self.min_decay)
        return self.decay

    @torch.no_grad()
    def update(self, model: nn.Module, step: Optional[int] = None) -> None:
        """Average ``model`` in with ``get_decay(step)``."""
        self._ema.update_from(model, decay=self.get_decay(step))

    @torch.no_grad()
    def set(self, model: nn.Module) -> None:
        """Copy ``model`` into the averages (buffers included)."""
        self._ema.update_from(model, decay=0.0)

    def forward(self, *args, **kwargs):
        return self.module(*args, **kwargs)
