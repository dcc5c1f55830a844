"""One update's pass over the tracked tensors (mixed into ``EMA``): the cached plan of
pairs and per-device backends (``_Plan``), rebuilt when a tensor's storage, dtype, device,
layout or shape changed, so a stale address is never written; the shadows following a
model that was sharded or moved; and the pass itself (``_average``), through the cached
plan, the staged cross-device path or the offloaded host path.
"""
from __future__ import annotations

from typing import Optional

import torch

from .. import distributed as _distributed
from ..backends import selection as _backend
from ..checks import tensors as _validate
from ..ops import indices_by_device
from . import host_path as _host_path
from . import rounding as _rounding
from .model_checks import check_not_meta
from .offload_layout import Layout
from .staging import copy_across_, update_across_

_SAME_SIZE_INT = {1: torch.uint8, 2: torch.int16, 4: torch.int32, 8: torch.int64}


class _Plan:
    """One update's work: averaged pairs, their per-device backends, copied pairs."""

    def __init__(self, ema_s: list, ema_p: list, copy_s: list, copy_p: list) -> None:
        self.ema_s, self.ema_p, self.copy_s, self.copy_p = ema_s, ema_p, copy_s, copy_p
        self.groups: Optional[list] = None  # [(backend, shadows, params, prepared)]; None: staged
        self.positions: list[int] = []  # of ema_s: their tracked-tensor indices
        self.group_positions: list[list[int]] = []  # of each group's shadows
        self.key: Optional[list] = None  # the Python check, where there is no snapshot
        self.snapshot = None  # host_path's C++ check, where the extension is loaded
        self.layout: Optional[Layout] = None  # offloaded shadows: slots and pieces, made once


class PlannedPass:
    """``_average`` and its cached plan for :class:`ema_fused.EMA`."""

    def _average(self, weight, copy: bool, active: Optional[torch.Tensor] = None,
                 step: int = 0) -> None:
        """One pass over every tracked tensor: average (or copy) the float ones, copy the rest.

        ``active`` (capturable mode): a device bool; where false the copies keep their value.
        With ``skip_nonfinite`` a copying step is an update of weight 1 (exactly the
        params), so that the kernels keep the shadows of non-finite elements.  ``step``:
        the offset of a stochastic update's random bits.
        """
        plan = self._plan
        if plan is None or plan.snapshot is None or not plan.snapshot.still_valid():
            plan = self._plan_for(self._tracked.read(check_shapes=False))
        skip = self.skip_nonfinite
        if copy and skip:
            weight, copy = 1.0, False
        sr = self.rounding == "stochastic" and not copy
        with torch.no_grad():
            if plan.groups is None and self._offload is not None:  # shadows on the host
                self._offload.update(plan, self._tracked.entries, weight, copy, skip,
                                     self._copied_value, self._updating_step,
                                     self._backend_request, self.seed if sr else None)
            elif plan.groups is None:  # some shadows live on another device: staged copies
                if copy:
                    copy_across_(plan.ema_s, plan.ema_p, 1.0, self._backend_request)
                else:
                    update_across_(plan.ema_s, plan.ema_p, weight, self._backend_request, skip,
                                   _rounding.spec(self.seed, step, plan.positions) if sr else None)
            else:
                for (impl, shadows, params, prepared), positions in zip(plan.groups,
                                                                        plan.group_positions):
                    extra = {"stochastic": _rounding.spec(self.seed, step, positions)} if sr else {}
                    if prepared is not None and copy:
                        prepared.copy_(1.0)
                    elif prepared is not None:
                        prepared.update_(weight, skip, **extra)
                    elif copy:
                        impl.copy_(shadows, params, 1.0)
                    else:
                        impl.update_(shadows, params, weight, skip, **extra)
            if plan.groups is not None or self._offload is None:
                for s, p in zip(plan.copy_s, plan.copy_p):
                    s.copy_(self._copied_value(s, p, active))

    def _copied_value(self, s: torch.Tensor, p: torch.Tensor,
                      active: Optional[torch.Tensor]) -> torch.Tensor:
        """What a copied (not averaged) shadow takes: the model's tensor, except where
        ``active`` is false (capturable mode) or, with ``skip_nonfinite``, where a
        floating element (e.g. float8) is not finite."""
        value = p.to(s.device)
        if self.skip_nonfinite and value.is_floating_point() and value.dtype == s.dtype:
            # as raw bits: torch.where has no float8 kernels
            bits = _SAME_SIZE_INT[value.element_size()]
            value = torch.where(torch.isfinite(value.float()), value.view(bits),
                                s.view(bits)).view(s.dtype)
        return value if active is None else torch.where(active, value, s)

    def _plan_for(self, live: list[torch.Tensor]) -> "_Plan":
        """The pairs and their backends, reused while every live tensor keeps its address,
        dtype, device, contiguity and shape, so a replaced storage is never written
        through an old plan (and a reshaped tensor is reported, naming it).

        Rebuilding costs several passes over the tensors; the check is one.  With the
        C++ extension loaded, ``_average`` asks the plan's snapshot first (one call, no
        read) and comes here only when it failed: then the plan is rebuilt even if the
        key matches (e.g. a new Parameter object over the same storage), so that the
        next snapshot holds the new objects.
        """
        local = _distributed.locals_of(live)  # DTensors: the backends work on local shards
        key = [(t.data_ptr(), t.dtype, t.get_device(), t.is_contiguous(), t.shape, t is not g)
               for t, g in zip(local, live)]
        if self._plan is not None and self._plan.snapshot is None and self._plan.key == key:
            return self._plan
        self._plan = None  # a failed check below must not leave the old plan in use
        self._tracked.check_shapes(live)
        for e, t in zip(self._tracked.entries, live):
            check_not_meta(e.name, t)  # never follow a model to meta: the average would go
        self._follow_sharding(live)
        self._follow_devices(live)
        plan = _Plan(*self._split(local))
        plan.positions = [i for i, e in enumerate(self._tracked.entries) if e.averaged]
        if not self.non_blocking and all(s.device == p.device for s, p in
                                         zip(plan.ema_s, plan.ema_p)):
            plan.groups = []
            for dev, idx in indices_by_device(plan.ema_s).items():
                ga, gb = [plan.ema_s[i] for i in idx], [plan.ema_p[i] for i in idx]
                impl = _backend.select(self._backend_request, dev)
                prepared = impl.prepare(ga, gb) if impl.prepare is not None else None
                plan.groups.append((impl, ga, gb, prepared))
                plan.group_positions.append([plan.positions[i] for i in idx])
        plan.key = key
        plan.snapshot = _host_path.snapshot(self._tracked, live, self._shadows)
        self._plan = plan
        self.backend = self._backend_names()
        return plan

    def _follow_sharding(self, live: list[torch.Tensor]) -> None:
        """Pair every shadow with the layout of its model tensor: a model sharded after
        the EMA was made gets shard shadows (``distributed.follow_sharding``); any
        other change of layout raises naming the tensor.  A replaced shadow drops the
        plan, which holds the old shadows."""
        for i, (e, s, t) in enumerate(zip(self._tracked.entries, self._shadows, live)):
            new = _distributed.follow_sharding(e.name, s, t)
            if new is not s:
                self._shadows[i] = new
                self._plan = None

    def _follow_devices(self, live: list[torch.Tensor]) -> None:
        """Shadows made beside a tensor (``device=None``) move when that tensor moved;
        shadows that are a module's tensors (``shadow_module``) stay where it holds them."""
        if self._device is None and self._bound is None:
            for i, (s, t) in enumerate(zip(self._shadows, live)):
                s_local, t_local = _distributed.local(s), _distributed.local(t)
                if s_local.device != t_local.device:
                    self._shadows[i] = _distributed.wrap_like(s, s_local.to(t_local.device))

    def _split(self, local):
        """(averaged shadows, params, copied shadows, params), all local tensors."""
        ema_s, ema_p, copy_s, copy_p = [], [], [], []
        shadows = _distributed.locals_of(self._shadows)
        for e, s, t in zip(self._tracked.entries, shadows, local):
            if e.averaged:
                if not _validate.lossless(t.dtype, s.dtype):
                    raise TypeError(f"EMA: tensor {e.name!r} is now {t.dtype} but its shadow is "
                                    f"{s.dtype}; averaging it would lose precision")
                ema_s.append(s)
                ema_p.append(t)
            else:
                copy_s.append(s)
                copy_p.append(t)
        return ema_s, ema_p, copy_s, copy_p

    def _backend_names(self) -> str:
        names = {d: _backend.select(self._backend_request, d).name
                 for d in {_distributed.local(s).device for s, e in
                           zip(self._shadows, self._tracked.entries) if e.averaged}}
        if len(set(names.values())) <= 1:
            return next(iter(names.values()), "none")
        return ",".join(f"{d}={n}" for d, n in sorted(names.items(), key=str))
