"""The fast host path of ``EMA.update``: one C++ call decides whether the cached plan
still fits the model, instead of reading and fingerprinting every tensor in Python.

With the C++ extension loaded (``_extension``; an AOT build, or a JIT build already
made: nothing is compiled here), :func:`snapshot` records where every tensor of a plan
was read, the module tree, and each tensor's identity and layout
(``csrc/host_path.cpp``).  ``still_valid()`` is true only if a fresh read would give the
very same tensors (same objects, same TensorImpl, same address, dtype, device, sizes
and strides) from an unchanged tree.  Without the extension, ``EMA`` re-reads the model
and compares a Python key at every update (the same guarantees, slower).
"""
from __future__ import annotations

import operator
from typing import Optional, Sequence

import torch

from ..backends import extension as _extension
from ..distributed import locals_of
from .tracking import Tracked

_LOCAL = operator.attrgetter("_local_tensor")


class _ShardedSnapshot:
    """A ``Snapshot`` of the local tensors, plus what C++ cannot see: that every
    DTensor still wraps the local tensor the plan holds.  FSDP2 gives a sharded
    parameter a new ``_local_tensor`` (after ``model.to(...)``,
    ``load_state_dict(assign=True)``, at its lazy init) while the DTensor object, and
    the module's slot holding it, stay the same; a slot attribute is not a dict entry,
    so this check runs in Python: one identity test per DTensor."""

    __slots__ = ("_snap", "_dtensors", "_locals")

    def __init__(self, snap: object, dtensors: list, local: list) -> None:
        self._snap, self._dtensors, self._locals = snap, dtensors, local

    def still_valid(self) -> bool:
        return self._snap.still_valid() and all(
            map(operator.is_, map(_LOCAL, self._dtensors), self._locals))


def snapshot(tracked: Tracked, live: Sequence[torch.Tensor],
             shadows: Sequence[torch.Tensor]) -> Optional[object]:
    """A C++ ``Snapshot`` of ``live`` (as read from ``tracked``) and ``shadows``, or None
    where the extension is not loaded or a tensor cannot be watched (no storage).

    DTensors are watched through their local tensors (a DTensor has no storage): the
    module's slot must still hold the very DTensor (a tree link: identity only), its
    local tensor keeps the layout checks, and :class:`_ShardedSnapshot` checks that
    the DTensor still wraps that local tensor."""
    if not _extension.load(build=False):
        return None
    lists = tracked.watch_lists()
    if lists is None:
        return None
    link_dicts, link_keys, link_children, sized, slot_dicts, slot_keys = lists
    local = locals_of(live)
    sharded = [i for i, (t, t_local) in enumerate(zip(live, local)) if t is not t_local]
    for i in sharded if slot_dicts else ():
        link_dicts.append(slot_dicts[i])
        link_keys.append(slot_keys[i])
        link_children.append(live[i])
        slot_dicts[i], slot_keys[i] = {0: local[i]}, 0  # always holds it: layout checks only
    try:
        snap = _extension.module().Snapshot(link_dicts, link_keys, link_children, sized,
                                            slot_dicts, slot_keys, local,
                                            locals_of(list(shadows) + tracked.frozen_tensors()))
    except (RuntimeError, TypeError):  # e.g. a tensor without storage: use the Python path
        return None
    if not sharded:
        return snap
    return _ShardedSnapshot(snap, [live[i] for i in sharded], [local[i] for i in sharded])
