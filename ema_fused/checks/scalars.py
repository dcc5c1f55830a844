"""Strict checks of the numbers and flags the EMA layer takes (arguments, steps, and
the counters a checkpoint holds): the type and the range, with a message naming the
value, so that ``decay="0.9"``, ``step=2.5`` or ``bias_correction="False"`` never pass
as something else."""
from __future__ import annotations

import math
import numbers
from typing import Optional

import torch


def as_int(what: str, value: object, low: int) -> int:
    """``value`` as a Python int >= ``low``.  Takes ints, numpy integers and 0-dim integer
    tensors (``.item()``: a CUDA tensor syncs with the host); never bools, floats or strings."""
    if isinstance(value, torch.Tensor):
        if value.dim() != 0 or value.dtype.is_floating_point or value.dtype.is_complex \
                or value.dtype == torch.bool:
            raise TypeError(f"{what} must be an integer, got a tensor of dtype {value.dtype} "
                            f"and shape {tuple(value.shape)} (a 0-dim integer tensor works)")
        value = int(value.item())
    elif isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise TypeError(f"{what} must be an integer, got {value!r} ({type(value).__name__})")
    value = int(value)
    if value < low:
        raise ValueError(f"{what} must be an integer >= {low}, got {value}")
    return value


def as_real(what: str, value: object, low: float = 0.0, high: float = 1.0) -> float:
    """``value`` as a finite float in [low, high]; never a bool, a string or a tensor."""
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(f"{what} must be a real number, got {value!r} ({type(value).__name__})")
    value = float(value)
    if not math.isfinite(value) or not low <= value <= high:
        raise ValueError(f"{what} must be in [{low}, {high}], got {value}")
    return value


def as_optional_real(what: str, value: object, low: float = 0.0, high: float = 1.0
                     ) -> Optional[float]:
    """:func:`as_real`, or None."""
    return None if value is None else as_real(what, value, low, high)


def as_flag(what: str, value: object) -> bool:
    """``value`` if it is a bool; 0, 1, None and strings are refused."""
    if isinstance(value, bool):
        return value
    raise TypeError(f"{what} must be True or False, got {value!r} ({type(value).__name__})")
