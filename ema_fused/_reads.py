"""The read side of ``EMA``: averaged weights into a model and back (mixed into ``EMA``).

Kept apart from the update rules in ``ema.py``; it uses the EMA's ``_tracked``,
``_shadows``, ``bias_correction``, ``_backend_request`` and swap guard.
"""
from __future__ import annotations

import contextlib
from typing import Iterator, Optional

import torch

from ._staging import copy_across_
from ._tracking import Source
from .ops import dispatch


class AveragedReads:
    """``named_shadows``, ``averaged_weights``, ``copy_to``, ``store``/``restore`` and
    ``average_parameters`` for :class:`ema_fused.EMA`."""

    def _read_scale(self) -> float:
        if not self.bias_correction:
            return 1.0
        product = (self._decay_product if self._device_schedule is None
                   else float(self._device_schedule.product.item()))
        norm = 1.0 - product
        if norm <= 0.0:
            raise RuntimeError("EMA: with bias_correction=True the average is undefined until "
                               "an update with decay < 1 has run")
        return 1.0 / norm

    def named_shadows(self) -> Iterator[tuple[str, torch.Tensor]]:
        """``(name, shadow)`` for every tracked name (raw shadows, no bias correction)."""
        self._not_swapped("named_shadows")
        for name, i in self._tracked.aliases.items():
            yield name, self._shadows[i]

    def averaged_weights(self) -> dict[str, torch.Tensor]:
        """New tensors holding the averaged weights (bias-corrected), in the shadow dtypes."""
        self._not_swapped("averaged_weights")
        scale = self._read_scale()
        out = {}
        with torch.no_grad():
            copies = [s * scale if e.averaged and scale != 1.0 else s.clone()
                      for e, s in zip(self._tracked.entries, self._shadows)]
        for name, i in self._tracked.aliases.items():
            out[name] = copies[i]
        return out

    def copy_to(self, model: Optional[Source] = None) -> None:
        """Write the averaged weights into ``model`` (default: the tracked model)."""
        self._not_swapped("copy_to")
        scale = self._read_scale()
        targets = self._tracked.read(model)
        pairs = list(zip(self._tracked.entries, targets, self._shadows))
        with torch.no_grad():
            copy_across_([t for e, t, _ in pairs if e.averaged],
                         [s for e, _, s in pairs if e.averaged], scale, self._backend_request)
            for e, t, s in pairs:
                if not e.averaged:
                    t.copy_(s)

    def store(self, model: Optional[Source] = None) -> None:
        """Keep a copy of the model's current tensors for :meth:`restore`."""
        self._not_swapped("store")
        with torch.no_grad():
            self._backup = [t.clone() for t in self._tracked.read(model)]

    def restore(self, model: Optional[Source] = None) -> None:
        """Put back the tensors saved by :meth:`store` (and forget them)."""
        if self._backup is None:
            raise RuntimeError("EMA.restore: nothing stored; call store() first")
        with torch.no_grad():
            for t, b in zip(self._tracked.read(model), self._backup):
                t.copy_(b)
        self._backup = None

    @contextlib.contextmanager
    def average_parameters(self, model: Optional[Source] = None) -> Iterator[None]:
        """Evaluate with the averaged weights inside the block; the model is always restored.

        When every shadow has its model tensor's dtype and device (and there is no bias
        correction to apply) the two are swapped in place, twice, with no backup copy of
        the model; otherwise the model is stored, overwritten and restored.
        """
        targets = self._tracked.read(model)
        if self.bias_correction or any(t.dtype != s.dtype or t.device != s.device
                                       for t, s in zip(targets, self._shadows)):
            self.store(model)
            try:
                self.copy_to(model)
                yield
            finally:
                self.restore(model)
            return
        self._not_swapped("average_parameters")
        with torch.no_grad():
            dispatch("swap", targets, self._shadows, 0.0, self._backend_request)
        self._swapped = True
        try:
            yield
        finally:
            with torch.no_grad():
                dispatch("swap", targets, self._shadows, 0.0, self._backend_request)
            self._swapped = False
