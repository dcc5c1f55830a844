"""Decay schedules: callables ``n -> decay`` for ``EMA(schedule=...)``.

``n`` is the 1-based number of the update since averaging started
(``n = step - update_after_step``).  A decay of 0 makes the shadow a copy of
the model; a decay of 1 freezes it.  Each schedule is a small picklable class
with a readable ``repr`` so that configurations can be logged and compared.
"""
from __future__ import annotations

import math

import torch

from .checks import as_real

__all__ = [
    "Schedule", "constant", "num_updates_warmup", "tau_ramp", "power_warmup",
    "half_life", "karras_power", "swa", "sigma_rel_to_gamma",
]


def _check_decay(name: str, d: float) -> float:
    # strict: "0.9" or True must not pass as a decay (float() would take both)
    return as_real(f"{name}: decay", d)


def _check_positive(name: str, what: str, x: float) -> float:
    x = as_real(f"{name}: {what}", x, 0.0, math.inf)
    if x == 0.0:
        raise ValueError(f"{name}: {what} must be a positive finite number, got {x}")
    return x


class Schedule:
    """Base class: subclasses implement ``decay(n)`` for n >= 1, and ``decay_tensor(n)``,
    the same formula with torch ops on a float64 tensor ``n`` (no host sync), which
    ``EMA(capturable=True)`` evaluates on the device inside a captured CUDA graph."""

    def __call__(self, n: int) -> float:
        return self.decay(int(n))

    def decay(self, n: int) -> float:  # pragma: no cover - abstract
        raise NotImplementedError

    def decay_tensor(self, n: "torch.Tensor") -> "torch.Tensor":  # pragma: no cover - abstract
        raise NotImplementedError

    def __repr__(self) -> str:
        args = ", ".join(f"{k}={v!r}" for k, v in vars(self).items())
        return f"{type(self).__name__}({args})"

    def __eq__(self, other: object) -> bool:
        return type(self) is type(other) and vars(self) == vars(other)

    def __hash__(self) -> int:
        return hash((type(self).__name__, tuple(sorted(vars(self).items()))))


class constant(Schedule):
    """``decay(n) = d``: timm ModelEmaV3's default, NeMo, AveragedModel's EMA."""

    def __init__(self, d: float) -> None:
        self.d = _check_decay("constant", d)

    def decay(self, n: int) -> float:
        return self.d

    def decay_tensor(self, n):
        return torch.full_like(n, self.d)


class num_updates_warmup(Schedule):
    """``decay(n) = min(d, (1 + n) / (10 + n))``: torch_ema ``use_num_updates``, LitEma, TF."""

    def __init__(self, d: float) -> None:
        self.d = _check_decay("num_updates_warmup", d)

    def decay(self, n: int) -> float:
        return min(self.d, (1 + n) / (10 + n))

    def decay_tensor(self, n):
        return ((1 + n) / (10 + n)).clamp(max=self.d)


class tau_ramp(Schedule):
    """``decay(n) = d * (1 - exp(-n / tau))``: yolov5 / ultralytics ModelEMA."""

    def __init__(self, d: float, tau: float = 2000.0) -> None:
        self.d = _check_decay("tau_ramp", d)
        self.tau = _check_positive("tau_ramp", "tau", tau)

    def decay(self, n: int) -> float:
        return self.d * (1.0 - math.exp(-n / self.tau))

    def decay_tensor(self, n):
        return self.d * (1.0 - torch.exp(-n / self.tau))


class power_warmup(Schedule):
    """``decay(n) = 0`` if ``n <= 1``, else
    ``clamp(1 - (1 + (n - 1) / inv_gamma) ** -power, min_decay, d)``.

    timm ModelEmaV3 ``use_warmup``, ema-pytorch ``EMA``, diffusers ``use_ema_warmup``.
    With ``inv_gamma=1, power=1`` it is a plain running average.
    """

    def __init__(self, d: float, inv_gamma: float = 1.0, power: float = 2 / 3,
                 min_decay: float = 0.0) -> None:
        self.d = _check_decay("power_warmup", d)
        self.inv_gamma = _check_positive("power_warmup", "inv_gamma", inv_gamma)
        self.power = _check_positive("power_warmup", "power", power)
        self.min_decay = _check_decay("power_warmup", min_decay)
        if self.min_decay > self.d:
            raise ValueError(f"power_warmup: min_decay={min_decay} is larger than d={d}")

    def decay(self, n: int) -> float:
        if n <= 1:
            return 0.0
        value = 1.0 - (1.0 + (n - 1) / self.inv_gamma) ** -self.power
        return max(min(value, self.d), self.min_decay)

    def decay_tensor(self, n):
        m = (n - 1).clamp(min=0)
        value = (1.0 - (1.0 + m / self.inv_gamma) ** -self.power).clamp(max=self.d)
        return torch.where(n <= 1, torch.zeros_like(n), value.clamp(min=self.min_decay))


class half_life(Schedule):
    """``decay(n) = 2 ** (-1 / h)``: the average halves its memory every ``h`` updates (Composer)."""

    def __init__(self, h: float) -> None:
        self.h = _check_positive("half_life", "h", h)

    def decay(self, n: int) -> float:
        return 2.0 ** (-1.0 / self.h)

    def decay_tensor(self, n):
        return torch.full_like(n, 2.0 ** (-1.0 / self.h))


def sigma_rel_to_gamma(sigma_rel: float) -> float:
    """The power-function exponent gamma whose EMA has relative width ``sigma_rel`` (EDM2).

    EDM2 gives ``sigma_rel**2 = (g + 1) / ((g + 2)**2 (g + 3))``, i.e. the cubic
    ``g**3 + 7 g**2 + (16 - t) g + (12 - t) = 0`` with ``t = sigma_rel**-2``; the
    wanted gamma is its largest real root, found here by Newton's method started to
    its right (the cubic is convex there, so the iteration descends monotonically).
    """
    sigma_rel = _check_positive("sigma_rel_to_gamma", "sigma_rel", sigma_rel)
    t = sigma_rel ** -2
    g = max(t, 1.0)
    for _ in range(200):
        f = ((g + 7.0) * g + (16.0 - t)) * g + (12.0 - t)
        df = (3.0 * g + 14.0) * g + (16.0 - t)
        step = f / df
        g -= step
        if abs(step) <= 1e-14 * max(1.0, abs(g)):
            break
    if g <= -1.0:
        raise ValueError(f"sigma_rel={sigma_rel} is too large: no power-function EMA is that wide")
    return g


class karras_power(Schedule):
    """``decay(n) = (1 - 1/n) ** (1 + gamma)``: the power-function EMA of EDM2.

    Give either ``gamma`` (> -1) or ``sigma_rel`` (converted with :func:`sigma_rel_to_gamma`).
    ``decay(1) = 0``: the first update copies the model.  ema-pytorch's ``KarrasEMA``
    counts the weights at its first call as sample 1 and uses ``n = k + 1`` at its
    k-th update: ``EMA(m, schedule=karras_power(...)).update(step=k + 1)`` matches it
    when the EMA is made just before training starts.
    """

    def __init__(self, gamma: float | None = None, sigma_rel: float | None = None) -> None:
        if (gamma is None) == (sigma_rel is None):
            raise ValueError("karras_power: give exactly one of gamma or sigma_rel")
        if sigma_rel is not None:
            gamma = sigma_rel_to_gamma(sigma_rel)
        gamma = float(gamma)
        if not (gamma > -1.0 and math.isfinite(gamma)):
            raise ValueError(f"karras_power: gamma must be a finite number > -1, got {gamma}")
        self.gamma = gamma

    def decay(self, n: int) -> float:
        if n <= 1:
            return 0.0
        return (1.0 - 1.0 / n) ** (1.0 + self.gamma)

    def decay_tensor(self, n):
        value = (1.0 - 1.0 / n.clamp(min=1)) ** (1.0 + self.gamma)
        return torch.where(n <= 1, torch.zeros_like(n), value)


class swa(Schedule):
    """``decay(n) = (n - 1) / n``: the uniform average of every update (AveragedModel's SWA)."""

    def decay(self, n: int) -> float:
        return (n - 1) / n if n >= 1 else 0.0

    def decay_tensor(self, n):
        return torch.where(n >= 1, (n - 1) / n.clamp(min=1), torch.zeros_like(n))
