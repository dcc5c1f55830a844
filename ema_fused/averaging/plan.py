"""The checks ``average_checkpoints`` runs before anything is read: the weights, the
names, shapes and kinds of every source against the first, and ``like=`` against them.
Each raises one error that lists every problem it found."""
from __future__ import annotations

import math
import numbers
import warnings
from typing import Mapping, Optional, Sequence

import torch

from ..ema import checkpoint as _checkpoint
from .readers import Reader
from .sources import OP, Entry, listed


def normalised_weights(weights: Optional[Sequence[float]], k: int) -> list[float]:
    """``weights / sum(weights)`` (1/k each by default), as ``numpy.average`` does."""
    if weights is None:
        return [1.0 / k] * k
    if isinstance(weights, (str, bytes)) or not hasattr(weights, "__len__"):
        raise TypeError(f"{OP}: weights must be a sequence of numbers, one per source")
    if len(weights) != k:
        raise ValueError(f"{OP}: {len(weights)} weights for {k} sources")
    values = []
    for i, w in enumerate(weights):
        if isinstance(w, torch.Tensor) and w.numel() == 1:
            w = w.item()
        if isinstance(w, bool) or not isinstance(w, numbers.Real) or not math.isfinite(w):
            raise ValueError(f"{OP}: weights[{i}] must be a finite real number, got {w!r}")
        values.append(float(w))
    total = math.fsum(values)
    # zero, or zero up to the rounding of the sum: the quotients would be noise
    if abs(total) <= 4 * k * torch.finfo(torch.float64).eps * math.fsum(map(abs, values)):
        raise ValueError(f"{OP}: the weights {values} sum to zero; they cannot be normalised")
    return [w / total for w in values]


def check_plan(readers: Sequence[Reader], strict: bool) -> dict[str, Entry]:
    """Output name -> the first source's entry, after every cross-source check."""
    layouts = [r.layout for r in readers]
    first = layouts[0]
    if strict:
        problems = []
        for r, lay in zip(readers[1:], layouts[1:]):
            missing = [n for n in first if n not in lay]
            unexpected = [e.key for n, e in lay.items() if n not in first]
            if missing or unexpected:
                parts = ([f"missing {listed(missing)}"] if missing else []) + \
                    ([f"unexpected {listed(unexpected)}"] if unexpected else [])
                problems.append(f"  {r.where}: {'; '.join(parts)}")
        if problems:
            raise KeyError(f"{OP}: the sources do not hold the same tensors as "
                           f"{readers[0].where} (strict=True; names compared without "
                           "module./_orig_mod. prefixes):\n" + "\n".join(problems))
    names = [n for n in first if all(n in lay for lay in layouts)]
    kept = set(names)
    left_out = list(dict.fromkeys(n for lay in layouts for n in lay if n not in kept))
    if left_out:
        warnings.warn(f"{OP}: strict=False: {len(left_out)} tensors not in every source are "
                      f"left out: {listed(left_out, 20)}", stacklevel=4)
    problems = []
    for n in names:
        e0 = first[n]
        for r, lay in zip(readers[1:], layouts[1:]):
            e = lay[n]
            if e.shape != e0.shape:
                problems.append(f"  {n!r}: shape {e0.shape} in {readers[0].where} but "
                                f"{e.shape} in {r.where}")
            elif e.kind != e0.kind:
                problems.append(f"  {n!r}: {e0.dtype} in {readers[0].where} but {e.dtype} "
                                f"in {r.where} (floating point tensors are averaged, "
                                "integer ones are not)")
    if problems:
        raise ValueError(f"{OP}: tensors that do not match across sources:\n" +
                         "\n".join(problems))
    return {n: first[n] for n in names}


def check_like(like: Mapping[str, torch.Tensor], plan: Mapping[str, Entry]
               ) -> dict[str, torch.Tensor]:
    """``like`` keyed by the plan's names, after checking that it holds exactly those
    tensors with their global shapes (one error listing every difference)."""
    targets: dict[str, torch.Tensor] = {}
    for key, t in like.items():
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{OP}: like[{key!r}] is a {type(t).__name__}, not a tensor")
        targets[_checkpoint.plain_name(key)] = t
    missing = [n for n in plan if n not in targets]
    unexpected = [n for n in targets if n not in plan]
    shapes = [f"{n!r}: {tuple(t.shape)} in like, {plan[n].shape} in the sources"
              for n, t in targets.items() if n in plan and tuple(t.shape) != plan[n].shape]
    if missing or unexpected or shapes:
        raise ValueError(f"{OP}: like= does not hold the tensors the sources do: " + "; ".join(
            ([f"missing {listed(missing)}"] if missing else []) +
            ([f"unexpected {listed(unexpected)}"] if unexpected else []) +
            ([f"shapes differ: {', '.join(shapes)}"] if shapes else [])))
    return targets
