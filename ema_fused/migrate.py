"""Bring an EMA saved by another package into an ``ema_fused.EMA``.

    from ema_fused import EMA, migrate
    ema = EMA(model, decay=0.9999)                    # configured as in the README's recipe table
    report = migrate.load_peer_state_dict(ema, torch.load("timm_ckpt.pt")["state_dict_ema"],
                                          "timm", step=12000)
    report.missing, report.unexpected                 # names on one side only (strict=False)

The peer's averages become the shadows and the peer's step (where it saved one)
becomes ``ema.num_updates``, so that ``update()`` continues the same schedule.  Every
check runs before anything is written (``EMA.load_state_dict`` does the writing):
shapes, dtypes (nothing is downcast: a float64 average needs ``EMA(dtype=None)`` or a
float64 shadow), and, under ``strict=True``, names missing or unexpected on either side.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable, Mapping, Optional, Sequence

import torch

from .ema import checkpoint as _checkpoint

__all__ = ["load_peer_state_dict", "PeerLoad", "SOURCES"]


@dataclass
class PeerLoad:
    """What :func:`load_peer_state_dict` did: the step set, and the names on one side only."""
    step: int
    missing: list = field(default_factory=list)      # ours, not in the peer's checkpoint
    unexpected: list = field(default_factory=list)   # the peer's, not tracked by this EMA


def _need(state: Any, keys: Sequence[str], source: str, what: str) -> Mapping:
    if not isinstance(state, Mapping) or any(k not in state for k in keys):
        have = sorted(map(str, state))[:8] if isinstance(state, Mapping) else type(state).__name__
        raise ValueError(f"migrate: source={source!r} expects {what} (with keys {list(keys)}); "
                         f"got {have}")
    return state


def _prefixed(state: Mapping, prefix: str) -> dict:
    return {k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix)}


def _selected_names(ema) -> list[str]:
    """The parameters a list-based peer was given, in order, by this EMA's selection: the
    tracked module's ``named_parameters()`` (or the tensor list's indices), less the
    frozen ones where the EMA is ``trainable_only`` (torch_ema's recipe passes
    ``[p for p in model.parameters() if p.requires_grad]``)."""
    module = ema._tracked.module
    names = ([n for n, _ in module.named_parameters()] if module is not None
             else [str(i) for i in range(len(ema._tracked.tensors))])
    frozen = {s.name for s in ema._tracked.frozen}
    return [n for n in names if n not in frozen]


def _count_mismatch(ema, count: int, names: list, given: bool, source: str) -> ValueError:
    """The refusal of a list that does not have one shadow per selected parameter."""
    trainable_only = bool(ema._tracked.frozen)
    if given:
        what = f"param_names has {len(names)} names"
    else:
        kind = "trainable parameters" if trainable_only else "parameters"
        what = f"this EMA's model has {len(names)} {kind}"
    hint = "pass param_names= with the name of each entry"
    module = ema._tracked.module
    if not given and not trainable_only and module is not None and count == sum(
            p.requires_grad for p in module.parameters()):
        hint = ("the peer was likely given only the trainable parameters (torch_ema's "
                "recipe): make the EMA with trainable_only=True, or " + hint)
    return ValueError(f"migrate: source={source!r} holds {count} shadows in a list, matched "
                      f"to parameters by position, but {what}: every name after the first "
                      f"difference would be shifted, so nothing was loaded; {hint}")


def _positional(ema, tensors: list, names: Optional[Sequence[str]], source: str) -> dict:
    """Name a peer's list of shadows (torch_ema, diffusers keep lists in the order of the
    parameters they were given): by ``names``, else by this EMA's selection of the
    parameters (:func:`_selected_names`).  The counts must agree, whatever ``strict``
    says: a list matched by position cannot tell which entry is missing."""
    if not isinstance(tensors, (list, tuple)):
        raise ValueError(f"migrate: source={source!r}: shadow_params is a "
                         f"{type(tensors).__name__}, not a list")
    given = names is not None
    names = list(names) if given else _selected_names(ema)
    if len(names) != len(tensors):
        raise _count_mismatch(ema, len(tensors), names, given, source)
    return dict(zip(names, tensors))


def _timm(ema, state, names):
    if isinstance(state, Mapping) and "state_dict_ema" in state:  # timm's train.py checkpoint
        state = state["state_dict_ema"]
    return dict(_need(state, (), "timm", "ModelEmaV2/V3 .module.state_dict()")), None


def _ema_pytorch(ema, state, names):
    state = _need(state, ("step",), "ema_pytorch", "ema_pytorch.EMA.state_dict()")
    return _prefixed(state, "ema_model."), int(state["step"])


def _torch_ema(ema, state, names):
    state = _need(state, ("shadow_params",), "torch_ema",
                  "ExponentialMovingAverage.state_dict()")
    steps = state.get("num_updates")  # None unless use_num_updates=True
    return _positional(ema, state["shadow_params"], names, "torch_ema"), steps


def _diffusers(ema, state, names):
    state = _need(state, ("shadow_params", "optimization_step"), "diffusers",
                  "diffusers EMAModel.state_dict()")
    return (_positional(ema, state["shadow_params"], names, "diffusers"),
            int(state["optimization_step"]))


def _averaged_model(ema, state, names):
    state = _need(state, ("n_averaged",), "averaged_model", "AveragedModel.state_dict()")
    return _prefixed(state, "module."), int(state["n_averaged"])


def _lightning(ema, ckpt, names):
    ckpt = _need(ckpt, ("state_dict", "current_model_state", "averaging_state", "global_step"),
                 "lightning", "a checkpoint saved with Lightning's EMAWeightAveraging")
    # EMAWeightAveraging puts the average in "state_dict" (the raw weights beside it) and
    # updates once per optimizer step: its average belongs to step global_step.
    return dict(ckpt["state_dict"]), int(ckpt["global_step"])


_READERS: dict[str, Callable] = {
    "timm": _timm, "ema_pytorch": _ema_pytorch, "torch_ema": _torch_ema,
    "diffusers": _diffusers, "averaged_model": _averaged_model, "lightning": _lightning,
}
SOURCES = tuple(_READERS)


def _decay_at(ema, s: int) -> float:
    return 0.0 if s <= ema.update_after_step else float(ema.schedule(s - ema.update_after_step))


def _decays_up_to(ema, step: int) -> tuple[Optional[float], float]:
    """The decay of the last update that changed the shadows by ``step`` (None: none did)
    and the product of all of them, as ``EMA.update`` would have left them."""
    changed = range(ema.update_every, step + 1, ema.update_every)
    product = 1.0
    for s in changed:
        product *= _decay_at(ema, s)
        if product == 0.0:  # it stays 0 (most recipes copy at the first update: at once)
            break
    return (_decay_at(ema, changed[-1]) if changed else None), product


def load_peer_state_dict(ema, state_dict: Any, source: str, *, step: Optional[int] = None,
                         strict: bool = True,
                         param_names: Optional[Sequence[str]] = None) -> PeerLoad:
    """Set ``ema``'s shadows (and step) from a peer package's EMA checkpoint.

    Args:
        ema: the :class:`ema_fused.EMA` to load into (not bias-corrected: no peer is).
        state_dict: what the peer saved: timm ``model_ema.module.state_dict()`` (or a
            timm ``train.py`` checkpoint with ``state_dict_ema``), ema-pytorch
            ``EMA.state_dict()``, torch_ema / diffusers ``state_dict()``,
            ``AveragedModel.state_dict()``, or a whole Lightning checkpoint written with
            ``EMAWeightAveraging``.
        source: one of :data:`SOURCES`.
        step: the optimizer step of the checkpoint; overrides the peer's own, and is
            required where the peer saves none (timm; torch_ema without use_num_updates).
        strict: raise ``KeyError`` listing missing and unexpected names (else report them).
        param_names: for list-based peers (torch_ema, diffusers), the name of each entry of
            ``shadow_params`` when they are not the module's ``named_parameters()`` order
            (the trainable ones only for an EMA made with ``trainable_only=True``).  A list
            whose length differs from the names is refused (``ValueError``), strict or
            not: matched by position, every name after a missing entry would shift.

    Returns:
        a :class:`PeerLoad` with the step set and the names found on one side only.
    """
    if source not in _READERS:
        raise ValueError(f"migrate: unknown source {source!r}; expected one of {SOURCES}")
    if ema.bias_correction:
        raise ValueError("migrate: this EMA has bias_correction=True (shadows start at zero); "
                         "peers store plain averages: make the EMA with bias_correction=False")
    shadows, peer_step = _READERS[source](ema, state_dict, param_names)
    step = peer_step if step is None else step
    if step is None:
        raise ValueError(f"migrate: a {source!r} checkpoint holds no step; pass step=<the "
                         "optimizer step at which it was saved>")
    if isinstance(step, bool) or not isinstance(step, int) or step < 0:
        raise ValueError(f"migrate: step must be an integer >= 0, got {step!r}")
    pairs, missing, unexpected = _checkpoint.match_keys([e.name for e in ema._tracked.entries],
                                                        shadows)
    if strict and (missing or unexpected):
        raise KeyError(f"migrate: from {source!r}: missing names {missing}, unexpected names "
                       f"{unexpected} (strict=False loads the others and reports these)")
    decay, product = _decays_up_to(ema, step)
    ema.load_state_dict({
        "format": _checkpoint.FORMAT, "version": _checkpoint.VERSION,
        "shadows": {key: shadows[key] for key in pairs.values()},
        "step": step, "decay": decay, "decay_product": product, "bias_correction": False,
    }, strict=False)
    return PeerLoad(step, missing, unexpected)
