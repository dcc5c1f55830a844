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

from typing import Optional, Sequence

import torch

from .backends import extension as _extension
from ._tracking import Tracked


def snapshot(tracked: Tracked, live: Sequence[torch.Tensor],
             shadows: Sequence[torch.Tensor]) -> Optional[object]:
    """A C++ ``Snapshot`` of ``live`` (as read from ``tracked``) and ``shadows``, or None
    where the extension is not loaded or a tensor cannot be watched (no storage)."""
    if not _extension.load(build=False):
        return None
    lists = tracked.watch_lists()
    if lists is None:
        return None
    try:
        return _extension.module().Snapshot(*lists, list(live), list(shadows))
    except (RuntimeError, TypeError):  # e.g. a tensor without storage: use the Python path
        return None
