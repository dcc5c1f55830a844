"""Snapshots of sharded models (DTensor shadows: FSDP2, tensor parallel), with no gathering.

Each rank copies its own shards of every profile (``snapshot_dtype``, on the CPU) and
keeps them as DTensors laid out like the shadows.  In memory (no ``snapshot_dir``) they
form the payload :mod:`.snapshots` describes.  On disk a snapshot is one DCP checkpoint
directory, ``phema-<step>/``: every rank writes its shards (``profiles.<k>.<name>``,
``copied.<name>``) with ``torch.distributed.checkpoint.save``, and rank 0 adds
``phema.json`` (step, profile time, gammas, aliases, names: the rest of a snapshot).

Atomic: every rank writes into ``.phema-<step>.tmp/``; DCP's save returns on every rank
only once its ``.metadata`` (written last) is on disk; rank 0 then writes the JSON,
syncs it and renames the folder to ``phema-<step>``; a barrier follows, so that every
rank sees it.  A snapshot cut off mid-write keeps its temporary name (or lacks a file)
and :func:`scan` skips it with a warning naming it.  DCP reshards on load, so the
snapshots of N ranks are read by any number of processes.
"""
from __future__ import annotations

import json
import os
import re
import shutil
import warnings
from pathlib import Path
from typing import Optional, Sequence

import torch

from .. import distributed as _distributed
from ..averaging import calling_dcp, is_dcp_dir

FORMAT = "ema_fused.PostHocEMA.snapshot.dcp"
VERSION = 1
META = "phema.json"
_DIR = re.compile(r"^phema-(\d+)$")
_TMP = re.compile(r"^\.phema-(\d+)\.tmp$")


def dir_name(step: int) -> str:
    """The folder name of the sharded snapshot of ``step`` (zero-padded: sorts by step)."""
    return f"phema-{step:010d}"


def is_sharded(profiles: Sequence) -> bool:
    """Whether the tracked model's shadows include DTensors."""
    return any(_distributed.is_dtensor(s) for s in profiles[0]._shadows)


def targets(profiles: Sequence) -> Optional[dict[str, torch.Tensor]]:
    """Name -> profile 0's shadow (the layout a sharded synthesis is made in), or None
    for an unsharded model."""
    if not is_sharded(profiles):
        return None
    return {e.name: s for e, s in zip(profiles[0]._tracked.entries, profiles[0]._shadows)}


def copy_into(name: str, target: torch.Tensor, value: torch.Tensor) -> None:
    """``target.copy_(value)``; a DTensor takes the local shard of a DTensor laid out
    the same (no communication), and refuses any other (naming the tensor)."""
    if _distributed.is_dtensor(target) or _distributed.is_dtensor(value):
        if not _distributed.same_layout(target, value):
            raise ValueError(f"PostHocEMA.synthesize_to: tensor {name!r} of the model is "
                             f"{_distributed.describe(target)} but the synthesized one is "
                             f"{_distributed.describe(value)}")
        target, value = target._local_tensor, value._local_tensor
    target.copy_(value)


def _dist():
    dist = torch.distributed
    return dist if dist.is_available() and dist.is_initialized() else None


def local_copies(profiles: Sequence, dtype: torch.dtype) -> tuple[list[dict], dict]:
    """Every profile's averaged shadows (CPU copies of the local shards in ``dtype``, as
    DTensors laid out like the shadows) and the copied tensors, once.  Raises on every
    rank, before anything is kept, if a finite shard overflows ``dtype`` on any rank
    (one all-reduce of a flag, so that the ranks agree)."""
    entries = profiles[0]._tracked.entries
    out, bad = [], None
    for k, ema in enumerate(profiles):
        shadows = {}
        for e, s in zip(entries, ema._shadows):
            if not e.averaged:
                continue
            loc = _distributed.local(s).detach()
            c = loc.to("cpu", dtype, copy=True)
            finite = bool(torch.isfinite(c).all())
            if bad is None and not finite and bool(torch.isfinite(loc).all()):
                bad = f"profile {k}'s shadow {e.name!r} overflows {dtype} (largest magnitude " \
                      f"{loc.abs().max().item():.4g})"
            shadows[e.name] = _distributed.wrap_like(s, c)
        out.append(shadows)
    _agree(bad, dtype, profiles[0]._shadows)
    copied = {e.name: _distributed.wrap_like(s, _distributed.local(s).detach().to("cpu", copy=True))
              for e, s in zip(entries, profiles[0]._shadows) if not e.averaged}
    return out, copied


def _agree(bad: Optional[str], dtype: torch.dtype, shadows: Sequence[torch.Tensor]) -> None:
    flag = torch.tensor([0 if bad is None else 1])
    dist = _dist()
    if dist is not None:
        mesh = next(s.device_mesh for s in shadows if _distributed.is_dtensor(s))
        flag = flag.to(mesh.device_type)
        dist.all_reduce(flag, op=dist.ReduceOp.MAX)
    if int(flag.item()):
        what = bad or "a shadow's shard on another rank overflows " + str(dtype)
        raise ValueError(f"PostHocEMA.snapshot: {what}; use a wider snapshot_dtype, e.g. "
                         "torch.bfloat16 or torch.float32")


def write(averaged: list[dict], copied: dict, meta: dict, folder: Path) -> Path:
    """Save one snapshot's shards (every rank calls this) as ``folder/phema-<step>/``,
    atomically; returns that folder.  A snapshot of the same step is replaced."""
    import torch.distributed.checkpoint as dcp
    step = meta["step"]
    final, tmp = folder / dir_name(step), folder / f".{dir_name(step)}.tmp"
    state = {f"profiles.{k}.{n}": t for k, shadows in enumerate(averaged)
             for n, t in shadows.items()}
    state.update({f"copied.{n}": t for n, t in copied.items()})
    dist = _dist()
    with calling_dcp():
        dcp.save(state, checkpoint_id=str(tmp), no_dist=dist is None)
    if dist is None or dist.get_rank() == 0:
        record = {"format": FORMAT, "version": VERSION, **meta,
                  "averaged": list(averaged[0]), "copied": list(copied)}
        with open(tmp / META, "w") as f:
            json.dump(record, f)
            f.flush()
            os.fsync(f.fileno())
        if final.exists():  # a snapshot of this step again: the new one replaces it
            old = folder / f".{dir_name(step)}.old-{os.getpid()}"
            os.replace(final, old)
            os.replace(tmp, final)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, final)
    if dist is not None:
        dist.barrier()
    return final


def read_record(path: Path) -> object:
    """A sharded snapshot folder's record (``phema.json``, with ``"path"`` added);
    :func:`.snapshots.load` checks its format and version."""
    try:
        with open(Path(path) / META) as f:
            record = json.load(f)
    except (OSError, ValueError) as err:
        raise ValueError(f"PostHocEMA: cannot read snapshot {str(path)!r}: {err}") from err
    if isinstance(record, dict):
        record["path"] = Path(path)
    return record


def is_complete(path: Path) -> bool:
    """Whether a snapshot folder holds its DCP metadata and its record."""
    return is_dcp_dir(path) and (Path(path) / META).is_file()


def scan(folder: Path) -> list[tuple[int, Path]]:
    """(step, folder) of every complete sharded snapshot in ``folder``; each one that was
    cut off while being written is skipped with a warning naming it."""
    found = []
    for name in sorted(os.listdir(folder)):
        path = folder / name
        done, cut = _DIR.match(name), _TMP.match(name)
        if not path.is_dir() or not (done or cut):
            continue
        if done and is_complete(path):
            found.append((int(done.group(1)), path))
            continue
        step = int((done or cut).group(1))
        warnings.warn(f"PostHocEMA: snapshot {str(path)!r} (step {step}) was cut off while "
                      "being written (it lacks its metadata or was never renamed); it is "
                      "skipped", stacklevel=3)
    return found
