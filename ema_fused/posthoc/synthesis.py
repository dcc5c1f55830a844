"""Post-hoc synthesis: the EMA of another width as a weighted sum of snapshots (EDM2 Sec. 3.2).

The coefficients come from :func:`ema_fused.posthoc.solve.solve_coefficients` (Algorithm 3,
normalised to sum 1) over every (snapshot, profile) pair up to the target step; the sum
is streamed, one snapshot in memory at a time (files are memory-mapped), into fp32
accumulators, so peak memory is the output plus one snapshot.  Sharded snapshots,
shard-local results (``targets``) and ``out=`` go through :mod:`.streamed_synthesis`.
"""
from __future__ import annotations

from typing import Mapping, Optional, Sequence

import torch

from ..ops import ema_weighted_sum_
from ..schedules import sigma_rel_to_gamma
from . import snapshots as snaps
from . import streamed_synthesis as _streamed
from .solve import solve_coefficients


def coefficients(chosen: Sequence[dict], gamma: float, target: int) -> torch.Tensor:
    """One float64 coefficient per (snapshot, profile), snapshot-major, for the profile
    ``gamma`` at time ``target`` (EDM2 Algorithm 3, normalised to sum 1)."""
    times = [float(s["t"]) for s in chosen for _ in s["gammas"]]
    gammas = [float(g) for s in chosen for g in s["gammas"]]
    return solve_coefficients(times, gammas, float(target), gamma)


def synthesize(sources: Sequence[snaps.Source], sigma_rel: float, step: Optional[int],
               backend: str = "auto", *, targets: Optional[Mapping[str, torch.Tensor]] = None,
               out=None) -> Optional[dict[str, torch.Tensor]]:
    """The synthesized weights (name -> CPU tensor) for profile ``sigma_rel`` at ``step``
    (default: the last snapshot's), from the snapshots ``sources`` with a step ``<=``
    ``step``.  Averaged tensors are fp32; copied ones (integers, ``buffers="copy"``) are
    the latest chosen snapshot's; tied names are included.  ``targets``: each rank's
    shards only, as DTensors laid out like them; ``out``: written there (returns None)."""
    gamma = sigma_rel_to_gamma(sigma_rel)
    picked, chosen, target = snaps.pick(sources, step)
    for src, snap in zip(picked, chosen):
        snaps.check_like(chosen[0], snap, snaps.where(src))
    coeffs = coefficients(chosen, gamma, target).tolist()
    if targets is not None or out is not None or not all(map(snaps.holds_tensors, chosen)):
        return _streamed.synthesize(picked, chosen, coeffs, targets=targets, out=out)
    names = list(chosen[0]["profiles"][0])
    out = [torch.zeros(chosen[0]["profiles"][0][n].shape, dtype=torch.float32) for n in names]
    del chosen  # drop the mappings: one snapshot at a time below
    i = 0
    for src in picked:
        snap = snaps.load(src)
        for shadows in snap["profiles"]:
            ema_weighted_sum_(out, [shadows[n] for n in names], coeffs[i], backend=backend)
            i += 1
        del snap, shadows
    result = dict(zip(names, out))
    last = snaps.load(picked[-1])
    result.update({n: t.clone() for n, t in last["copied"].items()})
    for alias, name in last["aliases"].items():
        result[alias] = result[name]
    return result
