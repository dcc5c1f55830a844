"""Synthesis streamed tensor by tensor through ``ema_fused.averaging``'s weighted sum.

EDM2's synthesized profile is a weighted sum of (snapshot, profile) pairs, which is what
``average_checkpoints`` computes, so each pair is opened as a source of that engine: a
sharded snapshot's DCP folder (under ``profiles.<k>``), a snapshot file (memory-mapped),
or an in-memory payload.  That gives, with no code of its own for each case:

* ``targets`` (name -> the model's DTensor shadow): on the ranks that trained, each rank
  reads only its shards of every snapshot and gets DTensors laid out like the model's;
* no ``targets``: full tensors, in one process or any number (DCP reshards what N ranks
  wrote);
* ``out=``: a safetensors file (or a DCP folder), written a tensor at a time.

Peak memory: about one output tensor plus one snapshot tensor, then the output.
"""
from __future__ import annotations

from pathlib import Path
from typing import Mapping, Optional, Sequence

import torch

from ..averaging import check_out, open_source, weighted_sum


def _opened(i: int, source, snap: dict, part: str, k: Optional[int]):
    """Profile ``k``'s tensors (``part="profiles"``) or the copied ones of a snapshot."""
    if "profiles" in snap and isinstance(source, dict):  # in memory: DTensors or tensors
        return open_source(i, snap[part][k] if k is not None else snap[part], None)
    if "profiles" in snap:  # a snapshot file: mapped once more, its pages handed back
        return open_source(i, Path(source), lambda s: s[part][k] if k is not None else s[part])
    return open_source(i, snap["path"], part if k is None else f"{part}.{k}")


def _where(source, snap: dict) -> str:
    return f"{str(source)!r}" if isinstance(source, Path) else f"step {snap['step']}"


def synthesize(picked: Sequence, chosen: Sequence[dict], coeffs: Sequence[float], *,
               targets: Optional[Mapping[str, torch.Tensor]] = None,
               out=None) -> Optional[dict[str, torch.Tensor]]:
    """``sum coeffs[i] * pair_i`` over every (snapshot, profile) pair of the snapshots
    ``picked`` (their records ``chosen``), snapshot-major; copied tensors and aliases
    from the last snapshot.  Returns the dict (DTensors with ``targets``), or writes
    ``out`` and returns None."""
    writer = check_out(out, targets)
    readers, copied = [], None
    try:
        for src, snap in zip(picked, chosen):
            for k in range(len(snap["gammas"])):
                readers.append(_opened(len(readers), src, snap, "profiles", k))
                ref, lay = readers[0].layout, readers[-1].layout
                if {n: e.shape for n, e in lay.items()} != {n: e.shape for n, e in ref.items()}:
                    diff = sorted(lay.keys() ^ ref.keys()) or sorted(
                        n for n in ref if ref[n].shape != lay[n].shape)
                    raise ValueError(f"PostHocEMA: snapshot {_where(src, snap)}, profile {k}, "
                                     f"does not hold the tensors the others do: {diff}")
        if chosen[-1]["copied"]:
            copied = _opened(len(readers), picked[-1], chosen[-1], "copied", None)
    except BaseException:
        for r in readers:
            r.close()
        raise
    return weighted_sum(readers, coeffs, readers[0].layout, writer, targets=targets,
                        copied=copied, aliases=chosen[-1]["aliases"])
