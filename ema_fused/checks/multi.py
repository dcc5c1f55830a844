"""Input checks of :func:`ema_fused.ops.ema_multi_update_`, run before anything is written.

Messages name the profile ``k`` and the index ``i`` (``shadows[k][i]``, ``params[i]``,
``weights[k]``).  One pass writes every profile's shadow of a param while reading the
param once, so no shadow may share memory with another shadow (of any profile) or with
any param, not even be the very tensor it averages.
"""
from __future__ import annotations

from typing import Sequence

import torch

from . import tensors as _validate

OP = "ema_multi_update_"
Tensors = Sequence[torch.Tensor]


def as_profiles(shadows) -> list[list[torch.Tensor]]:
    """``shadows`` as K lists (a sequence of sequences of tensors, not one flat list)."""
    if isinstance(shadows, torch.Tensor) or not isinstance(shadows, Sequence):
        raise TypeError(f"{OP}: shadows must be a sequence of K sequences of tensors "
                        f"(shadows[k][i]: profile k's shadow of params[i]), got "
                        f"{type(shadows).__name__}")
    out = []
    for k, profile in enumerate(shadows):
        if isinstance(profile, torch.Tensor) or not isinstance(profile, Sequence):
            raise TypeError(f"{OP}: shadows[{k}] must be a sequence of tensors (one profile's "
                            f"shadows), got {type(profile).__name__}")
        out.append(list(profile))
    return out


def unflatten(flat: Tensors, n_params: int, n_profiles: int) -> list[list[torch.Tensor]]:
    """The registered op's flat, profile-major list back as K lists."""
    if len(flat) != n_params * n_profiles:
        raise ValueError(f"{OP}: {len(flat)} shadows for {n_params} params and {n_profiles} "
                         f"weights; expected {n_params * n_profiles} (profile-major: shadows[k * "
                         f"{n_params} + i] is profile k's shadow of params[i])")
    return [list(flat[k * n_params:(k + 1) * n_params]) for k in range(n_profiles)]


def check(shadows: list[list[torch.Tensor]], params: Tensors, weights) -> list[float]:
    """Lengths, weights, each pair (shape, device, dtype) and writability; the weights as
    floats.  No overlap check (:func:`check_no_overlap`, which needs real addresses)."""
    if isinstance(weights, torch.Tensor) or not isinstance(weights, Sequence):
        raise TypeError(f"{OP}: weights must be a sequence of K Python numbers, got "
                        f"{type(weights).__name__}")
    if len(weights) != len(shadows):
        raise ValueError(f"{OP}: {len(shadows)} profiles of shadows but {len(weights)} weights")
    out = [_validate.check_scalar(OP, f"weights[{k}]", w) for k, w in enumerate(weights)]
    for i, p in enumerate(params):
        if not isinstance(p, torch.Tensor):
            raise TypeError(f"{OP}: params[{i}] is a {type(p).__name__}, not a tensor")
    for k, profile in enumerate(shadows):
        if len(profile) != len(params):
            raise ValueError(f"{OP}: shadows[{k}] has {len(profile)} tensors but params has "
                             f"{len(params)}")
        _validate.check_pairs(OP, f"shadows[{k}]", profile, "params", params)
        _validate.check_writable(OP, f"shadows[{k}]", profile)
    if not shadows:  # no pair checked the params' dtypes
        _validate.check_pairs(OP, "params", params, "params", params)
    return out


def check_no_overlap(shadows: list[list[torch.Tensor]], params: Tensors) -> None:
    """Refuse a shadow that shares memory with another shadow or with any param (params
    may share memory with each other: they are only read).  Intervals sorted once:
    O(m log m) for m tensors, and nothing per element for dense ones."""
    spans = []
    for i, p in enumerate(params):
        if p.numel():
            spans.append((p, None, i))
    for k, profile in enumerate(shadows):
        for i, s in enumerate(profile):
            if s.numel():
                spans.append((s, k, i))
    keyed = []
    for t, k, i in spans:
        lo, hi = _validate._span(t)
        keyed.append(((t.device.type, t.device.index or 0), lo, hi, k, i, t))
    keyed.sort(key=lambda s: (s[0], s[1]))
    open_: list = []
    for s in keyed:
        open_ = [o for o in open_ if o[0] == s[0] and o[2] > s[1]]
        for o in open_:
            if o[3] is None and s[3] is None:
                continue
            if not (_validate._dense(o[5]) and _validate._dense(s[5])) and \
                    not _validate._share_memory(o[5], s[5]):
                continue
            x, y = sorted((o, s), key=lambda z: (z[3] is None, z[3] or 0, z[4]))
            raise ValueError(
                f"{OP}: {_name(x)} and {_name(y)} overlap in memory, and "
                f"{'both are' if y[3] is not None else 'one is'} written; one pass updates "
                "every profile's shadows at once, so they would race (give every shadow "
                "memory of its own, apart from the params)")
        open_.append(s)


def _name(span) -> str:
    return f"params[{span[4]}]" if span[3] is None else f"shadows[{span[3]}][{span[4]}]"
