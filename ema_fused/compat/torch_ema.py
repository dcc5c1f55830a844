"""torch_ema's ``ExponentialMovingAverage`` over :class:`ema_fused.EMA`.

    from ema_fused.compat.torch_ema import ExponentialMovingAverage
    # was: from torch_ema import ExponentialMovingAverage

Same constructor, methods, attributes (``decay``, ``num_updates``, ``shadow_params``,
``collected_params``), ``state_dict`` format and numbers; the update is one fused pass.
Needs no torch_ema installed.
"""
from __future__ import annotations

import contextlib
import copy
from typing import Iterable, Iterator, Optional

import torch

from . import _decays
from . import _lists

Parameters = Optional[Iterable[torch.nn.Parameter]]


def _check_decay(decay: float) -> None:
    if decay < 0.0 or decay > 1.0:
        raise ValueError("Decay must be between 0 and 1")


class ExponentialMovingAverage:
    """Maintains an exponential moving average of a set of parameters (torch_ema's API).

    Args:
        parameters: the tensors to average (typically ``model.parameters()``); the
            shadows keep each one's dtype and device.
        decay: the decay.
        use_num_updates: use ``min(decay, (1 + n) / (10 + n))`` at the n-th update.

    ``update``, ``copy_to``, ``store``, ``restore`` and ``average_parameters`` take an
    optional list of parameters (default: the ones given here).  Unlike torch_ema the
    object keeps the parameters alive (torch_ema holds weak references), and
    ``average_parameters()`` swaps the averages in and out without a backup (it leaves
    ``collected_params`` as it was).
    """

    def __init__(self, parameters: Iterable[torch.nn.Parameter], decay: float,
                 use_num_updates: bool = True) -> None:
        _check_decay(decay)
        self.decay = decay
        self.num_updates = 0 if use_num_updates else None
        self._given = list(parameters)  # the default of every method's ``parameters``
        self._ema = _lists.list_ema(self._given)
        self._broken: Optional[tuple[str, list]] = None  # a checkpoint of the wrong shapes

    # torch_ema defers a shape error of a loaded checkpoint to the first use (its own
    # tests pin that: loading succeeds, copy_to() raises and writes nothing)
    def _usable(self) -> None:
        if self._broken is not None:
            raise RuntimeError(f"ExponentialMovingAverage: the loaded state does not fit the "
                               f"parameters: {self._broken[0]}")

    def _parameters(self, parameters: Parameters) -> Optional[list]:
        parameters = _lists.as_list(parameters)
        if parameters is not None and len(parameters) != len(self.shadow_params):
            raise ValueError("Number of parameters passed as argument is different from number "
                             "of shadow parameters maintained by this ExponentialMovingAverage")
        return parameters

    @property
    def shadow_params(self) -> list[torch.Tensor]:
        """The averages, one per parameter (the EMA's shadows themselves)."""
        if self._broken is not None:
            return self._broken[1]
        return _lists.shadow_list(self._ema)

    @property
    def collected_params(self) -> Optional[list[torch.Tensor]]:
        """What :meth:`store` kept, or None."""
        return _lists.stored_list(self._ema)

    def update(self, parameters: Parameters = None) -> None:
        """Advance the averages; call after each ``optimizer.step()``."""
        self._usable()
        parameters = self._parameters(parameters)
        decay = self.decay
        if self.num_updates is not None:
            self.num_updates += 1
            decay = _decays.counted(self.num_updates, decay)
        self._ema.update_from(parameters, decay=decay)

    def copy_to(self, parameters: Parameters = None) -> None:
        """Write the averages into ``parameters``."""
        self._usable()
        self._ema.copy_to(self._parameters(parameters))

    def store(self, parameters: Parameters = None) -> None:
        """Keep a copy of ``parameters`` for :meth:`restore`."""
        self._usable()
        self._ema.store(self._parameters(parameters))

    def restore(self, parameters: Parameters = None) -> None:
        """Put back what :meth:`store` kept (which stays kept, as in torch_ema)."""
        stored = self._ema.stored_weights()
        if stored is None:
            raise RuntimeError("This ExponentialMovingAverage has no `store()`ed weights to "
                               "`restore()`")
        self._usable()
        self._ema.restore(self._parameters(parameters))
        self._ema.load_stored_weights(stored)

    @contextlib.contextmanager
    def average_parameters(self, parameters: Parameters = None) -> Iterator[None]:
        """The averages in ``parameters`` inside the block, the parameters' own values after it."""
        self._usable()
        with self._ema.average_parameters(self._parameters(parameters)):
            yield

    def to(self, device=None, dtype=None) -> None:
        """Move the averages (and the stored copy) to ``device``; cast the floating ones to
        ``dtype``."""
        self._usable()
        self._ema.to(device=device, dtype=dtype)

    def state_dict(self) -> dict:
        """``decay``, ``num_updates``, ``shadow_params`` and ``collected_params`` (references)."""
        return {"decay": self.decay, "num_updates": self.num_updates,
                "shadow_params": self.shadow_params, "collected_params": self.collected_params}

    def load_state_dict(self, state_dict: dict) -> None:
        """Load :meth:`state_dict` output (torch_ema's or this class's); the averages are
        cast to each parameter's dtype and device, as torch_ema does."""
        state_dict = copy.deepcopy(state_dict)
        decay = state_dict["decay"]
        _check_decay(decay)
        num_updates = state_dict["num_updates"]
        assert num_updates is None or isinstance(num_updates, int), "Invalid num_updates"
        shadows = state_dict["shadow_params"]
        assert isinstance(shadows, list), "shadow_params must be a list"
        assert all(isinstance(p, torch.Tensor) for p in shadows), \
            "shadow_params must all be Tensors"
        collected = state_dict["collected_params"]
        if collected is not None:
            assert isinstance(collected, list), "collected_params must be a list"
            assert all(isinstance(p, torch.Tensor) for p in collected), \
                "collected_params must all be Tensors"
            assert len(collected) == len(shadows), \
                "collected_params and shadow_params had different lengths"
        if len(shadows) != len(_lists.shadow_list(self._ema)):
            raise ValueError("Tried to `load_state_dict()` with the wrong number of parameters "
                             "in the saved state.")
        self.decay, self.num_updates = decay, num_updates
        wrong = _lists.shape_mismatch(self._ema, shadows)
        if wrong is not None:
            self._broken = (wrong, shadows)
            return
        self._broken = None
        _lists.load_shadow_list(self._ema, shadows)
        if collected is not None:
            collected = [c.to(device=p.device, dtype=p.dtype)
                         for c, p in zip(collected, self._given)]
        _lists.load_stored_list(self._ema, collected)
