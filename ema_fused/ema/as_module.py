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
"""
from __future__ import annotations

from typing import Any

from torch import nn


class EMAStateModule(nn.Module):
    """Holds an :class:`~ema_fused.EMA` so that its owner's ``state_dict()`` includes it.

    Has no parameters or buffers and no ``forward``; ``.ema`` is the EMA.  Its state
    (``get_extra_state``) is ``ema.state_dict()``, loadable with
    ``torch.load(weights_only=True)``; the owner's ``load_state_dict`` calls
    ``ema.load_state_dict`` with it (a missing key is reported under ``strict``).
    """

    def __init__(self, ema: Any) -> None:  # an EMA (ema.py imports this module, not back)
        super().__init__()
        self.ema = ema

    def get_extra_state(self) -> dict:
        return self.ema.state_dict()

    def set_extra_state(self, state: Any) -> None:
        if not isinstance(state, dict):
            raise TypeError(f"EMAStateModule: expected the dict of EMA.state_dict(), got "
                            f"{type(state).__name__}")
        self.ema.load_state_dict(state)

    def forward(self, *args, **kwargs):
        raise RuntimeError("EMAStateModule only carries an EMA's state; use .ema "
                           "(e.g. .ema.average_parameters()) to evaluate with the average")

    def extra_repr(self) -> str:
        return f"tensors={len(self.ema._shadows)}, num_updates={self.ema.num_updates}"
