"""How a kernel backend splits a multi-shadow update so that every shadow gets exactly
what the backend's single update would give it.

A single update sends each pair the kernels take (``supported(shadow, param)``) to
them and the rest to the ``foreach`` code, which rounds differently.  So a param goes
to the multi-shadow kernel only when the kernels take its pair in *every* profile; the
pairs of the other params go, profile by profile, where the single update would send
them: to the backend's single-update kernel or to ``foreach``.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Sequence

import torch

from ..checks import multi

Profiles = Sequence[Sequence[torch.Tensor]]


@dataclass
class Split:
    """``columns``: params the multi-shadow kernel takes in every profile; ``single[k]`` /
    ``rest[k]``: indices of profile k's other pairs for its single kernel / for foreach."""

    columns: list[int] = field(default_factory=list)
    single: list[list[int]] = field(default_factory=list)
    rest: list[list[int]] = field(default_factory=list)

    def pick(self, tensors: Sequence[torch.Tensor], which: list[int]) -> list[torch.Tensor]:
        return [tensors[i] for i in which]


def split(shadows: Profiles, params: Sequence[torch.Tensor],
          supported: Callable[[torch.Tensor, torch.Tensor], bool]) -> Split:
    """Route every (profile, param) pair; when any pair leaves the multi-shadow kernel,
    every tensor is checked for overlaps here first (the kernel checks only its own), so
    nothing is written before a refusal."""
    out = Split(single=[[] for _ in shadows], rest=[[] for _ in shadows])
    for i, p in enumerate(params):
        ok = [supported(profile[i], p) for profile in shadows]
        if all(ok):
            out.columns.append(i)
            continue
        for k, taken in enumerate(ok):
            (out.single if taken else out.rest)[k].append(i)
    if any(out.single) or any(out.rest):
        multi.check_no_overlap([list(p) for p in shadows], params)
    return out


def flat_columns(shadows: Profiles, params: Sequence[torch.Tensor], columns: list[int]):
    """(flat profile-major shadows, params) of ``columns``: the kernel op's arguments."""
    return ([profile[i] for profile in shadows for i in columns], [params[i] for i in columns])
