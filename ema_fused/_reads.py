"""The read side of ``EMA``: averaged weights into a model and back (mixed into ``EMA``).

Kept apart from the update rules in ``ema.py``; it uses the EMA's ``_tracked``,
``_shadows``, ``bias_correction``, ``_backend_request``, swap guard and
``_follow_sharding``.  DTensors are read and written as their local shards
(:mod:`ema_fused.distributed`): no read but ``averaged_weights(full_state_dict=True)``
communicates.
"""
from __future__ import annotations

import contextlib
from typing import Iterator, Optional

import torch

from . import distributed as _distributed
from ._staging import copy_across_
from ._tracking import ModelChangedError, Source, unwrap
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

    def _read_locals(self, model: Optional[Source] = None) -> list[torch.Tensor]:
        """The local tensors of ``model`` (default: the tracked model, whose layout the
        shadows follow first: a model sharded after the EMA was made), each checked to
        be laid out like its shadow.  FSDP2 modules are resharded first (no
        communication), so that a forward after a write all-gathers the written shards,
        never an unsharded copy of the weights from before."""
        model = unwrap(model)
        _distributed.reshard_fsdp(model if model is not None else self._tracked.module)
        live = self._tracked.read(model)
        if model is None or model is self._tracked.module:
            self._follow_sharding(live)
        else:
            for e, s, t in zip(self._tracked.entries, self._shadows, live):
                _distributed.check_target(e.name, s, t)
        return _distributed.locals_of(live)

    def _sync_sharding(self) -> None:
        """Before handing out shadows: follow a model sharded since the last use (only
        possible once ``torch.distributed.tensor`` is imported).  Other mismatches are
        left to the next update or read, which name them: the shadows themselves are
        fine to hand out whatever state the model is in."""
        if not _distributed.is_dtensor_possible():
            return
        try:
            live = self._tracked.read()
        except ModelChangedError:
            return
        if any(_distributed.is_dtensor(t) and not _distributed.is_dtensor(s)
               for s, t in zip(self._shadows, live)):
            self._follow_sharding(live)

    def named_shadows(self) -> Iterator[tuple[str, torch.Tensor]]:
        """``(name, shadow)`` for every tracked name (raw shadows, no bias correction;
        DTensors where the model's tensors are DTensors)."""
        self._not_swapped("named_shadows")
        self._sync_sharding()
        for name, i in self._tracked.aliases.items():
            yield name, self._shadows[i]

    def averaged_weights(self, full_state_dict: bool = False,
                         cpu_offload: bool = False) -> dict[str, torch.Tensor]:
        """New tensors holding the averaged weights (bias-corrected), in the shadow dtypes.

        Names and meanings as in torch's ``StateDictOptions``: by default DTensors where
        the model's tensors are DTensors (no communication); ``full_state_dict=True``
        gives plain full tensors, gathered one tensor at a time (every rank must call
        it); ``cpu_offload=True`` puts the tensors on the CPU, and with
        ``full_state_dict=True`` only global rank 0 gets them (the others get ``{}``):
        ready for ``torch.save`` or safetensors.
        """
        self._not_swapped("averaged_weights")
        self._sync_sharding()
        scale = self._read_scale()
        entries = self._tracked.entries

        def read(i: int) -> torch.Tensor:
            s = _distributed.local(self._shadows[i])
            return s * scale if entries[i].averaged and scale != 1.0 else s.clone()

        with torch.no_grad():
            values = _distributed.export(self._shadows, read, bool(full_state_dict),
                                         bool(cpu_offload))
        if values is None:
            return {}
        return {name: values[i] for name, i in self._tracked.aliases.items()}

    def copy_to(self, model: Optional[Source] = None) -> None:
        """Write the averaged weights into ``model`` (default: the tracked model)."""
        self._not_swapped("copy_to")
        scale = self._read_scale()
        targets = self._read_locals(model)
        pairs = list(zip(self._tracked.entries, targets, _distributed.locals_of(self._shadows)))
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
            self._backup = [t.clone() for t in self._read_locals(model)]

    def restore(self, model: Optional[Source] = None) -> None:
        """Put back the tensors saved by :meth:`store` (and forget them)."""
        if self._backup is None:
            raise RuntimeError("EMA.restore: nothing stored; call store() first")
        targets = self._read_locals(model)
        for e, t, b in zip(self._tracked.entries, targets, self._backup):
            if t.shape != b.shape:  # the model was resharded since store(): nothing written
                raise ModelChangedError(f"EMA.restore: the local shard of {e.name!r} is now "
                                        f"{tuple(t.shape)}, stored {tuple(b.shape)}")
        with torch.no_grad():
            for t, b in zip(targets, self._backup):
                t.copy_(b)
        self._backup = None

    @contextlib.contextmanager
    def average_parameters(self, model: Optional[Source] = None) -> Iterator[None]:
        """Evaluate with the averaged weights inside the block; the model is always restored.

        When every shadow has its model tensor's dtype and device (and there is no bias
        correction to apply) the two are swapped in place, twice, with no backup copy of
        the model; otherwise the model is stored, overwritten and restored.
        """
        targets = self._read_locals(model)
        shadows = _distributed.locals_of(self._shadows)
        if self.bias_correction or any(t.dtype != s.dtype or t.device != s.device
                                       for t, s in zip(targets, shadows)):
            self.store(model)
            try:
                self.copy_to(model)
                yield
            finally:
                self.restore(model)
            return
        self._not_swapped("average_parameters")
        with torch.no_grad():
            dispatch("swap", targets, shadows, 0.0, self._backend_request)
        self._swapped = True
        try:
            yield
        finally:
            # a forward inside may have left FSDP2 modules unsharded (holding the EMA
            # weights): reshard them so that the next forward gathers the model's own
            _distributed.reshard_fsdp(unwrap(model) if model is not None else self._tracked.module)
            with torch.no_grad():
                dispatch("swap", targets, shadows, 0.0, self._backend_request)
            self._swapped = False
