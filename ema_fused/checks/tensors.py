"""Input checks shared by every op, run before anything is written.

Each message names the op, the list and the index of the offending tensor and
shows both sides, so a user can find the tensor in their model.
"""
from __future__ import annotations

import math
import numbers
from typing import Sequence

import torch

#: dtypes the ops accept for shadows and params (any pairing).
FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


def lossless(src: torch.dtype, dst: torch.dtype) -> bool:
    """True when every ``src`` value converts to ``dst`` exactly (same dtype, or a wider float)."""
    if src == dst:
        return True
    return (src.is_floating_point and dst.is_floating_point
            and torch.promote_types(src, dst) == dst and dst.itemsize > src.itemsize)


def _describe(t: torch.Tensor) -> str:
    return f"shape {tuple(t.shape)}, dtype {t.dtype}, device {t.device}"


def check_scalar(op: str, name: str, value: float, low: float = 0.0, high: float = 1.0) -> float:
    """Return ``value`` as a float after checking it is finite and in [low, high]."""
    if isinstance(value, torch.Tensor):
        raise TypeError(f"{op}: {name} must be a Python number, got a tensor")
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(f"{op}: {name} must be a real number, got {type(value).__name__}")
    value = float(value)
    if not math.isfinite(value) or not (low <= value <= high):
        raise ValueError(f"{op}: {name} must be in [{low}, {high}], got {value}")
    return value


def check_weight_tensor(op: str, weight: torch.Tensor, shadows: Sequence[torch.Tensor]) -> None:
    """A device-side weight: one float32 element on the shadows' device (value unchecked)."""
    if weight.numel() != 1 or weight.dtype != torch.float32:
        raise TypeError(f"{op}: a tensor weight must hold one float32 element, got "
                        f"{_describe(weight)}")
    for i, s in enumerate(shadows):
        if s.device != weight.device:
            raise ValueError(f"{op}: the weight tensor is on {weight.device} but shadows[{i}] "
                             f"is on {s.device}")


def check_pairs(op: str, a_name: str, a: Sequence[torch.Tensor],
                b_name: str, b: Sequence[torch.Tensor]) -> None:
    """Check two tensor lists pair up: same length, shapes, devices; floating dtypes."""
    if len(a) != len(b):
        raise ValueError(f"{op}: {a_name} has {len(a)} tensors but {b_name} has {len(b)}")
    for i, (x, y) in enumerate(zip(a, b)):
        for name, t in ((a_name, x), (b_name, y)):
            if not isinstance(t, torch.Tensor):
                raise TypeError(f"{op}: {name}[{i}] is a {type(t).__name__}, not a tensor")
            if t.dtype not in FLOAT_DTYPES:
                raise TypeError(
                    f"{op}: {name}[{i}] has dtype {t.dtype}; only "
                    f"{', '.join(str(d) for d in FLOAT_DTYPES)} are supported")
        if x.shape != y.shape:
            raise ValueError(f"{op}: {a_name}[{i}] ({_describe(x)}) and {b_name}[{i}] "
                             f"({_describe(y)}) differ in shape")
        if x.device != y.device:
            raise ValueError(f"{op}: {a_name}[{i}] ({_describe(x)}) and {b_name}[{i}] "
                             f"({_describe(y)}) are on different devices")


def check_writable(op: str, name: str, ts: Sequence[torch.Tensor]) -> None:
    """Refuse to write into tensors that autograd tracks or whose elements overlap."""
    for i, t in enumerate(ts):
        if t.requires_grad and torch.is_grad_enabled():
            raise RuntimeError(f"{op}: {name}[{i}] requires grad; detach it or call under "
                               "torch.no_grad() before updating it in place")
        if t.numel() > 1 and torch._debug_has_internal_overlap(t) == 1:
            raise ValueError(f"{op}: {name}[{i}] ({_describe(t)}) has elements that share "
                             "memory (an expanded view); it cannot be written in place")


#: op name, list names and whether the second list is written, per kind of op
OVERLAP_NAMES = {"update": ("ema_update_", "shadows", "params", False),
                 "copy": ("ema_copy_", "dst", "src", False),
                 "swap": ("ema_swap_", "a", "b", True),
                 "weighted_sum": ("ema_weighted_sum_", "out", "inputs", False)}


def _span(t: torch.Tensor) -> tuple[int, int]:
    """[first byte, past the last byte] of the memory ``t``'s elements lie in."""
    lo = t.data_ptr()
    if t.is_contiguous():
        return lo, lo + t.numel() * t.element_size()
    extent = 1 + sum((n - 1) * s for n, s in zip(t.shape, t.stride()))
    return lo, lo + extent * t.element_size()


def _dense(t: torch.Tensor) -> bool:
    """Whether ``t``'s elements fill its span exactly (then spans overlap iff memory does)."""
    return t.is_contiguous() or torch._debug_has_internal_overlap(t) == 0


def _share_memory(x: torch.Tensor, y: torch.Tensor) -> bool:
    """Exact test for strided views whose spans overlap (e.g. interleaved columns of one
    matrix, which do not share an element): mark x's bytes, look at y's.  Costs one
    pass over the joint span (and a sync on a GPU); only reached for non-dense views."""
    (xl, xh), (yl, yh) = _span(x), _span(y)
    lo = min(xl, yl)
    marks = torch.zeros(max(xh, yh) - lo, dtype=torch.uint8, device=x.device)

    def bytes_of(t: torch.Tensor) -> torch.Tensor:
        size = t.element_size()
        return marks.as_strided(tuple(t.shape) + (size,),
                                tuple(s * size for s in t.stride()) + (1,), t.data_ptr() - lo)

    bytes_of(x).fill_(1)
    return bool(bytes_of(y).any())


def _same_elements(x: torch.Tensor, y: torch.Tensor) -> bool:
    return (x.data_ptr() == y.data_ptr() and x.dtype == y.dtype and x.shape == y.shape
            and x.stride() == y.stride())


def check_no_overlap(kind: str, a: Sequence[torch.Tensor], b: Sequence[torch.Tensor]) -> None:
    """Refuse pairs that share memory, before anything is written: a destination given
    twice, destinations that overlap (views of one flat buffer), a destination that
    another pair reads, or the two sides of one pair partially overlapping.  The very
    same tensor on both sides of one pair (an in-place op) is fine.  Intervals are
    sorted once: O(n log n) for n pairs, nothing per element for dense tensors.

    ``kind``: ``"update"``, ``"copy"``, ``"weighted_sum"`` or ``"swap"`` (which writes
    both lists).
    """
    op, a_name, b_name, b_written = OVERLAP_NAMES[kind]
    spans = []
    for second, ts in ((False, a), (True, b)):
        for i, t in enumerate(ts):
            if t.numel():
                lo, hi = _span(t)
                spans.append(((t.device.type, t.device.index or 0), lo, hi, i, second, t))
    spans.sort(key=lambda s: (s[0], s[1]))
    open_: list = []
    for s in spans:
        open_ = [o for o in open_ if o[0] == s[0] and o[2] > s[1]]
        for o in open_:
            x, y = (o, s) if (o[3], o[4]) < (s[3], s[4]) else (s, o)
            written = [not x[4] or b_written, not y[4] or b_written]
            if not any(written) or (x[3] == y[3] and _same_elements(x[5], y[5])):
                continue
            if not (_dense(x[5]) and _dense(y[5])) and not _share_memory(x[5], y[5]):
                continue
            xn, yn = (b_name if x[4] else a_name), (b_name if y[4] else a_name)
            if x[3] == y[3]:
                raise ValueError(f"{op}: {xn}[{x[3]}] and {yn}[{y[3]}] partially overlap")
            raise ValueError(
                f"{op}: {xn}[{x[3]}] and {yn}[{y[3]}] overlap in memory, and "
                f"{'both are' if all(written) else 'one is'} written; one call updates every "
                "pair at once, so they would race (pass each destination once, in memory of "
                "its own)")
        open_.append(s)
