"""Registers the ``cpu`` and ``cuda`` backends: the C++ extension's kernel ops.

One set of functions serves both: ``torch.ops.ema_fused.kernel_*`` dispatch to the
CPU or CUDA kernels by the tensors' device.  Pairs the kernels do not take (float64,
non-contiguous) go to the ``foreach`` code in the same call, so a request never fails
on them.  ``auto`` uses these backends only when the extension was built ahead of
time; asking for one by name builds it just in time if needed (see
:mod:`ema_fused.backends.extension`).
"""
from __future__ import annotations

from typing import Optional, Sequence

import torch

from ..checks import rounding
from . import extension, foreach, multi_split
from .selection import Backend, register_backend

KERNEL_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
Tensors = Sequence[torch.Tensor]


def supported(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Whether the kernels take this pair (else it goes to the fallback): kernel dtypes,
    contiguous, at addresses that are multiples of the element size."""
    return (a.dtype in KERNEL_DTYPES and b.dtype in KERNEL_DTYPES and a.is_contiguous()
            and b.is_contiguous() and a.data_ptr() % a.element_size() == 0
            and b.data_ptr() % b.element_size() == 0)


# On the CPU, torch's own vectorised lerp and copy beat the C++ loops on pairs of one
# 16-bit dtype, with the same bits (fp32 math, one rounding to nearest even), except the
# bf16 update: for 2^24 elements on the 2-core VM, fp16 updates 1.6 ms against 8.8 (the
# loops' exact, branch-free fp16 conversions cost more than torch's), copies 1.5-2.3
# against 2.1-2.4 ms (bf16) and 1.8 against 6.7 (fp16); bf16 updates 1.5-1.8 ms in the
# loops (two elements a word, csrc/cpu_ranges.h) against torch's 1.9-2.2.  Those pairs
# go to the foreach code; mixed pairs (bf16 params, fp32 shadows) stay in the kernels,
# one pass where torch needs a cast first.
def _takes_but(faster: tuple):
    """:func:`supported`, less the CPU pairs of one dtype in ``faster``."""
    def takes(x: torch.Tensor, y: torch.Tensor) -> bool:
        return supported(x, y) and not (x.device.type == "cpu" and x.dtype == y.dtype
                                        and x.dtype in faster)
    return takes


_KERNEL_TAKES = {"update": _takes_but((torch.float16,)),
                 "copy": _takes_but((torch.bfloat16, torch.float16))}


def _split(kind: str, a: Tensors, b: Tensors):
    """(kernel a, kernel b, rest a, rest b), all pairs checked when some go to the fallback."""
    return foreach.split_for_kernels(kind, a, b, _KERNEL_TAKES.get(kind, supported))


def _kernel_update(shadows: list, params: list, weight, skip_nonfinite: bool) -> None:
    if not shadows:
        return
    if isinstance(weight, torch.Tensor):  # graph-safe: read at run time
        torch.ops.ema_fused.kernel_update_graph_safe_(shadows, params, weight, skip_nonfinite)
    else:
        torch.ops.ema_fused.kernel_update_(shadows, params, weight, skip_nonfinite)


def _kernel_stochastic(shadows: list, params: list, weight: float, skip_nonfinite: bool,
                       spec: rounding.Stochastic) -> None:
    torch.ops.ema_fused.kernel_update_stochastic_(shadows, params, weight, skip_nonfinite,
                                                  *spec.signed(), list(spec.positions),
                                                  list(spec.starts))


def update_(shadows: Tensors, params: Tensors, weight, skip_nonfinite: bool = False,
            stochastic: Optional[rounding.Stochastic] = None) -> None:
    if stochastic is not None and weight not in (0.0, 1.0):  # the ends are exact: no rounding
        foreach.update_stochastic(shadows, params, weight, skip_nonfinite, stochastic, supported,
                                  _kernel_stochastic, update_)
        return
    ks, kp, rs, rp = _split("update", shadows, params)
    _kernel_update(ks, kp, weight, skip_nonfinite)
    if rs:
        foreach.update_unchecked(rs, rp, weight, skip_nonfinite)


def copy_(dst: Tensors, src: Tensors, scale: float) -> None:
    kd, ks, rd, rs = _split("copy", dst, src)
    if kd:
        torch.ops.ema_fused.kernel_copy_(kd, ks, scale)
    if rd:
        foreach.copy_unchecked(rd, rs, scale)


def swap_(a: Tensors, b: Tensors) -> None:
    ka, kb, ra, rb = _split("swap", a, b)
    if ka:
        torch.ops.ema_fused.kernel_swap_(ka, kb)
    if ra:
        foreach.swap_unchecked(ra, rb)


def weighted_sum_(out: Tensors, inputs: Tensors, weight: float) -> None:
    """``out[i] += weight * inputs[i]``: float32 outs to the kernels, the rest (float64,
    non-contiguous) to the foreach code in the same call (everything, with a build made
    before the kernel existed: still correct, only slower)."""
    if not hasattr(torch.ops.ema_fused, "kernel_weighted_sum_"):
        foreach.weighted_sum_(out, inputs, weight)
        return
    ko, ki, ro, ri = foreach.split_for_kernels(
        "weighted_sum", out, inputs, lambda o, x: o.dtype == torch.float32 and supported(o, x))
    if ko:
        torch.ops.ema_fused.kernel_weighted_sum_(ko, ki, weight)
    if ro:
        foreach.weighted_sum_unchecked(ro, ri, weight)


def _rounded(s: torch.Tensor, p: torch.Tensor) -> bool:
    """A pair the stochastic multi-shadow kernel takes: a 16-bit shadow the kernels take."""
    return s.dtype in rounding.ROUNDED_DTYPES and supported(s, p)


def multi_update_(shadows: Sequence[Tensors], params: Tensors, weights: Sequence[float],
                  stochastic: Optional[rounding.MultiStochastic] = None) -> None:
    """Every profile's shadows of the params the kernels take in every profile: one
    ``kernel_multi_update_`` (each param read once); the other pairs where
    :func:`update_` would send them (:mod:`.multi_split`), so every shadow gets the
    same bits as ``update_(shadows[k], params, weights[k])`` (with
    ``stochastic.profile(k)``: a stochastic multi update takes 16-bit shadows only)."""
    plan = multi_split.split(shadows, params, supported if stochastic is None else _rounded)
    if plan.columns:
        flat, cols = multi_split.flat_columns(shadows, params, plan.columns)
        ws = [float(w) for w in weights]
        if stochastic is None:
            torch.ops.ema_fused.kernel_multi_update_(flat, cols, ws)
        else:
            spec = stochastic.pick(plan.columns)
            torch.ops.ema_fused.kernel_multi_update_stochastic_(
                flat, cols, ws, [rounding.to_int64(s) for s in spec.seeds], rounding.to_int64(spec.offset),
                list(spec.positions), list(spec.starts))
    for k, (profile, weight, single, rest) in enumerate(
            zip(shadows, weights, plan.single, plan.rest)):
        if stochastic is not None:  # every other pair where the single update sends it
            others = single + rest
            if others:
                update_(plan.pick(profile, others), plan.pick(params, others), weight, False,
                        stochastic.profile(k).pick(others))
            continue
        _kernel_update(plan.pick(profile, single), plan.pick(params, single), weight, False)
        if rest:
            foreach.update_unchecked(plan.pick(profile, rest), plan.pick(params, rest), weight)



class _Prepared:
    """Pairs split once into kernel pairs and fallback pairs (for EMA's cached plan).

    The kernel pairs are also held in C++ (``PairSet``, ``csrc/host_path.cpp``), which
    calls the same ops through the dispatcher without converting the Python lists on
    every update; while ``torch.compile`` traces, the ops are called from Python.
    """

    def __init__(self, shadows: Tensors, params: Tensors) -> None:
        self.shadows, self.params = list(shadows), list(params)
        self.ks, self.kp, self.rs, self.rp = _split("update", shadows, params)
        # a backend of this file is chosen only once the extension is loaded
        self._held = extension.module().PairSet(self.ks, self.kp) if self.ks else None

    def update_(self, weight, skip_nonfinite: bool = False,
                stochastic: Optional[rounding.Stochastic] = None) -> None:
        if stochastic is not None and weight not in (0.0, 1.0):
            update_(self.shadows, self.params, weight, skip_nonfinite, stochastic)
            return
        if self._held is None or torch.compiler.is_compiling():
            _kernel_update(self.ks, self.kp, weight, skip_nonfinite)
        elif isinstance(weight, torch.Tensor):
            self._held.update_graph_safe_(weight, skip_nonfinite)
        else:
            self._held.update_(weight, skip_nonfinite)
        if self.rs:
            foreach.update_unchecked(self.rs, self.rp, weight, skip_nonfinite)

    def copy_(self, scale: float) -> None:
        if self._held is not None and not torch.compiler.is_compiling():
            self._held.copy_(scale)
        elif self.ks:
            torch.ops.ema_fused.kernel_copy_(self.ks, self.kp, scale)
        if self.rs:
            foreach.copy_unchecked(self.rs, self.rp, scale)


def _reasons_for(device_type: str, dispatch_key: str):
    def reasons(device: Optional[torch.device]) -> list[str]:
        if device is not None and device.type != device_type:
            return [f"it runs on {device_type} tensors only"]
        if not extension.load(build=False):
            return [extension.error()]
        if not extension.has_kernels(dispatch_key):
            return [f"the loaded build ({extension.loaded()}) has no {dispatch_key} kernels "
                    "(it was built without a CUDA toolkit or a CUDA build of torch)"]
        return []
    return reasons


def _build_on_request() -> None:
    extension.load(build=True)  # a failure is kept and reported by the reasons


for _name, _dev, _key, _what in (
        ("cuda", "cuda", "CUDA", "C++/CUDA multi-tensor kernels: one launch per device, "
                                 "device-resident tables, any dtype mix"),
        ("cpu", "cpu", "CPU", "C++ CPU kernels: one parallel pass over every pair")):
    register_backend(Backend(_name, _what, update_, copy_, _reasons_for(_dev, _key),
                             swap_=swap_, prepare=_Prepared, on_request=_build_on_request,
                             weighted_sum_=weighted_sum_, multi_update_=multi_update_))
