"""What the tracking layer checks beyond "is every tensor still there": wrappers between
an EMA's model and the one it is given, tied weights that came apart (or together),
frozen parameters that became trainable, and tensors no EMA can hold (meta, expanded).

Each check raises :class:`ModelChangedError` (or ``TypeError`` at construction) naming
the tensors, so no silent wrong average can follow from a model that changed.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch
from torch import nn

from .. import distributed as _distributed
from ..checks import ModelChangedError


#: children that wrappers insert: DistributedDataParallel / DataParallel's ``module``,
#: torch.compile's ``_orig_mod``
WRAPPER_CHILDREN = ("module", "_orig_mod")


def _inner(module: nn.Module) -> Optional[nn.Module]:
    """The module a DDP / DataParallel / torch.compile wrapper holds, or None."""
    if isinstance(module, (nn.DataParallel, nn.parallel.DistributedDataParallel)):
        return module.module
    orig = module._modules.get("_orig_mod") if type(module).__name__ == "OptimizedModule" else None
    return orig


def unwrap(source: object) -> object:
    """The model inside DDP / DataParallel wrappers (which hold one full replica each):
    ``EMA(ddp_model)`` and ``EMA(ddp_model.module)`` then track the same tensors under the
    same names.  A compiled model keeps its ``_orig_mod.`` names (its state_dict's)."""
    while isinstance(source, (nn.DataParallel, nn.parallel.DistributedDataParallel)):
        source = source.module
    return source


def resolve(root: nn.Module, path: str) -> Optional[nn.Module]:
    """The module at ``path`` in ``root``, tolerant of wrappers on either side: a
    ``module`` / ``_orig_mod`` segment that ``root`` lacks is skipped, and a wrapper in
    ``root`` that the path does not name is looked through.  None if there is none."""
    mod = root
    for part in path.split(".") if path else ():
        nxt = mod._modules.get(part)
        while nxt is None and _inner(mod) is not None:
            mod = _inner(mod)
            nxt = mod._modules.get(part)
        if nxt is None and part in WRAPPER_CHILDREN:
            continue
        if nxt is None:
            return None
        mod = nxt
    while _inner(mod) is not None:
        mod = _inner(mod)
    return mod


@dataclass(frozen=True)
class Slot:
    """Where a name other than an entry's own is read: an alias of a tied tensor
    (``entry``: the index it shares), or a frozen parameter left out (``entry`` -1)."""
    name: str
    module_path: str
    key: str
    is_buffer: bool
    entry: int


def read_slot(mods: dict, s: Slot) -> Optional[torch.Tensor]:
    owner = mods.get(s.module_path)
    if owner is None:
        return None
    return (owner._buffers if s.is_buffer else owner._parameters).get(s.key)


def check_ties(names: list[str], out: list[torch.Tensor], aliases: list[Slot], mods: dict) -> None:
    """Tied weights must stay tied, and distinct ones distinct: a change in which tensors
    are tied is a model change (an untied head would keep its embedding's shadow)."""
    for s in aliases:
        if read_slot(mods, s) is not out[s.entry]:
            raise ModelChangedError(
                f"EMA: tensor {s.name!r} was tied to {names[s.entry]!r} when the EMA was made "
                "and is not any more; a change in which tensors are tied is a model change: "
                "make a new EMA for the new model")
    if len({id(t) for t in out}) != len(out):
        first: dict[int, int] = {}
        for i, t in enumerate(out):
            if id(t) in first:
                raise ModelChangedError(
                    f"EMA: tensors {names[first[id(t)]]!r} and {names[i]!r} were distinct when "
                    "the EMA was made and are now one tensor (tied); make a new EMA")
            first[id(t)] = i


def check_frozen(frozen: list[Slot], mods: dict) -> None:
    """Parameters left out by ``trainable_only=True`` must stay frozen."""
    for s in frozen:
        t = read_slot(mods, s)
        if t is not None and t.requires_grad:
            raise ModelChangedError(
                f"EMA: parameter {s.name!r} had requires_grad=False when the EMA was made with "
                "trainable_only=True, so it has no shadow, and it is trainable now; make a new "
                "EMA (or one without trainable_only)")


def check_holdable(name: str, t: torch.Tensor) -> None:
    """At construction: refuse tensors whose average could not be kept or written back."""
    local = _distributed.local(t)
    if local.device.type == "meta":
        raise TypeError(f"EMA: tensor {name!r} is on the meta device (it has no values yet): "
                        "create the EMA after materializing the model (e.g. after to_empty() "
                        "and loading or initializing its weights)")
    if local.numel() > 1 and torch._debug_has_internal_overlap(local) == 1:
        raise TypeError(f"EMA: tensor {name!r} (shape {tuple(local.shape)}, strides "
                        f"{local.stride()}) has elements that share memory (an expanded, "
                        "stride-0 view): its average could not be written back; exclude it or "
                        "make it a real tensor (e.g. .contiguous())")


def check_not_meta(name: str, t: torch.Tensor) -> None:
    """At each use: a model moved to ``meta`` has lost its values; its shadows must not
    follow it there (the average would be gone)."""
    if _distributed.local(t).device.type == "meta":
        raise ModelChangedError(f"EMA: tensor {name!r} is now on the meta device; the shadows "
                                "stay where they are: materialize the model again before "
                                "updating or reading the EMA")
