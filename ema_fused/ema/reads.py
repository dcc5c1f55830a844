"""The read side of ``EMA``: averaged weights into a model and back (mixed into ``EMA``).

Kept apart from the update rules in ``ema.py``; it uses the EMA's ``_tracked``,
``_shadows``, ``bias_correction``, ``_backend_request``, swap guard and
``_follow_sharding``.  DTensors are read and written as their local shards
(:mod:`ema_fused.distributed`): no read but ``averaged_weights(full_state_dict=True)``
communicates.
"""
from __future__ import annotations

import contextlib
import threading
from typing import Iterator, Optional

import torch

from .. import distributed as _distributed
from ..ops import dispatch
from .staging import copy_across_
from .tracking import ModelChangedError, Source, unwrap


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
        self._follow_bound()
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
        fine to hand out whatever state the model is in.  Shadows held by a module
        (``shadow_module``) are taken afresh from it first."""
        self._follow_bound()
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
        with self._lock:
            self._guard("named_shadows", reads_shadows=True)
            self._sync_sharding()
            pairs = [(name, self._shadows[i]) for name, i in self._tracked.aliases.items()]
        return iter(pairs)

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
        with self._lock:
            self._guard("averaged_weights", reads_shadows=True)
            return self._averaged_weights(bool(full_state_dict), bool(cpu_offload))

    def _averaged_weights(self, full_state_dict: bool, cpu_offload: bool) -> dict:
        self._sync_sharding()
        scale = self._read_scale()
        entries = self._tracked.entries

        def read(i: int) -> torch.Tensor:
            s = _distributed.local(self._shadows[i])
            return s * scale if entries[i].averaged and scale != 1.0 else s.clone()

        with torch.no_grad():
            values = _distributed.export(self._shadows, read, full_state_dict, cpu_offload)
        if values is None:
            return {}
        return {name: values[i] for name, i in self._tracked.aliases.items()}

    def copy_to(self, model: Optional[Source] = None) -> None:
        """Write the averaged weights into ``model`` (default: the tracked model)."""
        with self._lock:
            self._guard("copy_to")
            self._copy_to(model)

    def _copy_to(self, model: Optional[Source]) -> None:
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
        with self._lock:
            self._guard("store")
            with torch.no_grad():
                self._backup = [t.clone() for t in self._read_locals(model)]

    def restore(self, model: Optional[Source] = None) -> None:
        """Put back the tensors saved by :meth:`store` (and forget them)."""
        with self._lock:
            self._guard("restore")
            if self._backup is None:
                raise RuntimeError("EMA.restore: nothing stored; call store() first")
            self._put_back(self._read_locals(model), self._backup)
            self._backup = None

    def _put_back(self, targets: list[torch.Tensor], backup: list[torch.Tensor]) -> None:
        for e, t, b in zip(self._tracked.entries, targets, backup):
            if t.shape != b.shape:  # the model was resharded since store(): nothing written
                raise ModelChangedError(f"EMA.restore: the local shard of {e.name!r} is now "
                                        f"{tuple(t.shape)}, stored {tuple(b.shape)}")
        with torch.no_grad():
            for t, b in zip(targets, backup):
                t.copy_(b)

    @contextlib.contextmanager
    def average_parameters(self, model: Optional[Source] = None) -> Iterator[None]:
        """Evaluate with the averaged weights inside the block; the model is always restored.

        When every shadow has its model tensor's dtype and device (and there is no bias
        correction to apply) the two are swapped in place, twice, with no backup copy of
        the model; otherwise the model is saved, overwritten and put back.  Either way the
        tensors' version counters are bumped, so a backward through a forward of the
        other weights raises autograd's in-place error.  Inside the block the EMA refuses
        (from any thread) what would change the shadows or the model: ``update``,
        ``store``/``restore``, ``copy_to``, ``load_state_dict`` and a nested block; on the
        swap path also the reads of the shadows, which hold the model's weights then.
        """
        with self._lock:
            self._guard("average_parameters")
            targets = self._read_locals(model)
            shadows = _distributed.locals_of(self._shadows)
            swap = not self.bias_correction and all(
                t.dtype == s.dtype and t.device == s.device for t, s in zip(targets, shadows))
            if swap:
                self._swap(targets, shadows)
                self._swapped = True
            else:
                with torch.no_grad():
                    backup = [t.clone() for t in targets]
                self._copy_to(model)
                torch.autograd.graph.increment_version(targets)
            self._inside = threading.get_ident()
        try:
            yield
        finally:
            with self._lock:
                try:
                    if swap:
                        # a forward inside may have left FSDP2 modules unsharded (holding
                        # the EMA weights): reshard them so the next forward gathers the
                        # model's own
                        _distributed.reshard_fsdp(unwrap(model) if model is not None
                                                  else self._tracked.module)
                        self._swap(targets, shadows)
                    else:
                        # read afresh: this reshards FSDP2 modules that a forward inside
                        # left unsharded, so the weights go back into the shards
                        targets = self._read_locals(model)
                        self._put_back(targets, backup)
                        torch.autograd.graph.increment_version(targets)
                finally:
                    self._inside, self._swapped = None, False

    def _swap(self, targets: list[torch.Tensor], shadows: list[torch.Tensor]) -> None:
        """Exchange model tensors and shadows; the kernels write through raw pointers, so
        the version counters are bumped here, as an in-place op of torch's would."""
        with torch.no_grad():
            dispatch("swap", targets, shadows, 0.0, self._backend_request)
        torch.autograd.graph.increment_version(targets)
        torch.autograd.graph.increment_version(shadows)
