"""``EMA.state_dict`` / ``load_state_dict`` helpers: key matching and load checks."""
from __future__ import annotations

from typing import Mapping

import torch

from ._validate import lossless

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
