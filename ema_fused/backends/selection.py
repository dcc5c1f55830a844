"""The one place that picks a kernel backend for a group of tensors on one device.

Backends are tried in :data:`PREFERENCE` order by ``backend="auto"``; each can say
why it cannot run (:meth:`Backend.not_supported_reasons`).  ``auto`` falls back
quietly and logs its choice once; a backend asked for by name fails loudly with
its reasons.  The environment variable ``EMA_FUSED_BACKEND`` replaces ``"auto"``.
"""
from __future__ import annotations

import logging
import os
from typing import Callable, Optional, Sequence

import torch

from ..checks import devices as _devices

log = logging.getLogger("ema_fused")

#: Every backend name, fastest first; ``auto`` takes the first usable one.
PREFERENCE = ("cuda", "triton", "cpu", "foreach")
ENV_VAR = "EMA_FUSED_BACKEND"


class BackendUnavailableError(RuntimeError):
    """A backend asked for by name cannot run here; the message says why."""


class Backend:
    """A kernel family: ``update_``, ``copy_``, ``swap_`` over lists of tensors on one device.

    ``update_(shadows, params, weight, skip_nonfinite=False)``: ``shadows[i] += weight *
    (params[i] - shadows[i])``; with ``skip_nonfinite`` an element whose param is NaN or
    +-Inf keeps its shadow.
    ``copy_(dst, src, scale)``: ``dst[i] = src[i] * scale`` cast to ``dst[i].dtype``.
    ``swap_(a, b)``: exchange ``a[i]`` and ``b[i]`` (equal dtypes).
    ``weighted_sum_(out, inputs, weight)``: ``out[i] += weight * inputs[i]`` (float32 or
    float64 outs, any finite weight); a backend without one leaves it to ``foreach``.
    ``multi_update_(shadows, params, weights)``: for each profile k, ``update_(shadows[k],
    params, weights[k])``, bit for bit, each param read once (None: the foreach loop).
    """

    def __init__(self, name: str, description: str,
                 update_: Callable[[Sequence[torch.Tensor], Sequence[torch.Tensor], float], None],
                 copy_: Callable[[Sequence[torch.Tensor], Sequence[torch.Tensor], float], None],
                 reasons: Callable[[Optional[torch.device]], list[str]],
                 auto_device_types: Optional[tuple[str, ...]] = None,
                 swap_: Optional[Callable[[Sequence[torch.Tensor], Sequence[torch.Tensor]], None]]
                 = None, prepare: Optional[Callable] = None,
                 on_request: Optional[Callable[[], None]] = None,
                 weighted_sum_: Optional[Callable[[Sequence[torch.Tensor],
                                                   Sequence[torch.Tensor], float], None]]
                 = None, multi_update_: Optional[Callable] = None) -> None:
        self.name = name
        self.weighted_sum_ = weighted_sum_
        self.multi_update_ = multi_update_
        # run before a request by name is checked (the C++ backends build the extension
        # just in time there); ``auto`` never runs it
        self.on_request = on_request
        self.swap_ = swap_
        # prepare(shadows, params) -> object with update_(weight, skip_nonfinite=False) and
        # copy_(scale) that skips per-call checks and table look-ups; only for callers
        # that re-check the tensors' addresses, dtypes and layouts before each reuse (EMA)
        self.prepare = prepare
        # device types where ``auto`` may take it (None: wherever it can run); the
        # Triton interpreter can run on the CPU, but only a test would want that
        self.auto_device_types = auto_device_types
        self.description = description
        self.update_ = update_
        self.copy_ = copy_
        self._reasons = reasons

    def not_supported_reasons(self, device: Optional[torch.device] = None) -> list[str]:
        """Why this backend cannot run on ``device`` (or at all, for ``None``); empty if it can."""
        return self._reasons(device)

    def __repr__(self) -> str:
        return f"Backend({self.name!r})"


_registry: dict[str, Backend] = {}
_logged: set[tuple[str, str]] = set()


def register_backend(backend: Backend) -> None:
    """Make ``backend`` selectable by name and by ``auto`` (in :data:`PREFERENCE` order)."""
    if backend.name not in PREFERENCE:
        raise ValueError(f"unknown backend name {backend.name!r}; expected one of {PREFERENCE}")
    _registry[backend.name] = backend


def _reasons(name: str, device: Optional[torch.device]) -> list[str]:
    missing = _devices.unavailable(device) if device is not None else None
    if missing is not None:  # before any backend's probe touches the device
        return [missing]
    if name in _registry:
        return _registry[name].not_supported_reasons(device)
    return ["not registered"]


def default_device() -> torch.device:
    """The current CUDA device where CUDA is available, else the CPU."""
    if torch.cuda.is_available():
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def available_backends(device: Optional[torch.device | str] = None) -> dict[str, tuple[bool, str]]:
    """``{name: (usable, reason)}`` for every backend, for tensors on ``device``.

    ``device=None`` means the device a model would be on here: the current CUDA device
    where CUDA is available, else the CPU (so that on a CPU-only machine the answer is
    ``available_backends("cpu")``'s and ``python -m ema_fused``'s).
    """
    dev = torch.device(device) if device is not None else default_device()
    out = {}
    for name in PREFERENCE:
        reasons = _reasons(name, dev)
        if reasons:
            out[name] = (False, "; ".join(reasons))
        else:
            out[name] = (True, _registry[name].description)
    return out


def resolve_name(requested: str) -> str:
    """Apply ``EMA_FUSED_BACKEND`` to ``"auto"`` and check the name is known."""
    if not isinstance(requested, str):
        raise TypeError(f"backend must be a string, got {type(requested).__name__}")
    name = requested.strip().lower()
    if name == "auto":
        name = os.environ.get(ENV_VAR, "auto").strip().lower() or "auto"
        where = f" (from the environment variable {ENV_VAR})"
    else:
        where = ""
    if name != "auto" and name not in PREFERENCE:
        raise ValueError(f"unknown backend {name!r}{where}; expected 'auto' or one of "
                         f"{', '.join(PREFERENCE)}")
    return name


def select(requested: str, device: torch.device) -> Backend:
    """The backend that runs ops on ``device``: the named one, or the first usable for ``auto``."""
    name = resolve_name(requested)
    if name != "auto":
        if name in _registry and _registry[name].on_request is not None:
            _registry[name].on_request()
        reasons = _reasons(name, device)
        if reasons:
            raise BackendUnavailableError(
                f"backend {name!r} cannot run on {device}: " + "; ".join(reasons))
        return _registry[name]
    skipped = []
    for candidate in PREFERENCE:
        reasons = _reasons(candidate, device)
        auto_types = getattr(_registry.get(candidate), "auto_device_types", None)
        if not reasons and auto_types is not None and device.type not in auto_types:
            reasons = [f"auto uses it only on {', '.join(auto_types)}; ask for it by name"]
        if not reasons:
            key = (device.type, candidate)
            if key not in _logged:
                _logged.add(key)
                why = "; ".join(f"{n}: {r}" for n, r in skipped) or "none skipped"
                log.info("ema_fused: using backend %r on %s (%s)", candidate, device.type, why)
            return _registry[candidate]
        skipped.append((candidate, "; ".join(reasons)))
    raise BackendUnavailableError(f"no backend can run on {device}: " +
                                  "; ".join(f"{n}: {r}" for n, r in skipped))
