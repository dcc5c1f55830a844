"""The one place the integrations refuse sharded models that ``EMA`` cannot follow.

``EMA`` averages FSDP2 / DTensor models shard by shard (each rank its own shards, no
gather; see README "Distributed training"), so Lightning's ``ModelParallelStrategy`` and
any model whose parameters are DTensors just work.  FSDP1 (Lightning's ``FSDPStrategy``,
``TrainingArguments.fsdp`` without FSDP2) flattens parameters into its own buffers and
DeepSpeed ZeRO-3 leaves empty placeholders in the model: an EMA there would average
something other than the weights, so the integrations fail at the start of training.
"""
from __future__ import annotations

from typing import Optional

from torch import nn


def has_dtensor(module: nn.Module) -> bool:
    """Whether any parameter or buffer of ``module`` is a DTensor (FSDP2, tensor parallel)."""
    try:
        from torch.distributed.tensor import DTensor
    except ImportError:  # a torch without torch.distributed
        return False
    return any(isinstance(t, DTensor) for t in module.state_dict(keep_vars=True).values())


def refuse_unsupported_sharding(sharded_by: Optional[str]) -> None:
    """Raise ``NotImplementedError`` naming ``sharded_by`` (the framework's strategy that
    shards the model in a way EMA cannot follow), if it is not None."""
    if sharded_by is not None:
        raise NotImplementedError(
            f"ema_fused: the model is sharded by {sharded_by}, whose parameters EMA cannot "
            "average shard by shard (FSDP1 flat parameters, DeepSpeed ZeRO-3 placeholders). "
            "Use FSDP2 (fully_shard; Lightning's ModelParallelStrategy, or fsdp_version=2 in "
            "TrainingArguments' fsdp_config): EMA then keeps DTensor shadows of each rank's "
            "shards, without gathering. Or use DDP.")
