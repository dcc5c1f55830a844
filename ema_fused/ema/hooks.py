"""Optimizer step hooks: run a callback after every optimizer step that really changed the weights.

``EMA.attach(optimizer)`` and the training-loop integrations use this to count only
real steps.  A step that ``GradScaler`` skips because of inf/NaN gradients is seen
in one of two ways:

- for most optimizers ``GradScaler.step`` does not call ``optimizer.step()`` at all,
  so no post-hook runs;
- for optimizers that handle the scaling themselves (``_step_supports_amp_scaling``,
  e.g. ``Adam(fused=True)``) ``step()`` is always called and skips on the device; the
  scaler then sets ``optimizer.found_inf`` for the duration of the step, and the hook
  reads it (one host sync, only on that path).
"""
from __future__ import annotations

import weakref
from typing import Any, Callable

import torch
from torch.utils.hooks import RemovableHandle

# optimizer -> the EMAs attached to it, to refuse updating the same EMA twice per step.
_ATTACHED: "weakref.WeakKeyDictionary[torch.optim.Optimizer, weakref.WeakSet]" = (
    weakref.WeakKeyDictionary())


def innermost_optimizer(optimizer: Any) -> torch.optim.Optimizer:
    """The ``torch.optim.Optimizer`` whose ``step()`` really runs.

    Wrappers such as accelerate's ``AcceleratedOptimizer`` (``.optimizer``) and
    Lightning's ``LightningOptimizer`` (``._optimizer``) forward ``step()`` to an inner
    optimizer, and only the inner one runs its step hooks.
    """
    seen = set()
    while id(optimizer) not in seen:
        seen.add(id(optimizer))
        inner = getattr(optimizer, "optimizer", None) or getattr(optimizer, "_optimizer", None)
        if isinstance(inner, torch.optim.Optimizer):
            optimizer = inner
        else:
            break
    if not isinstance(optimizer, torch.optim.Optimizer):
        raise TypeError(f"ema_fused: expected a torch.optim.Optimizer, got {type(optimizer).__name__}")
    return optimizer


def step_was_skipped(optimizer: torch.optim.Optimizer) -> bool:
    """True inside a ``step()`` that a GradScaler told to skip (inf/NaN gradients)."""
    found_inf = getattr(optimizer, "found_inf", None)
    return isinstance(found_inf, torch.Tensor) and bool(found_inf.item())


def on_real_step(optimizer: Any, fn: Callable[[], None]) -> RemovableHandle:
    """Call ``fn()`` after every optimizer step that was not skipped; returns the hook handle."""
    opt = innermost_optimizer(optimizer)

    def hook(opt_: torch.optim.Optimizer, args: tuple, kwargs: dict) -> None:
        if not step_was_skipped(opt_):
            fn()

    return opt.register_step_post_hook(hook)


def order_before_steps(ema: Any) -> Any:
    """For an EMA with offloaded shadows of CUDA params: wait for its capture with a
    stream wait just before the next optimizer step (of any torch optimizer), not at the
    end of each ``update()``, so that the forward and backward overlap the transfer.
    The returned handle's ``remove()`` undoes it.  ``EMA.attach`` and the training-loop
    callbacks use it; a loop calling ``update()`` after its optimizer steps may too."""
    return ema._defer_fences()


class AttachHandle:
    """What ``EMA.attach`` returns: ``remove()`` detaches the EMA from the optimizer."""

    def __init__(self, optimizer: torch.optim.Optimizer, ema: Any, hook: RemovableHandle,
                 fences: Any) -> None:
        self._optimizer = weakref.ref(optimizer)
        self._ema = weakref.ref(ema)
        self._hook = hook
        self._fences = fences

    def remove(self) -> None:
        """Stop updating the EMA after this optimizer's steps (safe to call twice)."""
        self._hook.remove()
        self._fences.remove()
        opt, ema = self._optimizer(), self._ema()
        if opt is not None and ema is not None and opt in _ATTACHED:
            _ATTACHED[opt].discard(ema)

    def __enter__(self) -> "AttachHandle":
        return self

    def __exit__(self, *exc: object) -> None:
        self.remove()


def attach(ema: Any, optimizer: Any) -> AttachHandle:
    """``ema.update()`` after every real step of ``optimizer`` (see :meth:`EMA.attach`)."""
    opt = innermost_optimizer(optimizer)
    attached = _ATTACHED.setdefault(opt, weakref.WeakSet())
    if ema in attached:
        raise RuntimeError("EMA.attach: this EMA is already attached to this optimizer; "
                           "a second hook would update it twice per step")
    for other, emas in list(_ATTACHED.items()):
        if other is not opt and ema in emas:
            # each attach updates once per step of its optimizer: two optimizers stepping
            # in one iteration (one per parameter kind, say) would update it twice
            raise RuntimeError(
                f"EMA.attach: this EMA is already attached to another optimizer "
                f"({type(other).__name__}); if both step in one iteration it would update "
                "twice per iteration. Attach it to the optimizer that steps last, or call "
                "ema.update(step) yourself; remove() the first handle to move it")
    ema_ref = weakref.ref(ema)  # the hook must not keep the EMA (and its shadows) alive

    def update() -> None:
        target = ema_ref()
        if target is not None:
            target.update()

    handle = AttachHandle(opt, ema, on_real_step(opt, update), order_before_steps(ema))
    attached.add(ema)
    return handle
