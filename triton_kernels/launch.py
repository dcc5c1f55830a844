"""Launchers for the kernels in :mod:`ema_kernels`: tables, their cache, and one launch.

Tables live on the tensors' device and are built once per *set* of tensors: the cache
key holds every pair's addresses, sizes and dtypes, so a tensor whose storage moved
(``p.data = ...``, ``model.to(...)``) makes a new key and a new table, and no table is
ever used with addresses other than the ones it was built from.  A cache hit costs no
host-to-device copy and no host sync.
"""
from __future__ import annotations

import contextlib
from collections import OrderedDict
from typing import Optional, Sequence

import torch

from .ema_kernels import ROW as _ROW, copy_kernel, swap_kernel, update_kernel

ROW = int(_ROW.value)

#: Elements per tile (one program).  2048 = 16 fp32 per thread at 4 warps: four 16-byte
#: vector accesses each.  Not tuned on a GPU yet.
BLOCK = 2048
NUM_WARPS = 4
CODES = {torch.float32: 0, torch.bfloat16: 1, torch.float16: 2}
_CACHE_SIZE = 16

_plans: "OrderedDict[tuple, Plan]" = OrderedDict()
_anchors: dict[torch.device, torch.Tensor] = {}


def supported(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Whether the kernels take this pair (else the caller sends it to the fallback)."""
    return (a.dtype in CODES and b.dtype in CODES and a.is_contiguous() and b.is_contiguous()
            and a.data_ptr() % a.element_size() == 0 and b.data_ptr() % b.element_size() == 0)


def _anchor(device: torch.device) -> torch.Tensor:
    anchor = _anchors.get(device)
    if anchor is None:
        anchor = torch.empty(16, dtype=torch.uint8, device=device)
        if anchor.data_ptr() % 16:
            raise RuntimeError(f"ema_fused: allocator gave an anchor not 16-byte aligned on {device}")
        _anchors[device] = anchor
    return anchor


class Plan:
    """Device tables for one set of pairs: ``tensors`` [n, ROW] and ``tiles`` [m, 2]."""

    def __init__(self, pairs: Sequence[tuple[torch.Tensor, torch.Tensor]],
                 device: torch.device) -> None:
        anchor = _anchor(device)
        base = anchor.data_ptr()
        self.device = device
        self.views = tuple(anchor.view(dt) for dt in CODES)  # f32, bf16, f16 anchors
        rows, counts = [], []
        for a, b in pairs:
            pa, pb = a.data_ptr(), b.data_ptr()
            aligned = int(pa % 16 == 0 and pb % 16 == 0)
            rows.append(((pa - base) // a.element_size(), (pb - base) // b.element_size(),
                         a.numel(), CODES[a.dtype], CODES[b.dtype], aligned))
            counts.append(-(-a.numel() // BLOCK))
        host = torch.tensor(rows, dtype=torch.int64).view(-1, ROW)
        count = torch.tensor(counts, dtype=torch.int64)
        which = torch.repeat_interleave(torch.arange(len(rows)), count)
        first_tile = torch.cumsum(count, 0) - count
        starts = (torch.arange(int(count.sum())) - first_tile[which]) * BLOCK
        self.tensors = host.to(device)
        self.tiles = torch.stack([which, starts], 1).contiguous().to(device)
        self.n_tiles = int(count.sum())


def plan_for(pairs: Sequence[tuple[torch.Tensor, torch.Tensor]], device: torch.device) -> Plan:
    """The cached plan for exactly these addresses, sizes and dtypes (built on a miss)."""
    key = (device,) + tuple((a.data_ptr(), b.data_ptr(), a.numel(), a.dtype, b.dtype)
                            for a, b in pairs)
    plan = _plans.get(key)
    if plan is None:
        plan = _plans[key] = Plan(pairs, device)
        if len(_plans) > _CACHE_SIZE:
            _plans.popitem(last=False)
    else:
        _plans.move_to_end(key)
    return plan


def run(kernel, plan: Plan, *scalars, **meta) -> None:
    """Launch ``kernel`` once over every tile of ``plan``."""
    with torch.cuda.device(plan.device) if plan.device.type == "cuda" else contextlib.nullcontext():
        kernel[(plan.n_tiles,)](plan.tensors, plan.tiles, *plan.views, *scalars,
                                BLOCK=BLOCK, num_warps=NUM_WARPS, **meta)


def _launch(kernel, pairs, *scalars, **meta) -> None:
    pairs = [(a, b) for a, b in pairs if a.numel()]
    if pairs:
        run(kernel, plan_for(pairs, pairs[0][0].device), *scalars, **meta)


def update(pairs, weight: float, weight_ptr: Optional[torch.Tensor] = None) -> None:
    """``a += weight * (b - a)`` for every supported pair, one launch.

    With ``weight_ptr`` (a 1-element float32 device tensor) the weight is read on the
    device, so a captured CUDA graph replays with whatever value it holds then.
    """
    _launch(update_kernel, pairs, *_scalar_args(weight, weight_ptr, pairs),
            WEIGHT_FROM_PTR=weight_ptr is not None)


def copy(pairs, scale: float, scale_ptr: Optional[torch.Tensor] = None) -> None:
    """``a = b * scale`` rounded once into ``a``'s dtype, one launch."""
    _launch(copy_kernel, pairs, *_scalar_args(scale, scale_ptr, pairs),
            SCALE_FROM_PTR=scale_ptr is not None)


def swap(pairs) -> None:
    """Exchange the contents of each pair (same dtype and shape), one launch."""
    for a, b in pairs:
        if a.dtype != b.dtype:
            raise TypeError(f"ema_fused: swap needs equal dtypes, got {a.dtype} and {b.dtype}")
    _launch(swap_kernel, pairs)


def _scalar_args(value: float, ptr: Optional[torch.Tensor], pairs) -> tuple:
    """The scalar and the pointer it may be read from (an unused fp32 anchor when None)."""
    if ptr is None:
        device = next((a.device for a, _ in pairs), torch.device("cpu"))
        ptr = _anchor(device).view(torch.float32)
    return float(value), ptr


class Prepared:
    """A plan held by a caller that vouches for its tensors (``EMA`` checks every
    address, dtype and layout before each reuse): launches skip all per-tensor work."""

    def __init__(self, pairs) -> None:
        pairs = [(a, b) for a, b in pairs if a.numel()]
        self.plan = plan_for(pairs, pairs[0][0].device) if pairs else None

    def update_(self, weight) -> None:
        if self.plan is None:
            return
        from_ptr = isinstance(weight, torch.Tensor)
        ptr = weight if from_ptr else self.plan.views[0]
        run(update_kernel, self.plan, 0.0 if from_ptr else float(weight), ptr,
            WEIGHT_FROM_PTR=from_ptr)

    def copy_(self, scale: float) -> None:
        if self.plan is not None:
            run(copy_kernel, self.plan, float(scale), self.plan.views[0], SCALE_FROM_PTR=False)
