"""Where the shadows live and what ``store()`` kept (mixed into ``EMA``): ``to(device,
dtype)``, ``pin_memory()``, ``stored_weights()`` / ``load_stored_weights()``.

Moving the shadows by hand is what torch_ema's and diffusers' ``to()`` and diffusers'
``pin_memory()`` do (offloading an EMA between steps); the stored copy is public so
that their checkpoints, which carry it, round-trip.
"""
from __future__ import annotations

from typing import Mapping, Optional, Union

import torch

from .. import distributed as _distributed
from ..checks import FLOAT_DTYPES
from ..checks import devices as _devices
from .offload import for_ema


class ShadowPlacement:
    """``to``, ``pin_memory`` and the stored weights for :class:`ema_fused.EMA`."""

    def _check_movable(self, what: str) -> None:
        if self._device_schedule is not None:
            raise ValueError(f"EMA.{what}: not with capturable=True (a captured graph holds the "
                             "shadows' addresses)")
        if self._bound is not None:
            raise ValueError(f"EMA.{what}: the shadows are the tensors of a module "
                             "(shadow_module() / bind_shadows()): move that module instead")
        for e, s in zip(self._tracked.entries, self._shadows):
            if _distributed.is_dtensor(s):
                raise TypeError(f"EMA.{what}: shadow {e.name!r} is a DTensor; a sharded EMA's "
                                "shadows follow the model's shards")

    def to(self, device: Optional[Union[torch.device, str, int]] = None,
           dtype: Optional[torch.dtype] = None, non_blocking: bool = False):
        """Move the shadows (and what :meth:`store` kept) to ``device`` and/or cast the
        averaged shadows (and the floating stored tensors) to ``dtype``; returns the EMA.

        With a ``device`` the shadows stay there from now on (as with ``EMA(device=...)``):
        a model on another device is read in pieces at each update (an EMA made with
        ``non_blocking=True`` keeps its shadows on the host: another device is refused).
        A ``dtype`` is
        applied as asked, narrower ones included; an update from model tensors wider
        than their shadows then raises (nothing is rounded silently): cast back, or keep
        shadows at least as wide as the model.
        """
        with self._lock:
            self._guard("to")
            self._check_movable("to")
            if dtype is not None and dtype not in FLOAT_DTYPES:
                raise TypeError(f"EMA.to: dtype must be one of {FLOAT_DTYPES}, got {dtype}")
            offload = self._offload
            if device is not None:
                device = torch.device(device)
                if self.non_blocking and device.type != "cpu":
                    raise ValueError(f"EMA.to: device={str(device)!r}: this EMA was made with "
                                     "non_blocking=True, whose shadows stay on the host")
                missing = _devices.unavailable(device)
                if missing is not None:
                    raise RuntimeError(f"EMA.to: device={str(device)!r}: {missing}")
                if offload is None or device.type != "cpu":  # the host path, made or dropped
                    offload = for_ema(device, self.non_blocking, self._offload_threads, False)
            with torch.no_grad():
                self._shadows = [
                    s.to(device=device, dtype=dtype if e.averaged else None,
                         non_blocking=non_blocking)
                    for e, s in zip(self._tracked.entries, self._shadows)]
                if self._backup is not None:
                    self._backup = [
                        b.to(device=device, dtype=dtype if b.is_floating_point() else None,
                             non_blocking=non_blocking) for b in self._backup]
            if device is not None:
                self._device = device
                self._offload = offload  # the host path where the shadows now are on the host
            self._plan = None
            return self

    def pin_memory(self):
        """Put the shadows, which must be on the CPU, in pinned (page-locked) memory, so
        that copies to and from a GPU can be asynchronous; returns the EMA."""
        with self._lock:
            self._guard("pin_memory")
            self._check_movable("pin_memory")
            for e, s in zip(self._tracked.entries, self._shadows):
                if s.device.type != "cpu":
                    raise ValueError(f"EMA.pin_memory: shadow {e.name!r} is on {s.device}; only "
                                     "CPU tensors can be pinned (EMA.to('cpu') first)")
            try:
                pinned = [s.pin_memory() for s in self._shadows]
            except RuntimeError as exc:
                raise RuntimeError(f"EMA.pin_memory: pinned memory needs an accelerator: {exc}"
                                   ) from exc
            self._shadows = pinned
            self._plan = None
            return self

    def stored_weights(self) -> Optional[dict[str, torch.Tensor]]:
        """What :meth:`store` kept (not copies), by name as in :meth:`named_shadows`
        (aliases of tied tensors included), or None when nothing is stored."""
        with self._lock:
            if self._backup is None:
                return None
            return {name: self._backup[i] for name, i in self._tracked.aliases.items()}

    def load_stored_weights(self, weights: Optional[Mapping[str, torch.Tensor]]) -> None:
        """Set what :meth:`restore` puts back (None: forget it), as :meth:`stored_weights`
        gives it: a tensor for every tracked name (aliases may be left out), each of its
        tensor's (local) shape, any dtype.  Checked before anything is kept."""
        with self._lock:
            self._guard("load_stored_weights")
            if weights is None:
                self._backup = None
                return
            if not isinstance(weights, Mapping):
                raise TypeError("EMA.load_stored_weights: expected a mapping of names to tensors "
                                f"or None, got {type(weights).__name__}")
            entries = self._tracked.entries
            names = {e.name for e in entries}
            unknown = sorted(set(weights) - set(self._tracked.aliases))
            missing = sorted(names - set(weights))
            if unknown or missing:
                raise KeyError(f"EMA.load_stored_weights: missing {missing}, unexpected {unknown}")
            backup = []
            for e, s in zip(entries, _distributed.locals_of(self._shadows)):
                t = weights[e.name]
                if not isinstance(t, torch.Tensor) or t.shape != s.shape:
                    what = (f"shape {tuple(t.shape)}" if isinstance(t, torch.Tensor)
                            else f"a {type(t).__name__}")
                    raise ValueError(f"EMA.load_stored_weights: {e.name!r} must be a tensor of "
                                     f"shape {tuple(s.shape)}, got {what}")
                backup.append(t)
            self._backup = backup
