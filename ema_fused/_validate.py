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
