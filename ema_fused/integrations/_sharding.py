"""The one place the integrations refuse sharded models, until ``EMA`` supports them.

Sharded training (FSDP2 / DTensor parameters read as their local shards, no gather)
is being added to ``EMA`` itself.  Until it lands, an EMA of a sharded model would
either fail deep inside an update or, worse, average something other than the weights
(FSDP1's flat parameters, DeepSpeed ZeRO-3's empty placeholders).  So the integrations
fail at the start of training with this message.  Lifting it: delete the DTensor test
below and the framework checks that call :func:`refuse_sharded`.
"""
from __future__ import annotations

from typing import Optional

from torch import nn


def _has_dtensor(module: nn.Module) -> bool:
    try:
        from torch.distributed.tensor import DTensor
    except ImportError:  # a torch without torch.distributed
        return False
    return any(isinstance(t, DTensor) for t in module.state_dict().values())


def refuse_sharded(module: nn.Module, sharded_by: Optional[str]) -> None:
    """Raise ``NotImplementedError`` if ``module`` is sharded (``sharded_by``: the
    framework's strategy that shards it, as the framework reported it; or DTensor state)."""
    if sharded_by is None and _has_dtensor(module):
        sharded_by = "DTensor parameters or buffers"
    if sharded_by is not None:
        raise NotImplementedError(
            f"ema_fused: the model is sharded ({sharded_by}); EMA does not average sharded "
            "models yet (sharded training support is in progress). It refuses rather than "
            "gather the full weights on every rank. Use a data-parallel strategy (DDP) for now.")
