"""``EMA.update_from``: one update with a decay the caller computed, from the tracked model
or from another module or tensor list of the same structure (mixed into ``EMA``).

For callers that keep their own step counters and decay rules (the peers' classes in
``ema_fused.compat``: torch_ema's ``update(parameters)``, diffusers' ``step(parameters)``,
timm's ``update(model, step)``, ``AveragedModel.update_parameters(model)``).  The tracked
model goes through the cached update plan of :meth:`EMA.update`; another source is read
by name (a module) or position (a list), checked like a read into another model
(``copy_to(other)``), and averaged in one pass per device, without a cached plan.
"""
from __future__ import annotations

from typing import Iterable, Optional, Union

import torch
from torch import nn

from ..checks import tensors as _validate
from . import rounding as _rounding
from .staging import copy_across_, update_across_
from .tracking import unwrap

Source = Union[nn.Module, Iterable[torch.Tensor]]


class ExplicitUpdates:
    """:meth:`update_from` for :class:`ema_fused.EMA`."""

    def update_from(self, source: Optional[Source] = None, *, decay: float) -> None:
        """One update with this ``decay``: ``shadow <- decay * shadow + (1 - decay) * x``
        for every tracked tensor ``x`` of ``source``; ``decay=0`` copies them, ``decay=1``
        leaves the shadows as they are (reading nothing).

        ``source``: None (the tracked model), or a module or tensor list of the same
        structure (names and shapes as the tracked model's; a list in the same order).
        Integer and float8 tensors are copied, as by :meth:`update`.  The step counter
        (``num_updates``) advances by one and ``decay`` becomes :attr:`decay`; the
        EMA's own schedule, ``update_after_step`` and ``update_every`` are not used.
        Not with ``capturable=True`` (its step and decay live on the device).
        """
        with self._lock:
            self._guard("update_from")
            if self._device_schedule is not None:
                raise ValueError("EMA.update_from: not with capturable=True, whose step and decay "
                                 "live on the device; call update()")
            decay = _validate.check_scalar("EMA.update_from", "decay", decay)
            self._follow_bound()
            weight, copy = (0.0, True) if decay == 0.0 else (1.0 - decay, False)
            if not isinstance(source, nn.Module) and source is not None:
                source = list(source)  # a generator (model.parameters()) is read once
            step = self._step + 1  # the update's own step (what keys stochastic rounding)
            self._settle_before(step)
            if self._is_tracked(source):
                self._average(weight, copy, step=step)
            else:
                self._average_other(source, weight, copy, step)
            self._step = step
            self._decay = decay
            self._decay_product *= decay

    def _is_tracked(self, source: Optional[Source]) -> bool:
        """Whether ``source`` is the tracked model (or the very tensors of the tracked list)."""
        if source is None:
            return True
        tracked = self._tracked
        if isinstance(source, nn.Module):
            return tracked.module is not None and unwrap(source) is tracked.module
        return (tracked.module is None and len(source) == len(tracked.tensors)
                and all(a is b for a, b in zip(source, tracked.tensors)))

    def _average_other(self, source: Source, weight: float, copy: bool, step: int) -> None:
        """:meth:`_average` for a source other than the tracked model (no cached plan).
        A stochastic update draws as :meth:`update` would from the tracked model: keyed by
        ``step`` and each tensor's position among the tracked ones."""
        ema_s, ema_p, copy_s, copy_p = self._split(self._read_locals(source))
        skip = self.skip_nonfinite
        if copy and skip:
            weight, copy = 1.0, False
        stochastic = None
        if self.rounding == "stochastic" and not copy:
            positions = [i for i, e in enumerate(self._tracked.entries) if e.averaged]
            stochastic = _rounding.spec(self.seed, step, positions)
        with torch.no_grad():
            if copy:
                copy_across_(ema_s, ema_p, 1.0, self._backend_request)
            elif weight != 0.0:
                update_across_(ema_s, ema_p, weight, self._backend_request, skip, stochastic)
            for s, p in zip(copy_s, copy_p):
                s.copy_(self._copied_value(s, p, None))
