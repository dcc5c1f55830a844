"""Registers the ``triton`` backend; the kernels are imported only when first needed.

``auto`` takes it for CUDA tensors when Triton imports and compiles.  On the CPU it
runs only through Triton's interpreter (``TRITON_INTERPRET=1`` set before the kernels
are imported), and only when asked for by name: that is how the tests check the
kernels without a GPU.  Pairs the kernels do not take (float64, non-contiguous) go
to the ``foreach`` code in the same call, so a request never fails on them.
"""
from __future__ import annotations

import importlib.util
import os
from typing import Optional, Sequence

import torch

from ..checks import multi as _multi_checks
from ..checks import rounding
from . import foreach, multi_split
from .selection import Backend, register_backend

_kernels = None
_load_error: Optional[str] = None
_kernels_interpret: Optional[bool] = None  # whether they were made for the interpreter
_have_triton = importlib.util.find_spec("triton") is not None


def _launcher():
    """The kernel launcher module, imported once (None, with the reason kept, on failure)."""
    global _kernels, _load_error, _kernels_interpret
    if _kernels is None and _load_error is None:
        try:
            from ..triton_kernels import launch
            _kernels, _kernels_interpret = launch, _interpreting()
        except Exception as exc:  # any import/compile-time failure disables the backend
            _load_error = f"the Triton kernels failed to import: {type(exc).__name__}: {exc}"
    return _kernels


def _interpreting() -> bool:
    """Interpreter mode: as the kernels were made, or as they would be made now."""
    if _kernels_interpret is not None:
        return _kernels_interpret
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def _reasons(device: Optional[torch.device]) -> list[str]:
    if not _have_triton:
        return ["Triton is not installed (pip install 'ema_fused[triton]')"]
    if device is not None:
        if device.type == "cpu" and not _interpreting():
            return ["Triton runs on the CPU only through its interpreter: set "
                    "TRITON_INTERPRET=1 before ema_fused's kernels are imported (for tests)"]
        if device.type == "cuda" and _interpreting():
            return ["TRITON_INTERPRET=1 is set: Triton would run CUDA tensors through its "
                    "slow interpreter"]
        if device.type not in ("cpu", "cuda"):
            return [f"Triton does not run on {device.type} tensors"]
    if _launcher() is None:
        return [_load_error or "the Triton kernels failed to import"]
    if device is not None:
        failure = _probe(device)
        if failure:
            return [failure]
    return []


_probed: dict[torch.device, Optional[str]] = {}


def _probe(device: torch.device) -> Optional[str]:
    """Compile and run the update kernel once per device on a tiny mixed-dtype pair and
    check the result, so that a Triton that cannot build or run it here makes ``auto``
    fall back (and a request by name fail with the reason) before any real tensor is
    touched.  One sync, at the first use on the device.

    Never while a CUDA graph is being captured: the probe's table cannot be built there
    and its check syncs, so it would fail for a reason that says nothing about Triton.
    Then the backend is unusable *for now* (the reason says why; nothing is cached) and
    the first use outside a capture probes."""
    if device.index is None and device.type == "cuda":
        device = torch.device("cuda", torch.cuda.current_device())
    if device not in _probed and _kernels._capturing(device):
        return (f"Triton has not been tried on {device} yet, and cannot be while a CUDA graph "
                "is being captured: run the same call once before capturing (a warm-up step)")
    if device not in _probed:
        try:
            n = 2 * _kernels.BLOCK + 5  # a full aligned tile and a masked tail
            shadow = torch.zeros(n, dtype=torch.float32, device=device)
            param = torch.ones(n, dtype=torch.bfloat16, device=device)
            _kernels.update([(shadow, param)], 0.25)
            ok = bool((shadow == 0.25).all())  # syncs, once
            _probed[device] = None if ok else "the Triton update kernel gave wrong results here"
        except Exception as exc:  # compile or launch failure: keep the reason, never raise
            _probed[device] = (f"the Triton kernels failed to run on {device}: "
                               f"{type(exc).__name__}: {str(exc)[:300]}")
    return _probed[device]


def _split(kind: str, a: Sequence[torch.Tensor], b: Sequence[torch.Tensor]):
    """(pairs the kernels take, the rest as two lists for the fallback); all pairs are
    checked for overlaps when some go to the fallback (the kernels' tables check theirs)."""
    ka, kb, rest_a, rest_b = foreach.split_for_kernels(kind, a, b, _launcher().supported)
    return list(zip(ka, kb)), rest_a, rest_b


def _kernel_stochastic(shadows: list, params: list, weight: float, skip_nonfinite: bool,
                       spec: rounding.Stochastic) -> None:
    from ..triton_kernels import stochastic  # this backend runs only once Triton imported
    stochastic.update(list(zip(shadows, params)), weight, spec, skip_nonfinite)


def update_(shadows, params, weight, skip_nonfinite: bool = False,
            stochastic: Optional[rounding.Stochastic] = None) -> None:
    if stochastic is not None and weight not in (0.0, 1.0):  # the ends are exact: no rounding
        foreach.update_stochastic(shadows, params, weight, skip_nonfinite, stochastic,
                                  _launcher().supported, _kernel_stochastic, update_)
        return
    ok, rest_s, rest_p = _split("update", shadows, params)
    if isinstance(weight, torch.Tensor):  # graph-safe: the kernel reads it on the device
        _launcher().update(ok, 0.0, weight_ptr=weight, skip_nonfinite=skip_nonfinite)
    else:
        _launcher().update(ok, weight, skip_nonfinite=skip_nonfinite)
    if rest_s:
        foreach.update_unchecked(rest_s, rest_p, weight, skip_nonfinite)


def copy_(dst, src, scale: float) -> None:
    ok, rest_d, rest_s = _split("copy", dst, src)
    _launcher().copy(ok, scale)
    if rest_d:
        foreach.copy_unchecked(rest_d, rest_s, scale)


class _Prepared:
    """Pairs split once into kernel pairs (with their tables) and fallback pairs."""

    def __init__(self, shadows, params) -> None:
        self.shadows, self.params = list(shadows), list(params)
        ok, self.rest_s, self.rest_p = _split("update", shadows, params)
        self.kernels = _launcher().Prepared(ok)
        self._rounded = None  # the stochastic update's split, made at its first call

    def update_(self, weight, skip_nonfinite: bool = False,
                stochastic: Optional[rounding.Stochastic] = None) -> None:
        if stochastic is not None and weight not in (0.0, 1.0):
            self._update_stochastic(weight, skip_nonfinite, stochastic)
            return
        self.kernels.update_(weight, skip_nonfinite)
        if self.rest_s:
            foreach.update_unchecked(self.rest_s, self.rest_p, weight, skip_nonfinite)

    def copy_(self, scale: float) -> None:
        self.kernels.copy_(scale)
        if self.rest_s:
            foreach.copy_unchecked(self.rest_s, self.rest_p, scale)

    def _update_stochastic(self, weight: float, skip: bool, spec: rounding.Stochastic) -> None:
        """As :func:`update_`, with the split and the kernel pairs' plan made once."""
        from ..triton_kernels import stochastic
        if self._rounded is None:
            k, t, n = foreach.split_stochastic(self.shadows, self.params, _launcher().supported)
            k = [i for i in k if self.shadows[i].numel()]
            pairs = [(self.shadows[i], self.params[i]) for i in k]
            plan = _launcher().plan_for(pairs, pairs[0][0].device) if pairs else None
            self._rounded = (k, t, n, plan)
        k, t, n, plan = self._rounded
        if plan is not None:
            stochastic.run(plan, weight, spec.pick(k), skip)
        if t:
            foreach.update_unchecked([self.shadows[i] for i in t], [self.params[i] for i in t],
                                     weight, skip, spec.pick(t))
        if n:
            update_([self.shadows[i] for i in n], [self.params[i] for i in n], weight, skip)


def weighted_sum_(out, inputs, weight: float) -> None:
    from ..triton_kernels import sum_kernels  # this backend runs only once Triton imported
    ko, ki, rest_o, rest_i = foreach.split_for_kernels("weighted_sum", out, inputs,
                                                       sum_kernels.supported)
    sum_kernels.weighted_sum(list(zip(ko, ki)), weight)
    if rest_o:
        foreach.weighted_sum_unchecked(rest_o, rest_i, weight)


def swap_(a, b) -> None:
    ok, rest_a, rest_b = _split("swap", a, b)
    _launcher().swap(ok)
    if rest_a:
        foreach.swap_unchecked(rest_a, rest_b)


def multi_update_(shadows, params, weights,
                  stochastic: Optional[rounding.MultiStochastic] = None) -> None:
    """Params the kernels take in every profile: one multi-shadow launch (each param
    read once; ``ema_fused.triton_kernels.multi_update``); the other pairs where
    :func:`update_` would send them, so every shadow gets its bits."""
    if stochastic is not None:  # one stochastic launch per profile (each reads the params)
        _multi_checks.check_no_overlap([list(p) for p in shadows], params)
        for k, (profile, weight) in enumerate(zip(shadows, weights)):
            update_(profile, params, weight, False, stochastic.profile(k))
        return
    from ..triton_kernels import multi_update as multi
    plan = multi_split.split(shadows, params, _launcher().supported)
    if plan.columns:
        multi.update([plan.pick(profile, plan.columns) for profile in shadows],
                     plan.pick(params, plan.columns), weights)
    for profile, weight, single, rest in zip(shadows, weights, plan.single, plan.rest):
        if single:
            _launcher().update(list(zip(plan.pick(profile, single), plan.pick(params, single))),
                               weight)
        if rest:
            foreach.update_unchecked(plan.pick(profile, rest), plan.pick(params, rest), weight)


register_backend(Backend(
    "triton", "Triton kernels: one launch per device per update, any dtype mix",
    update_, copy_, _reasons, auto_device_types=("cuda",), swap_=swap_, prepare=_Prepared,
    weighted_sum_=weighted_sum_, multi_update_=multi_update_))
