"""The streamed weighted sum behind ``average_checkpoints`` and PostHocEMA's synthesis from
DCP snapshots: ``out[name] = sum_j coeffs[j] * source_j[name]``, a few tensors at a time.

Tensor by tensor (in groups of consecutive names up to the largest tensor's bytes, so
that small tensors share a DCP call), every source adds its piece of the group into
``dtype`` accumulators through :func:`ema_fused.ema_weighted_sum_`; each piece is dropped
as soon as it was added, and the group goes to the writer (:mod:`.writers`) before the
next is made.  Peak memory: one group of accumulators (about the largest output tensor)
plus one piece of one source, whatever the model's size and the number of sources.

With ``targets`` (name -> DTensor), every tensor is made as that DTensor's local shard on
this rank, from only that shard of each source, with no communication, and handed on
laid out like it, on its local tensor's device.
"""
from __future__ import annotations

import os
from typing import Callable, Mapping, Optional, Sequence

import torch

from .. import distributed as _distributed
from ..checks import FLOAT_DTYPES
from ..ops import ema_weighted_sum_
from .dcp_sources import DcpReader, is_dcp_dir
from .readers import Box, MappingReader, Reader, TorchFileReader
from .safetensors_files import SafetensorsReader, is_safetensors_file
from .sources import OP, Entry, Key, Source, describe

#: on_tensor(tensors done, tensors in all, bytes read, bytes to read), after each group
Progress = Callable[[int, int, int, int], None]
MIN_GROUP_BYTES = 16 << 20


def open_source(index: int, source: Source, key: Key, map_location="cpu") -> Reader:
    """A reader for a state dict, a DCP checkpoint directory, a safetensors file or a
    ``torch.save`` file (told apart by what they hold, not by their names)."""
    if isinstance(source, Mapping):
        return MappingReader(index, source, key)
    path = os.fspath(source)
    if os.path.isdir(path):
        if is_dcp_dir(path):
            return DcpReader(index, path, key)
        raise FileNotFoundError(f"{OP}: {describe(index, source)} is a directory without a "
                                "DCP checkpoint's .metadata (not a DCP checkpoint, or one "
                                "whose save was cut off)")
    if is_safetensors_file(path):
        return SafetensorsReader(index, path, key)
    return TorchFileReader(index, path, key, map_location)


def _local_shape(name: str, entry: Entry, targets: Mapping[str, torch.Tensor]) -> tuple:
    like = targets.get(name)
    if like is not None and _distributed.is_dtensor(like):
        return tuple(like._local_tensor.shape)
    return entry.shape


def _like(like: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """``t`` (a local result) on the device of ``like``'s local tensor, laid out like it
    (a DTensor where ``like`` is one): a CUDA mesh's collectives need CUDA shards."""
    return _distributed.wrap_like(like, t.to(_distributed.local(like).device))


def _narrow(t: torch.Tensor, box: Box) -> torch.Tensor:
    if box is None:
        return t
    for dim, (start, length) in enumerate(zip(*box)):
        t = t.narrow(dim, start, length)
    return t


def weighted_sum(readers: Sequence[Reader], coeffs: Sequence[float],
                 plan: Mapping[str, Entry], writer, *, dtype: torch.dtype = torch.float32,
                 targets: Optional[Mapping[str, torch.Tensor]] = None,
                 copied: Optional[Reader] = None, aliases: Optional[Mapping[str, str]] = None,
                 on_tensor: Optional[Progress] = None):
    """``sum_j coeffs[j] * readers[j]`` for every floating tensor of ``plan`` (names
    checked across the readers by the caller), summed and written in ``dtype``;
    integer ones from the last reader; every tensor of ``copied`` as it is; ``aliases``
    (tied name -> name) repeat a tensor.  Returns what ``writer.run`` returns."""
    targets = dict(targets or {})
    entries = dict(plan)
    owner = {name: readers[-1] for name in plan}
    if copied is not None:
        entries.update(copied.layout)
        owner.update({name: copied for name in copied.layout})
    shapes = {n: _local_shape(n, e, targets) for n, e in entries.items()}
    specs = {n: (e.shape, dtype if n in plan and e.kind == "float" else owner[n].layout[n].dtype)
             for n, e in entries.items()}
    for alias, name in (aliases or {}).items():
        specs[alias] = specs[name]

    def size(n: str, dt: torch.dtype) -> int:
        return torch.Size(shapes[n]).numel() * torch.empty((), dtype=dt).element_size()

    floats = {n for n, e in plan.items() if e.kind == "float"}
    total_bytes = sum(size(n, r.layout[n].dtype) for n in floats for r in readers) + \
        sum(size(n, owner[n].layout[n].dtype) for n in entries if n not in floats)
    done = {"tensors": 0, "bytes": 0}

    def add(accs: dict, coeff: float) -> Callable:
        def sink(name: str, box: Box, t: torch.Tensor) -> None:
            acc = _narrow(accs[name], box)
            done["bytes"] += t.numel() * t.element_size()
            if t.dtype not in FLOAT_DTYPES or t.device != acc.device:
                t = t.to(device=acc.device, dtype=dtype)  # e.g. float8: exact in fp32
            ema_weighted_sum_([acc], [t], coeff)
        return sink

    def copy_into(outs: dict) -> Callable:
        def sink(name: str, box: Box, t: torch.Tensor) -> None:
            done["bytes"] += t.numel() * t.element_size()
            _narrow(outs[name], box).copy_(t)  # a copy: never the source's (mapped) memory
        return sink

    def compute(names: Sequence[str]) -> dict[str, torch.Tensor]:
        accs = {n: torch.zeros(shapes[n], dtype=dtype, device=readers[0].device(n))
                for n in names if n in floats}
        for reader, coeff in zip(readers, coeffs):
            if accs:
                reader.read(list(accs), targets, add(accs, coeff))
        kept = {n: torch.empty(shapes[n], dtype=specs[n][1], device=owner[n].device(n))
                for n in names if n not in floats}
        for reader in {id(owner[n]): owner[n] for n in kept}.values():
            reader.read([n for n in kept if owner[n] is reader], targets, copy_into(kept))
        made = {n: accs[n] if n in accs else kept[n] for n in names}
        done["tensors"] += len(names)
        if on_tensor is not None:
            on_tensor(done["tensors"], len(entries), done["bytes"], total_bytes)
        return {n: _like(targets[n], t) if n in targets else t for n, t in made.items()}

    budget = max([MIN_GROUP_BYTES] + [size(n, specs[n][1]) for n in entries])
    groups, group, used = [], [], 0
    for name in entries:
        nbytes = size(name, specs[name][1])
        if group and used + nbytes > budget:
            groups.append(group)
            group, used = [], 0
        group.append(name)
        used += nbytes
    if group:
        groups.append(group)
    try:
        return writer.run({n: specs[n] for n in [*entries, *(aliases or {})]},
                          dict(aliases or {}), compute, groups, targets)
    finally:
        for reader in [*readers, *([copied] if copied is not None else [])]:
            reader.close()
