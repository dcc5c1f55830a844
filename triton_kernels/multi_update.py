"""The multi-shadow update in Triton: the shadows of up to ``MAX_PROFILES`` profiles of
every param of a device in one launch, each param tile loaded once.

Bytes per element, bf16 param + K fp32 shadows: 2 + 8K, against 10K for K single
updates (0.9 of them for K = 2, 0.85 for K = 4).

Tables as in :mod:`.launch`: program ``i`` reads tile ``(row, first element)``; row
``r`` of the tensor table is ``(param offset, numel, param dtype code, aligned)`` then
``(shadow offset, shadow dtype code)`` per profile, offsets in elements from the
16-byte aligned anchor of each dtype.  ``aligned``: the param and every shadow of the
row start on a 16-byte boundary, so full tiles take the vector path.  ``K`` is a
constexpr (one compiled kernel per profile count); the weights are scalar arguments
(never a device tensor: that would need a copy to the device every step).

Each element goes through the single update's own helpers (``_load``, ``_store``,
``_lerp``; weight 1 is ``b * 1.0``, the copy kernel's form, as :class:`.launch.Prepared`
sends it), so each shadow gets the single update's bits.
"""
from __future__ import annotations

from collections import OrderedDict
from typing import Sequence

import torch
import triton
import triton.language as tl

from ..checks import multi
from . import launch
from .ema_kernels import _lerp, _load, _store

MAX_PROFILES = 8
_CACHE_SIZE = 16
_plans: "OrderedDict[tuple, list[Group]]" = OrderedDict()
_pinned: dict[tuple, list["Group"]] = {}


@triton.jit
def _pick(k: tl.constexpr, w0, w1, w2, w3, w4, w5, w6, w7):
    """Weight ``k`` of the eight scalar arguments (``k`` is known when compiling)."""
    if k == 0:
        w = w0
    elif k == 1:
        w = w1
    elif k == 2:
        w = w2
    elif k == 3:
        w = w3
    elif k == 4:
        w = w4
    elif k == 5:
        w = w5
    elif k == 6:
        w = w6
    else:
        w = w7
    return w


@triton.jit
def multi_update_kernel(tensors, tiles, f32, bf16, f16, w0, w1, w2, w3, w4, w5, w6, w7,
                        K: tl.constexpr, BLOCK: tl.constexpr):
    """For each profile k < K: s_k[i] += w_k * (p[i] - s_k[i]); w_k = 1 copies, 0 skips."""
    pid = tl.program_id(0).to(tl.int64)
    t = tl.load(tiles + 2 * pid)
    start = tl.multiple_of(tl.load(tiles + 2 * pid + 1), BLOCK)
    row = tensors + (4 + 2 * K) * t
    p_off = tl.load(row)
    n = tl.load(row + 1)
    p_code = tl.load(row + 2)
    aligned = tl.load(row + 3)
    offs = tl.max_contiguous(tl.multiple_of(start + tl.arange(0, BLOCK), BLOCK), BLOCK)
    mask = offs < n
    if (start + BLOCK <= n) & (aligned != 0):
        b = _load(f32, bf16, f16, tl.multiple_of(p_off, 4), tl.multiple_of(p_off, 8), p_code,
                  offs, mask, False)
        for k in tl.static_range(K):
            w = _pick(k, w0, w1, w2, w3, w4, w5, w6, w7)
            s_off = tl.load(row + 4 + 2 * k)
            s_code = tl.load(row + 5 + 2 * k)
            s4, s8 = tl.multiple_of(s_off, 4), tl.multiple_of(s_off, 8)
            if w == 1.0:
                _store(f32, bf16, f16, s4, s8, s_code, offs, b * w, mask, False)
            elif w != 0.0:
                a = _load(f32, bf16, f16, s4, s8, s_code, offs, mask, False)
                _store(f32, bf16, f16, s4, s8, s_code, offs, _lerp(a, b, w), mask, False)
    else:
        b = _load(f32, bf16, f16, p_off, p_off, p_code, offs, mask, True)
        for k in tl.static_range(K):
            w = _pick(k, w0, w1, w2, w3, w4, w5, w6, w7)
            s_off = tl.load(row + 4 + 2 * k)
            s_code = tl.load(row + 5 + 2 * k)
            if w == 1.0:
                _store(f32, bf16, f16, s_off, s_off, s_code, offs, b * w, mask, True)
            elif w != 0.0:
                a = _load(f32, bf16, f16, s_off, s_off, s_code, offs, mask, True)
                _store(f32, bf16, f16, s_off, s_off, s_code, offs, _lerp(a, b, w), mask, True)


class Group:
    """Device tables of one launch: the params and the shadows of up to MAX_PROFILES
    profiles (attributes as :class:`.launch.Plan`, so :func:`.launch.run` launches it)."""

    def __init__(self, shadows: Sequence[Sequence[torch.Tensor]], params: Sequence[torch.Tensor],
                 device: torch.device) -> None:
        anchor = launch._anchor(device)
        base = anchor.data_ptr()
        self.device, self.k = device, len(shadows)
        self.views = tuple(anchor.view(dt) for dt in launch.CODES)
        self.streams: set[int] = set()
        rows, counts = [], []
        for i, p in enumerate(params):
            row = [(p.data_ptr() - base) // p.element_size(), p.numel(), launch.CODES[p.dtype], 0]
            aligned = p.data_ptr() % 16 == 0
            for profile in shadows:
                s = profile[i]
                row += [(s.data_ptr() - base) // s.element_size(), launch.CODES[s.dtype]]
                aligned = aligned and s.data_ptr() % 16 == 0
            row[3] = int(aligned)
            rows.append(row)
            counts.append(-(-p.numel() // launch.BLOCK))
        count = torch.tensor(counts, dtype=torch.int64)
        which = torch.repeat_interleave(torch.arange(len(rows)), count)
        starts = (torch.arange(int(count.sum())) - (torch.cumsum(count, 0) - count)[which])
        self.tensors = torch.tensor(rows, dtype=torch.int64).to(device)
        self.tiles = torch.stack([which, starts * launch.BLOCK], 1).contiguous().to(device)
        self.n_tiles = int(count.sum())


def _groups(shadows, params, active: list[int], device: torch.device) -> list[Group]:
    """The cached launch tables for these addresses, dtypes and moving profiles (a miss
    first refuses shadows that share memory with any shadow or param)."""
    key = (device, tuple(active)) + tuple(
        (t.data_ptr(), t.numel(), t.dtype) for t in list(params) + [s for p in shadows for s in p])
    groups = _pinned.get(key)  # an empty list (every weight 0) is a table set too
    if groups is None:
        groups = _plans.get(key)
    capturing = launch._capturing(device)
    if groups is None:
        if capturing:
            raise RuntimeError("ema_fused (triton): " + launch.CAPTURE_MISS.format(n=len(params)))
        multi.check_no_overlap([list(p) for p in shadows], params)
        groups = [Group([shadows[k] for k in active[g:g + MAX_PROFILES]], params, device)
                  for g in range(0, len(active), MAX_PROFILES)]
        _plans[key] = groups
        if len(_plans) > _CACHE_SIZE:
            _plans.popitem(last=False)
    elif key in _plans:
        _plans.move_to_end(key)
    if capturing and key not in _pinned:
        _pinned[key] = _plans.pop(key, groups)
    return groups


def update(shadows: Sequence[Sequence[torch.Tensor]], params: Sequence[torch.Tensor],
           weights: Sequence[float]) -> None:
    """Every profile's shadows of ``params`` (pairs :func:`.launch.supported` takes), one
    launch per MAX_PROFILES profiles of nonzero weight; all weights 0 launches nothing."""
    keep = [i for i, p in enumerate(params) if p.numel()]
    params = [params[i] for i in keep]
    shadows = [[profile[i] for i in keep] for profile in shadows]
    active = [k for k, w in enumerate(weights) if w != 0.0]
    if not params:
        return
    groups = _groups(shadows, params, active, params[0].device)
    for g, group in zip(range(0, len(active), MAX_PROFILES), groups):
        ws = [float(weights[k]) for k in active[g:g + MAX_PROFILES]]
        ws += [0.0] * (MAX_PROFILES - len(ws))
        launch.run(multi_update_kernel, group, *group.views, *ws, K=group.k)
