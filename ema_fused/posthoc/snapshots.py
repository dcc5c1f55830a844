"""``PostHocEMA`` snapshots: what one holds, writing it atomically, finding and reading them.

A snapshot is a plain dict (``torch.load(weights_only=True)`` reads it)::

    {"format": FORMAT, "version": 1, "step": s, "t": j,      # j: averages by step s
     "sigma_rels": [...], "gammas": [...],                    # one per profile
     "update_every": k, "update_after_step": u,
     "profiles": [{name: shadow in snapshot_dtype}, ...],     # averaged tensors, per profile
     "copied": {name: tensor},                                # copied tensors (ints...), once
     "aliases": {tied name: name}}

On disk it is one file per snapshot, ``phema-<step>.pt``, written to a temporary file
in the same folder and renamed over the final name, so that a crash never leaves a
half-written snapshot under a name :func:`list_dir` would read.  Sharded models'
snapshots (:mod:`.sharded_snapshots`) hold DTensors in memory, and on disk are DCP
folders ``phema-<step>/``, whose record (:func:`load`) has every field above but the
tensors.
"""
from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Optional, Sequence, Union

import torch

from .. import distributed as _distributed
from . import sharded_snapshots as _sharded

FORMAT = "ema_fused.PostHocEMA.snapshot"
VERSION = 1
_NAME = re.compile(r"^phema-(\d+)\.pt$")
Snapshot = dict
Source = Union[Snapshot, Path]  # in memory, or a file or a DCP folder


def file_name(step: int) -> str:
    """The file name of the snapshot of ``step`` (zero-padded: names sort by step)."""
    return f"phema-{step:010d}.pt"


def _aliases(tracked) -> dict[str, str]:
    return {name: tracked.entries[i].name for name, i in tracked.aliases.items()
            if name != tracked.entries[i].name}


def take(profiles: Sequence, step: int, t: int, dtype: torch.dtype, meta: dict,
         folder: Optional[Path]) -> Union[Snapshot, Path]:
    """The snapshot of ``profiles`` at ``step``: written into ``folder`` (returns where)
    or, without one, the payload kept in memory."""
    if not _sharded.is_sharded(profiles):
        payload = build(profiles, step, t, dtype, meta)
        return payload if folder is None else write(payload, folder)
    averaged, copied = _sharded.local_copies(profiles, dtype)
    record = {"step": step, "t": t, **meta, "aliases": _aliases(profiles[0]._tracked)}
    if folder is not None:
        return _sharded.write(averaged, copied, {**record, "snapshot_dtype": str(dtype)},
                              folder)
    return {"format": FORMAT, "version": VERSION, **record, "profiles": averaged,
            "copied": copied}


def build(profiles: Sequence, step: int, t: int, dtype: torch.dtype, meta: dict) -> Snapshot:
    """The snapshot of ``profiles`` (EMA objects of one tracked, unsharded model) at
    ``step``: CPU copies, averaged tensors in ``dtype``.  Raises naming the tensor,
    before anything is written, if a shadow is finite but out of ``dtype``'s range
    (float16 overflows past 65504)."""
    tracked = profiles[0]._tracked
    entries = tracked.entries
    out: list[dict] = []
    for k, ema in enumerate(profiles):
        shadows = {}
        for e, s in zip(entries, ema._shadows):
            if not e.averaged:
                continue
            c = s.detach().to("cpu", dtype, copy=True)
            if not bool(torch.isfinite(c).all()) and bool(torch.isfinite(s).all()):
                raise ValueError(f"PostHocEMA.snapshot: profile {k}'s shadow {e.name!r} "
                                 f"overflows {dtype} (largest magnitude "
                                 f"{s.abs().max().item():.4g}); use a wider snapshot_dtype, "
                                 "e.g. torch.bfloat16 or torch.float32")
            shadows[e.name] = c
        out.append(shadows)
    copied = {e.name: s.detach().to("cpu", copy=True)
              for e, s in zip(entries, profiles[0]._shadows) if not e.averaged}
    return {"format": FORMAT, "version": VERSION, "step": step, "t": t, **meta,
            "profiles": out, "copied": copied, "aliases": _aliases(tracked)}


def write(snapshot: Snapshot, folder: Path) -> Path:
    """Save ``snapshot`` as ``folder/phema-<step>.pt`` atomically (temporary file,
    fsync, rename); an existing snapshot of the same step is replaced."""
    path = folder / file_name(snapshot["step"])
    tmp = folder / f".{path.name}.tmp-{os.getpid()}"
    try:
        with open(tmp, "wb") as f:
            torch.save(snapshot, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return path


def load(source: Source) -> Snapshot:
    """A snapshot from memory, from its file (memory-mapped: tensors are read when
    used), or a sharded snapshot folder's record (no tensors), checked to be one."""
    if isinstance(source, dict):
        return source
    if Path(source).is_dir():
        snap, form, version = _sharded.read_record(source), _sharded.FORMAT, _sharded.VERSION
    else:
        try:
            snap = torch.load(source, map_location="cpu", mmap=True, weights_only=True)
        except Exception as err:
            raise ValueError(f"PostHocEMA: cannot read snapshot {str(source)!r}: {err}") from err
        form, version = FORMAT, VERSION
    if not isinstance(snap, dict) or snap.get("format") != form:
        raise ValueError(f"PostHocEMA: {str(source)!r} is not a PostHocEMA snapshot")
    if snap.get("version") != version:
        raise ValueError(f"PostHocEMA: snapshot {str(source)!r} has version "
                         f"{snap.get('version')}; this ema_fused reads {version}")
    return snap


def list_dir(folder: Union[str, os.PathLike]) -> list[Path]:
    """The snapshot files and complete sharded snapshot folders in ``folder``, by step
    (a folder cut off while being written is skipped with a warning)."""
    folder = Path(folder)
    if not folder.is_dir():
        raise FileNotFoundError(f"PostHocEMA: snapshot_dir {str(folder)!r} is not a folder")
    found = [(int(m.group(1)), folder / n) for n in os.listdir(folder)
             if (m := _NAME.match(n)) is not None]
    return [p for _, p in sorted(found + _sharded.scan(folder))]


def holds_tensors(snap: Snapshot) -> bool:
    """Whether ``snap`` holds its tensors (not a sharded folder's record), all plain."""
    return "profiles" in snap and not any(
        _distributed.is_dtensor(t) for shadows in snap["profiles"] for t in shadows.values())


def where(source: Source) -> str:
    """How a message names a snapshot."""
    return f"{str(source)!r}" if isinstance(source, Path) else f"step {source['step']}"


def check_like(first: Snapshot, snap: Snapshot, label: str) -> None:
    """Raise unless ``snap`` holds the tensors ``first`` does (names, shapes, profiles)."""
    if "profiles" in snap and len(snap["profiles"]) != len(snap["gammas"]):
        raise ValueError(f"PostHocEMA: snapshot {label} has {len(snap['profiles'])} profiles "
                         f"but {len(snap['gammas'])} gammas")
    for key in ("update_every", "update_after_step"):
        if snap[key] != first[key]:
            raise ValueError(f"PostHocEMA: snapshot {label} was taken with {key}="
                             f"{snap[key]}, the others with {first[key]}")
    if "profiles" not in first or "profiles" not in snap:
        return  # a sharded folder: its tensors are checked as they are opened
    ref = first["profiles"][0]
    for k, shadows in enumerate(snap["profiles"]):
        if shadows.keys() != ref.keys():
            diff = sorted(shadows.keys() ^ ref.keys())
            raise ValueError(f"PostHocEMA: snapshot {label}, profile {k}, does not hold the "
                             f"tensors the others do: {diff}")
        for name, x in shadows.items():
            if x.shape != ref[name].shape:
                raise ValueError(f"PostHocEMA: snapshot {label}, profile {k}: tensor {name!r} "
                                 f"has shape {tuple(x.shape)}, {tuple(ref[name].shape)} "
                                 "elsewhere")


def averages_at(step: int, update_every: int, update_after_step: int) -> int:
    """The profile time of ``step``: how many averaging updates have run by then."""
    return max(0, step // update_every - update_after_step // update_every)


def pick(sources: Sequence[Source], step: Optional[int]
         ) -> tuple[list[Source], list[Snapshot], int]:
    """The sources whose step is ``<= step`` (all for None), their (lazy) contents, and
    the target's profile time.  The target must be the time of one of them: after the
    last one chosen, no snapshot holds the updates in between."""
    snaps = [load(s) for s in sources]
    if not snaps:
        raise ValueError("PostHocEMA: no snapshots to synthesize from; call snapshot() or "
                         "set snapshot_every")
    order = sorted(range(len(snaps)), key=lambda i: snaps[i]["step"])
    steps = [snaps[i]["step"] for i in order]
    if step is not None and step < steps[0]:
        raise ValueError(f"PostHocEMA.synthesize: step {step} comes before the first "
                         f"snapshot (step {steps[0]})")
    keep = [i for i in order if step is None or snaps[i]["step"] <= step]
    last = snaps[keep[-1]]
    target = last["t"] if step is None else averages_at(step, last["update_every"],
                                                         last["update_after_step"])
    if target != last["t"] and len(keep) == len(steps):
        raise ValueError(f"PostHocEMA.synthesize: step {step} comes after the last snapshot "
                         f"(step {steps[-1]}); no snapshot holds the updates since")
    if target != last["t"]:
        after = steps[len(keep)]
        raise ValueError(f"PostHocEMA.synthesize: step {step} falls between the snapshots of "
                         f"steps {last['step']} and {after}; no snapshot holds the updates "
                         "after the first, so pick a snapshot's step")
    return [sources[i] for i in keep], [snaps[i] for i in keep], target
