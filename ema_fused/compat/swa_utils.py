"""torch's ``AveragedModel`` and averaging-function factories (``torch.optim.swa_utils``)
over :class:`ema_fused.EMA`.

    from ema_fused.compat.swa_utils import AveragedModel, get_ema_multi_avg_fn
    # was: from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn

``AveragedModel.module`` is the averaged copy (``EMA.shadow_module()``), ``n_averaged``
a buffer, ``state_dict()`` torch's format.  ``update_parameters`` is one fused pass for
the functions made here and for the default (SWA); any other ``avg_fn`` /
``multi_avg_fn`` runs through torch's own ``update_parameters``, unfused.  The functions
made here are picklable objects that do the same math when called directly (also when
given to torch's ``AveragedModel``).  ``SWALR`` and ``update_bn`` are torch's.
"""
from __future__ import annotations

from typing import Callable, Optional, Union

import torch
from torch import Tensor, nn
from torch.optim.swa_utils import SWALR, update_bn
from torch.optim.swa_utils import AveragedModel as _TorchAveragedModel

from ..ema import EMA
from ..ops import ema_update_
from ..schedules import swa

__all__ = ["AveragedModel", "get_ema_multi_avg_fn", "get_swa_multi_avg_fn", "get_ema_avg_fn",
           "get_swa_avg_fn", "SWALR", "update_bn"]


def _check_decay(decay: float) -> None:
    if decay < 0.0 or decay > 1.0:
        raise ValueError(f"Invalid decay value {decay} provided. Please provide a value in "
                         "[0,1] range.")


class _Average:
    """A recognised averaging function: ``decay`` a number (EMA) or None (SWA)."""

    def __init__(self, decay: Optional[float]) -> None:
        if decay is not None:
            _check_decay(decay)
        self.decay = decay

    def weight(self, num_averaged: Union[Tensor, int]) -> float:
        """The lerp weight of an update after ``num_averaged`` models."""
        if self.decay is not None:
            return 1.0 - self.decay
        return 1.0 / (int(num_averaged) + 1)

    def __repr__(self) -> str:
        what = "swa" if self.decay is None else f"ema, decay={self.decay}"
        return f"{type(self).__name__}({what})"


class _MultiAverage(_Average):
    """``fn(averaged_list, current_list, num_averaged)``, in place (fused)."""

    @torch.no_grad()
    def __call__(self, averaged: list[Tensor], current: list[Tensor],
                 num_averaged: Union[Tensor, int]) -> None:
        weight = self.weight(num_averaged)
        floats = [i for i, a in enumerate(averaged) if a.is_floating_point()]
        ema_update_([averaged[i] for i in floats], [current[i] for i in floats], weight)
        for a, c in zip(averaged, current):
            if not a.is_floating_point():  # integer tensors: torch's formula, truncated
                a.copy_(a + (c - a) * weight)


class _SingleAverage(_Average):
    """``fn(averaged, current, num_averaged) -> new averaged`` (torch's formulas)."""

    @torch.no_grad()
    def __call__(self, averaged: Tensor, current: Tensor,
                 num_averaged: Union[Tensor, int]) -> Tensor:
        if self.decay is not None:
            return self.decay * averaged + (1 - self.decay) * current
        return averaged + (current - averaged) / (num_averaged + 1)


def get_ema_multi_avg_fn(decay: float = 0.999) -> _MultiAverage:
    """The EMA over lists, in place: ``averaged <- lerp(averaged, current, 1 - decay)``."""
    return _MultiAverage(decay)


def get_swa_multi_avg_fn() -> _MultiAverage:
    """The running mean over lists, in place: ``lerp(averaged, current, 1 / (n + 1))``."""
    return _MultiAverage(None)


def get_ema_avg_fn(decay: float = 0.999) -> _SingleAverage:
    """The EMA of one tensor: ``decay * averaged + (1 - decay) * current``."""
    return _SingleAverage(decay)


def get_swa_avg_fn() -> _SingleAverage:
    """The running mean of one tensor: ``averaged + (current - averaged) / (n + 1)``."""
    return _SingleAverage(None)


#: torch's own update (bound at import, so that code replacing torch's class by this one
#: still reaches torch's loop for the functions it does not fuse)
_TORCH_UPDATE = _TorchAveragedModel.update_parameters


class AveragedModel(nn.Module):
    """An averaged copy of ``model`` for SWA or EMA (torch's API).

    Args:
        model: the model to average (the copy is ``self.module``).
        device: where the averaged copy lives (default: beside the model).
        avg_fn / multi_avg_fn: the averaging function (at most one); the default is SWA.
        use_buffers: average the buffers too (else they are copied at each update).
            Integer buffers are copied either way (torch pushes them through the float
            formula and truncates).
    """

    n_averaged: Tensor

    def __init__(self, model: nn.Module, device: Optional[Union[int, torch.device]] = None,
                 avg_fn: Optional[Callable[[Tensor, Tensor, Union[Tensor, int]], Tensor]] = None,
                 multi_avg_fn: Optional[Callable[[list, list, Union[Tensor, int]], None]] = None,
                 use_buffers: bool = False) -> None:
        super().__init__()
        if avg_fn is not None and multi_avg_fn is not None:
            raise AssertionError("Only one of avg_fn and multi_avg_fn should be provided")
        self._ema = EMA(model, dtype=None, device=device,
                        buffers="ema" if use_buffers else "copy")
        self.module = self._ema.shadow_module()
        self.register_buffer("n_averaged", torch.tensor(0, dtype=torch.long, device=device))
        self.avg_fn = avg_fn
        self.multi_avg_fn = multi_avg_fn
        self.use_buffers = use_buffers

    def forward(self, *args, **kwargs):
        return self.module(*args, **kwargs)

    def _recognised(self) -> Optional[_Average]:
        """The fused function to run: ours, or SWA where none was given; None otherwise."""
        fn = self.avg_fn if self.avg_fn is not None else self.multi_avg_fn
        if fn is None:
            return _MultiAverage(None)
        return fn if isinstance(fn, _Average) else None

    def update_parameters(self, model: nn.Module) -> None:
        """Average ``model`` in (the first call copies it); ``n_averaged`` counts the calls."""
        fn = self._recognised()
        if fn is None:  # a function of the user's: torch's own update, unfused
            _TORCH_UPDATE(self, model)
            return
        n = int(self.n_averaged.item())
        # decay = 1 - weight: the SWA weight 1/(n+1) is swa()'s decay at update n + 1
        decay = 0.0 if n == 0 else (fn.decay if fn.decay is not None else swa()(n + 1))
        self._ema.update_from(model, decay=decay)
        self.n_averaged += 1
