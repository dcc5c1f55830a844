"""``EMA.as_module()``: an ``nn.Module`` face of an EMA, so that the EMA travels in its
owner's ``state_dict()``.

An ``EMA`` is not an ``nn.Module``: kept as an attribute of a model or a
LightningModule it is left out of their ``state_dict()``.  Registering
``ema.as_module()`` as a submodule puts the EMA's whole checkpoint (shadows and
counters, :meth:`EMA.state_dict`) under one key, ``<name>._extra_state``, through
torch's extra-state protocol (``get_extra_state`` / ``set_extra_state``).

Why extra state and not buffers: buffers would be moved and cast by the owner's
``.to()``, ``.half()`` and ``.cuda()``, so FP32 master shadows would become fp16, and
shadows kept on the CPU (``device="cpu"``) would follow the model to the GPU; and the
counters (step, decay product) must travel with the shadows anyway.  Extra state is
never touched by those calls: shadows keep following their own rules.

Two guards keep an EMA registered in the very model it tracks sound:

- the tracking layer reads a model's ``state_dict()`` only for its tensor names, inside
  :func:`tensor_names_only`, where ``get_extra_state`` hands out nothing (it would call
  the EMA's ``state_dict``, which reads the model, which asks the EMA, ...);
- the module an ``EMAStateModule`` is registered in gets a load pre-hook that checks
  the EMA's part of a state dict before any of its tensors is loaded, so a refused
  EMA part leaves the owner's weights as they were (torch loads parents, then children
  in order, and calls ``set_extra_state`` only when it reaches this module).
"""
from __future__ import annotations

import contextlib
import threading
from typing import Any, Iterator, Optional

from torch import nn
from torch.utils.hooks import RemovableHandle

from . import checkpoint as _checkpoint

_names_only = threading.local()
_registration: Optional[RemovableHandle] = None


@contextlib.contextmanager
def tensor_names_only() -> Iterator[None]:
    """Inside (this thread only): ``EMAStateModule.get_extra_state`` returns None, for
    callers that read a ``state_dict()`` only for the names of its tensors."""
    before = getattr(_names_only, "on", False)
    _names_only.on = True
    try:
        yield
    finally:
        _names_only.on = before


def _check_ema_parts_first(owner: nn.Module, state_dict: dict, prefix: str,
                           *args: Any) -> None:
    """A load pre-hook of a module holding ``EMAStateModule`` children: check each one's
    part of ``state_dict`` (as ``EMA.load_state_dict`` would) before any tensor is loaded."""
    for name, child in owner._modules.items():
        key = f"{prefix}{name}._extra_state"
        if isinstance(child, EMAStateModule) and key in state_dict:
            child.check_extra_state(state_dict[key])


def _on_registration(parent: nn.Module, name: str, child: Optional[nn.Module]) -> None:
    """torch's global module registration hook: a parent gaining an ``EMAStateModule``
    gets :func:`_check_ema_parts_first` once (a module-level function, so the hook
    survives ``deepcopy`` and pickling of the parent)."""
    if not isinstance(child, EMAStateModule):
        return None
    hooks = parent._load_state_dict_pre_hooks.values()
    if not any(getattr(h, "hook", None) is _check_ema_parts_first for h in hooks):
        parent.register_load_state_dict_pre_hook(_check_ema_parts_first)
    return None


def _watch_registrations() -> None:
    """Install :func:`_on_registration` once: global state in torch only once an
    ``EMAStateModule`` exists in this process."""
    global _registration
    if _registration is None:
        _registration = nn.modules.module.register_module_module_registration_hook(
            _on_registration)


class EMAStateModule(nn.Module):
    """Holds an :class:`~ema_fused.EMA` so that its owner's ``state_dict()`` includes it.

    Has no parameters or buffers and no ``forward``; ``.ema`` is the EMA.  Its state
    (``get_extra_state``) is ``ema.state_dict()``, loadable with
    ``torch.load(weights_only=True)``; the owner's ``load_state_dict`` checks that state
    before it loads any of the owner's tensors, then calls ``ema.load_state_dict`` with it
    (a missing key is reported under ``strict``).
    """

    def __init__(self, ema: Any) -> None:  # an EMA (ema.py imports this module, not back)
        super().__init__()
        self.ema = ema
        _watch_registrations()

    def __setstate__(self, state: dict) -> None:
        super().__setstate__(state)
        _watch_registrations()  # unpickled in a process that made none

    def get_extra_state(self) -> Optional[dict]:
        if getattr(_names_only, "on", False):
            return None
        return self.ema.state_dict()

    def _checked_type(self, state: Any) -> dict:
        if not isinstance(state, dict):
            raise TypeError(f"EMAStateModule: expected the dict of EMA.state_dict(), got "
                            f"{type(state).__name__}")
        return state

    def check_extra_state(self, state: Any) -> None:
        """Raise as ``set_extra_state(state)`` would, changing nothing."""
        state = self._checked_type(state)
        ema = self.ema
        with ema._lock:
            ema._guard("load_state_dict")
            ema._sync_sharding()
            _checkpoint.checked(ema, state, strict=True)

    def set_extra_state(self, state: Any) -> None:
        self.ema.load_state_dict(self._checked_type(state))

    def forward(self, *args, **kwargs):
        raise RuntimeError("EMAStateModule only carries an EMA's state; use .ema "
                           "(e.g. .ema.average_parameters()) to evaluate with the average")

    def extra_repr(self) -> str:
        return f"tensors={len(self.ema._shadows)}, num_updates={self.ema.num_updates}"
