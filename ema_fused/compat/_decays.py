"""The peers' decay rules, written with :mod:`ema_fused.schedules` (shared by the compat
classes: timm V3 and diffusers ``use_ema_warmup``, ema-pytorch; torch_ema and diffusers'
default warmup)."""
from __future__ import annotations

from ..schedules import num_updates_warmup, power_warmup


def power(n: int, decay: float, inv_gamma: float, power_: float, min_decay: float) -> float:
    """``power_warmup(decay, inv_gamma, power, min_decay)`` at update ``n`` (0 for ``n <= 1``),
    with the peers' clamp order ``max(min(value, decay), min_decay)`` also for a
    ``min_decay`` above ``decay`` (where the schedule itself refuses the pair)."""
    value = power_warmup(decay, inv_gamma, power_, min(min_decay, decay))(n)
    return value if n <= 1 else max(value, min_decay)


def counted(n: int, decay: float, min_decay: float = 0.0) -> float:
    """``max(min(decay, (1 + n) / (10 + n)), min_decay)``: torch_ema's ``use_num_updates``
    and diffusers' default warmup."""
    return max(num_updates_warmup(decay)(n), min_decay)
