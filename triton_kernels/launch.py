"""Launchers for the kernels in :mod:`ema_kernels`: tables, their cache, and one launch.

Tables live on the tensors' device and are built once per *set* of tensors: the cache
key holds every pair's addresses, sizes and dtypes, so a tensor whose storage moved
(``p.data = ...``, ``model.to(...)``) makes a new key and a new table, and no table is
ever used with addresses other than the ones it was built from.  A miss checks the pairs
for overlaps (the key decides them); a hit costs no host-to-device copy and no host
sync.  A table is copied to the device synchronously (so any stream may read it at
once); the allocator is told of every other stream that reads it, so that evicting it
while a kernel there still runs cannot hand its memory out early.

CUDA graphs keep a table's device address and replay without asking the cache: every
table :func:`run` launches while a graph is captured is pinned, whoever holds it (the
cache, or EMA's :class:`Prepared` plan, which launches without asking the cache): kept
alive for the process's life and found by its key from then on (never evicted).  A miss
during capture is refused (its copy would break the capture), as in the C++/CUDA backend.
"""
from __future__ import annotations

import contextlib
from collections import OrderedDict
from typing import Optional, Sequence

import torch

from ..checks import tensors
from .ema_kernels import ROW as _ROW, copy_kernel, swap_kernel, update_kernel

ROW = int(_ROW.value)

#: Elements per tile (one program).  2048 = 16 fp32 per thread at 4 warps: four 16-byte
#: vector accesses each.  Not tuned on a GPU yet.
BLOCK = 2048
NUM_WARPS = 4
VECTOR_BYTES = 16  # the widest access: a tile's vectors need both addresses on this grid
CODES = {torch.float32: 0, torch.bfloat16: 1, torch.float16: 2}
_CACHE_SIZE = 16
CAPTURE_MISS = ("the kernel table for these {n} tensors is not built yet, and it cannot be "
                "built while a CUDA graph is being captured; run the same call once before "
                "capturing (a warm-up step)")

_plans: "OrderedDict[tuple, Plan]" = OrderedDict()
_pinned: dict[tuple, "Plan"] = {}  # launched during a graph capture: found by key, never evicted
# every table (Plan, or multi_update.Group) launched during a capture, by id: alive for the
# process's life, because a captured graph replays its address
_graph_tables: dict[int, object] = {}
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
    """Device tables for one set of pairs: ``tensors`` [n, ROW] and ``tiles`` [m, 2].

    A tensor whose ``a`` starts off the 16-byte grid gets a head tile (the elements
    before its first aligned one) and body tiles that start after it, so ``a`` is on
    the grid in each of them (:mod:`.ema_kernels` says how the kernels use it)."""

    def __init__(self, pairs: Sequence[tuple[torch.Tensor, torch.Tensor]],
                 device: torch.device, key: tuple = ()) -> None:
        anchor = _anchor(device)
        base = anchor.data_ptr()
        self.device, self.key = device, key
        self.views = tuple(anchor.view(dt) for dt in CODES)  # f32, bf16, f16 anchors
        self.raw = (anchor.view(torch.int32), anchor.view(torch.int16))  # for swaps
        self.streams: set[int] = set()  # CUDA streams the allocator knows read the tables
        rows, heads, bodies = [], [], []
        for a, b in pairs:
            pa, pb = a.data_ptr(), b.data_ptr()
            head = min(a.numel(), (-pa) % VECTOR_BYTES // a.element_size())
            on_grid = (pb + head * b.element_size()) % VECTOR_BYTES == 0
            rows.append(((pa - base) // a.element_size(), (pb - base) // b.element_size(),
                         a.numel(), CODES[a.dtype], CODES[b.dtype], head << 1 | int(on_grid)))
            heads.append(head)
            bodies.append(-(-(a.numel() - head) // BLOCK))
        head = torch.tensor(heads, dtype=torch.int64)
        has_head = (head > 0).long()
        count = has_head + torch.tensor(bodies, dtype=torch.int64)
        which = torch.repeat_interleave(torch.arange(len(rows)), count)
        j = torch.arange(int(count.sum())) - (torch.cumsum(count, 0) - count)[which]
        starts = torch.where(j < has_head[which], 0, head[which] + (j - has_head[which]) * BLOCK)
        self.tensors = torch.tensor(rows, dtype=torch.int64).view(-1, ROW).to(device)
        self.tiles = torch.stack([which, starts], 1).contiguous().to(device)
        self.n_tiles = int(count.sum())


def _capturing(device: torch.device) -> bool:
    """Whether ``device``'s current stream is capturing a CUDA graph."""
    if device.type != "cuda":
        return False
    if device.index is None or device.index == torch.cuda.current_device():
        return torch.cuda.is_current_stream_capturing()
    with torch.cuda.device(device):
        return torch.cuda.is_current_stream_capturing()


def _pin(table) -> None:
    """Keep ``table`` (launched during a capture) for the process's life, and let a
    :class:`Plan` be found by its key from now on even if the cache holds another one."""
    if id(table) in _graph_tables:
        return
    _graph_tables[id(table)] = table
    if isinstance(table, Plan) and _pinned.get(table.key) is None:
        _pinned[table.key] = table
        if _plans.get(table.key) is table:
            del _plans[table.key]


def plan_for(pairs: Sequence[tuple[torch.Tensor, torch.Tensor]], device: torch.device,
             kind: str = "update") -> Plan:
    """The cached plan for exactly these addresses, sizes and dtypes (built on a miss,
    after the overlap check of ``kind``: a swap writes both sides)."""
    key = (device, kind == "swap") + tuple(
        (a.data_ptr(), b.data_ptr(), a.numel(), a.dtype, b.dtype) for a, b in pairs)
    plan = _pinned.get(key)
    if plan is None:
        plan = _plans.get(key)
    if plan is None:
        if _capturing(device):
            raise RuntimeError("ema_fused (triton): " + CAPTURE_MISS.format(n=len(pairs)))
        tensors.check_no_overlap(kind, [a for a, _ in pairs], [b for _, b in pairs])
        plan = _plans[key] = Plan(pairs, device, key)
        if len(_plans) > _CACHE_SIZE:
            _plans.popitem(last=False)
    elif key in _plans:
        _plans.move_to_end(key)
    return plan


def run(kernel, plan: Plan, *args, **meta) -> None:
    """Launch ``kernel`` once over every tile of ``plan`` (pinned if a graph is being
    captured); ``args``: what the kernel takes after the two tables (anchor views,
    scalars)."""
    cuda = plan.device.type == "cuda"
    with torch.cuda.device(plan.device) if cuda else contextlib.nullcontext():
        if _capturing(plan.device):
            _pin(plan)
        if cuda:
            stream = torch.cuda.current_stream()
            if stream.cuda_stream not in plan.streams:  # the copy is done: only the allocator
                plan.tensors.record_stream(stream)
                plan.tiles.record_stream(stream)
                plan.streams.add(stream.cuda_stream)
        kernel[(plan.n_tiles,)](plan.tensors, plan.tiles, *args, BLOCK=BLOCK,
                                num_warps=NUM_WARPS, **meta)


def _nonempty(pairs) -> list:
    return [(a, b) for a, b in pairs if a.numel()]


def update(pairs, weight: float, weight_ptr: Optional[torch.Tensor] = None,
           skip_nonfinite: bool = False) -> None:
    """``a += weight * (b - a)`` for every supported pair, one launch; weight 0 launches
    nothing and weight 1 copies (both exact, and the pairs still checked).

    With ``weight_ptr`` (a 1-element float32 device tensor) the weight is read on the
    device, so a captured CUDA graph replays with whatever value it holds then.
    ``skip_nonfinite``: elements whose param is NaN or +-Inf keep their shadow.
    """
    pairs = _nonempty(pairs)
    if pairs:
        Prepared(pairs).update_(weight if weight_ptr is None else weight_ptr, skip_nonfinite)


def copy(pairs, scale: float, scale_ptr: Optional[torch.Tensor] = None) -> None:
    """``a = b * scale`` rounded once into ``a``'s dtype, one launch."""
    pairs = _nonempty(pairs)
    if pairs:
        plan = plan_for(pairs, pairs[0][0].device, "copy")
        ptr = plan.views[0] if scale_ptr is None else scale_ptr
        run(copy_kernel, plan, *plan.views, float(scale), ptr, SCALE_FROM_PTR=scale_ptr is not None)


def swap(pairs) -> None:
    """Exchange the contents of each pair (same dtype and shape), one launch, bit for bit."""
    for a, b in pairs:
        if a.dtype != b.dtype:
            raise TypeError(f"ema_fused: swap needs equal dtypes, got {a.dtype} and {b.dtype}")
    pairs = _nonempty(pairs)
    if pairs:
        plan = plan_for(pairs, pairs[0][0].device, "swap")
        run(swap_kernel, plan, *plan.raw)


class Prepared:
    """A plan held by a caller that vouches for its tensors (``EMA`` checks every
    address, dtype and layout before each reuse): launches skip all per-tensor work.
    Holding the plan keeps its tables alive even once the cache has evicted them."""

    def __init__(self, pairs) -> None:
        pairs = _nonempty(pairs)
        self.plan = plan_for(pairs, pairs[0][0].device) if pairs else None

    def update_(self, weight, skip_nonfinite: bool = False) -> None:
        if self.plan is None:
            return
        skip = bool(skip_nonfinite)
        if isinstance(weight, torch.Tensor):  # read on the device: the kernel does the ends
            run(update_kernel, self.plan, *self.plan.views, 0.0, weight, WEIGHT_FROM_PTR=True,
                SKIP_NONFINITE=skip)
        elif weight == 1.0 and not skip:  # with skip, the update kernel keeps the shadows
            self.copy_(1.0)
        elif weight != 0.0:
            run(update_kernel, self.plan, *self.plan.views, float(weight), self.plan.views[0],
                WEIGHT_FROM_PTR=False, SKIP_NONFINITE=skip)

    def copy_(self, scale: float) -> None:
        if self.plan is not None:
            run(copy_kernel, self.plan, *self.plan.views, float(scale), self.plan.views[0],
                SCALE_FROM_PTR=False)
