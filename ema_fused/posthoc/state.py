"""``PostHocEMA.state_dict`` / ``load_state_dict``: the format and the checks that run
before anything is loaded (every profile, every snapshot), so that a refused checkpoint
leaves all K profiles as they were."""
from __future__ import annotations

from pathlib import Path
from typing import Mapping

from ..checks import as_int
from ..ema import checkpoint as _checkpoint
from . import sharded_snapshots as _sharded
from . import snapshots as _snaps

FORMAT = "ema_fused.PostHocEMA"
VERSION = 1


def state_of(phema) -> dict:
    """The checkpoint of ``phema``: settings, profile states, snapshot bookkeeping."""
    snapshots = []
    for step, where in phema._snapshots:
        if isinstance(where, Path):
            snapshots.append({"step": step, "file": where.name})
        else:
            snapshots.append({"step": step, "snapshot": where})
    return {"format": FORMAT, "version": VERSION, **phema._meta(),
            "snapshot_every": phema.snapshot_every,
            "profiles": [ema.state_dict() for ema in phema._emas],
            "snapshots": snapshots}


def _check_profile(ema, state: object, strict: bool) -> None:
    """The checks ``EMA.load_state_dict`` runs before it writes, writing nothing."""
    _checkpoint.checked(ema, state, strict)


def _snapshot_list(phema, entries: object) -> list:
    """The snapshot bookkeeping of a checkpoint, each file found in ``snapshot_dir``."""
    if not isinstance(entries, list):
        raise TypeError("PostHocEMA.load_state_dict: 'snapshots' must be a list")
    out = []
    for i, entry in enumerate(entries):
        if not isinstance(entry, Mapping) or ("file" in entry) == ("snapshot" in entry):
            raise ValueError(f"PostHocEMA.load_state_dict: snapshots[{i}] is malformed")
        step = as_int(f"PostHocEMA.load_state_dict: snapshots[{i}] step", entry.get("step"), 1)
        if "snapshot" in entry:
            snap = entry["snapshot"]
            if not isinstance(snap, Mapping) or snap.get("format") != _snaps.FORMAT:
                raise ValueError(f"PostHocEMA.load_state_dict: snapshots[{i}] (step {step}) "
                                 "is not a PostHocEMA snapshot")
            out.append((step, dict(snap)))
            continue
        if phema.snapshot_dir is None:
            raise ValueError(f"PostHocEMA.load_state_dict: the checkpoint's snapshots are "
                             f"files (the first: {entry['file']!r}) but this PostHocEMA has "
                             "no snapshot_dir; pass the folder that holds them")
        path = phema.snapshot_dir / Path(str(entry["file"])).name
        if not (path.is_file() or _sharded.is_complete(path)):
            raise FileNotFoundError(f"PostHocEMA.load_state_dict: snapshot file {str(path)!r} "
                                    f"(step {step}) is missing")
        out.append((step, path))
    return out


def load_into(phema, state: dict, strict: bool) -> None:
    """``PostHocEMA.load_state_dict``: all checks, then every profile, then the bookkeeping."""
    if not isinstance(state, Mapping) or state.get("format") != FORMAT:
        raise ValueError("PostHocEMA.load_state_dict: not an ema_fused PostHocEMA state_dict")
    if state.get("version") != VERSION:
        raise ValueError(f"PostHocEMA.load_state_dict: version {state.get('version')} is not "
                         f"supported (this ema_fused writes {VERSION})")
    ours = phema._meta()
    for key in ("gammas", "update_every", "update_after_step"):
        if state.get(key) != ours[key]:
            shown = "sigma_rels" if key == "gammas" else key
            raise ValueError(f"PostHocEMA.load_state_dict: the checkpoint has {shown}="
                             f"{state.get(shown)}, this PostHocEMA {ours[shown]}")
    profiles = state.get("profiles")
    if not isinstance(profiles, list) or len(profiles) != len(phema._emas):
        raise ValueError(f"PostHocEMA.load_state_dict: expected {len(phema._emas)} profile "
                         "states under 'profiles'")
    for k, (ema, sd) in enumerate(zip(phema._emas, profiles)):
        try:
            _check_profile(ema, sd, strict)
        except (KeyError, TypeError, ValueError) as err:
            msg = str(err.args[0]) if err.args else str(err)
            msg = msg.removeprefix("EMA.load_state_dict: ")
            raise type(err)(f"PostHocEMA.load_state_dict: profile {k}: {msg}") from None
    snapshots = _snapshot_list(phema, state.get("snapshots"))
    for ema, sd in zip(phema._emas, profiles):
        ema.load_state_dict(sd, strict)
    phema._snapshots = snapshots
