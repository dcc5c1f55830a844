"""What torch_ema's and diffusers' classes share: an EMA of a parameter list whose shadows
keep each parameter's dtype, seen as the peers' lists (``shadow_params``, the stored
copy), and loading those lists from a peer's checkpoint."""
from __future__ import annotations

from typing import Iterable, Optional

import torch

from ..ema import EMA


def list_ema(parameters: list[torch.Tensor]) -> EMA:
    """An EMA of ``parameters``; shadows beside and in the dtype of each (as the peers')."""
    return EMA(parameters, dtype=None)


def as_list(parameters: Optional[Iterable[torch.Tensor]]) -> Optional[list[torch.Tensor]]:
    """``parameters`` read once (a generator such as ``model.parameters()``), or None."""
    if parameters is None or isinstance(parameters, list):
        return parameters
    return list(parameters)


def shadow_list(ema: EMA) -> list[torch.Tensor]:
    """The shadows by position (a tensor given twice appears twice)."""
    return [s for _, s in ema.named_shadows()]


def stored_list(ema: EMA) -> Optional[list[torch.Tensor]]:
    """What ``store()`` kept, by position, or None."""
    stored = ema.stored_weights()
    return None if stored is None else [stored[str(i)] for i in range(len(stored))]


def load_stored_list(ema: EMA, tensors: Optional[list[torch.Tensor]]) -> None:
    ema.load_stored_weights(None if tensors is None else
                            {str(i): t for i, t in enumerate(tensors)})


def shape_mismatch(ema: EMA, values: list[torch.Tensor]) -> Optional[str]:
    """A message naming the first value whose shape differs from its shadow's, or None."""
    for i, (v, s) in enumerate(zip(values, shadow_list(ema))):
        if v.shape != s.shape:
            return (f"shadow_params[{i}] has shape {tuple(v.shape)} but parameter {i} has "
                    f"shape {tuple(s.shape)}")
    return None


def load_shadow_list(ema: EMA, values: list[torch.Tensor]) -> None:
    """Copy ``values`` (one per position, shapes already checked) into the shadows, each
    cast to its shadow's dtype and device, through ``EMA.load_state_dict`` (its checks,
    its lock; the counters stay)."""
    state = ema.state_dict()
    shadows = state["shadows"]
    state["shadows"] = {name: v.to(device=shadows[name].device, dtype=shadows[name].dtype)
                        for name, v in ((str(i), v) for i, v in enumerate(values))
                        if name in shadows}
    ema.load_state_dict(state)
