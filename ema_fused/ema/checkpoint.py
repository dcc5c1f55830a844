"""``EMA.state_dict`` / ``load_state_dict``: the format, key matching and load checks."""
from __future__ import annotations

from typing import Mapping, Optional

import torch

from .. import distributed as _distributed
from ..checks import as_flag, as_int, as_optional_real, as_real, lossless
from . import rounding as _rounding

FORMAT = "ema_fused.EMA"
VERSION = 1
_WRAPPER_SEGMENTS = ("module", "_orig_mod")  # DDP / DataParallel, torch.compile


def plain_name(name: str) -> str:
    """``name`` without the ``module.`` / ``_orig_mod.`` segments that wrappers insert."""
    return ".".join(part for part in name.split(".") if part not in _WRAPPER_SEGMENTS) or name


def match_keys(ours: list[str], theirs: Mapping[str, torch.Tensor]) -> tuple[dict, list, list]:
    """Pair our names with checkpoint keys by plain name: ``(ours -> key, missing, unexpected)``."""
    by_plain: dict[str, str] = {}
    for key in theirs:
        plain = plain_name(key)
        if plain in by_plain:
            raise ValueError(f"EMA.load_state_dict: keys {by_plain[plain]!r} and {key!r} "
                             "name the same tensor once wrapper prefixes are removed")
        by_plain[plain] = key
    pairs, missing = {}, []
    for name in ours:
        key = by_plain.pop(plain_name(name), None)
        if key is None:
            missing.append(name)
        else:
            pairs[name] = key
    return pairs, missing, sorted(by_plain.values())


def check_tensor(name: str, src: torch.Tensor, dst: torch.Tensor) -> None:
    """Raise unless ``src`` can be copied into shadow ``dst`` without loss."""
    if not isinstance(src, torch.Tensor):
        raise TypeError(f"EMA.load_state_dict: entry {name!r} is a {type(src).__name__}, "
                        "not a tensor")
    if src.shape != dst.shape:
        raise ValueError(f"EMA.load_state_dict: shadow {name!r} has shape {tuple(dst.shape)} "
                         f"but the checkpoint holds {tuple(src.shape)}")
    if not lossless(src.dtype, dst.dtype):
        raise TypeError(f"EMA.load_state_dict: shadow {name!r} is {dst.dtype} but the checkpoint "
                        f"holds {src.dtype}; loading would lose precision or change kind. "
                        "Make the EMA with a matching dtype= to load it")


def local_source(name: str, src: torch.Tensor, dst: torch.Tensor) -> torch.Tensor:
    """What to copy into shadow ``dst``'s local tensor (after :func:`check_tensor`): the
    local tensor of a DTensor laid out like ``dst``, or this rank's shard of a full
    plain tensor (no communication).  Raises naming the tensor otherwise."""
    if _distributed.same_layout(src, dst):
        return _distributed.local(src)
    if _distributed.is_dtensor(dst) and not _distributed.is_dtensor(src):
        box = _distributed.local_box(src, dst)
        if box is not None:
            return box
    raise ValueError(f"EMA.load_state_dict: shadow {name!r} is {_distributed.describe(dst)} but "
                     f"the checkpoint holds {_distributed.describe(src)}; load sharded "
                     "checkpoints of another layout with torch.distributed.checkpoint "
                     "(dcp.load reshards them)")


def _product(ema) -> float:
    sched = ema._device_schedule
    return ema._decay_product if sched is None else float(sched.product.item())


def state_of(ema) -> dict:
    """``EMA.state_dict()``: shadows by name (not copied), counters as Python numbers."""
    return {
        "format": FORMAT, "version": VERSION,
        "shadows": {e.name: s for e, s in zip(ema._tracked.entries, ema._shadows)},
        "step": ema.num_updates, "decay": ema.decay, "decay_product": _product(ema),
        "bias_correction": ema.bias_correction,
        **_rounding.checkpoint_fields(ema.rounding, ema.seed),
    }


def counters_of(state_dict: Mapping) -> tuple[int, Optional[float], float, bool]:
    """``(step, decay, decay_product, bias_correction)`` of a checkpoint, each checked for
    type and range (a step is an integer >= 0, a decay None or in [0, 1], the product of
    decays in [0, 1], the flag a bool), before anything is written."""
    for key in ("step", "decay", "decay_product", "bias_correction"):
        if key not in state_dict:
            raise KeyError(f"EMA.load_state_dict: the checkpoint has no {key!r}")
    return (as_int("EMA.load_state_dict: step", state_dict["step"], 0),
            as_optional_real("EMA.load_state_dict: decay", state_dict["decay"]),
            as_real("EMA.load_state_dict: decay_product", state_dict["decay_product"]),
            as_flag("EMA.load_state_dict: bias_correction", state_dict["bias_correction"]))


def seed_after_load(ema, state_dict: Mapping) -> Optional[int]:
    """The seed ``ema`` keeps after loading ``state_dict`` (its rounding fields checked)."""
    return _rounding.loaded_seed(state_dict, ema.rounding, ema.seed)


def checked(ema, state_dict: dict, strict: bool) -> tuple[list, tuple]:
    """Every check of :func:`load_into`, writing nothing: ``(copies, counters)``, the
    ``(shadow, source)`` local tensor pairs to copy and ``(step, decay, product)``."""
    if not isinstance(state_dict, Mapping) or state_dict.get("format") != FORMAT:
        raise ValueError("EMA.load_state_dict: not an ema_fused EMA state_dict")
    if state_dict.get("version") != VERSION:
        raise ValueError(f"EMA.load_state_dict: version {state_dict.get('version')} is not "
                         f"supported (this ema_fused writes {VERSION})")
    step, decay, product, bias_correction = counters_of(state_dict)
    seed_after_load(ema, state_dict)  # the rounding fields, checked before anything is written
    if bias_correction != ema.bias_correction:
        raise ValueError("EMA.load_state_dict: the checkpoint has bias_correction="
                         f"{bias_correction}, this EMA {ema.bias_correction}")
    names = [e.name for e in ema._tracked.entries]
    theirs = state_dict.get("shadows")
    if not isinstance(theirs, Mapping):
        raise TypeError("EMA.load_state_dict: 'shadows' must be a mapping of names to tensors, "
                        f"got {type(theirs).__name__}")
    pairs, missing, unexpected = match_keys(names, theirs)
    if strict and (missing or unexpected):
        raise KeyError(f"EMA.load_state_dict: missing keys {missing}, "
                       f"unexpected keys {unexpected}")
    index = {n: i for i, n in enumerate(names)}
    copies = []
    for name, key in pairs.items():
        dst = ema._shadows[index[name]]
        check_tensor(name, theirs[key], dst)
        copies.append((_distributed.local(dst), local_source(name, theirs[key], dst)))
    return copies, (step, decay, product)


def load_into(ema, state_dict: dict, strict: bool) -> None:
    """``EMA.load_state_dict()``: every check first (:func:`checked`), then the copies
    and counters."""
    copies, counters = checked(ema, state_dict, strict)
    with torch.no_grad():
        for dst, src in copies:
            if src is not dst:  # dcp.load fills the shadows in place, then passes them here
                dst.copy_(src)
    ema._step, ema._decay, ema._decay_product = counters
    ema.seed = seed_after_load(ema, state_dict)
    if ema._device_schedule is not None:
        ema._device_schedule.load(ema._step, ema._decay, ema._decay_product)
