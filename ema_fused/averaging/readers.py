"""Sources opened for reading a few tensors at a time: the :class:`Reader` interface, and
the readers of state dicts and ``torch.save`` files.

A reader is opened once (its names, shapes and dtypes: :attr:`Reader.layout`) and then
asked for groups of tensors, each handed to a callback (``sink``) and released as soon
as the callback returns, so that averaging holds one piece of each tensor at a time.
A tensor may come in pieces (a DCP checkpoint's chunks); ``box`` says where a piece lies
in the tensor the caller asked for.  With ``targets`` (name -> a DTensor), a reader
returns only that DTensor's local shard of the tensor on this rank.

``torch.save`` files are memory-mapped: on Linux, the pages of each tensor are handed
back to the kernel once it was used (``madvise(MADV_DONTNEED)``: clean, file-backed
pages, which the next access reads again from the file), so the resident memory of k
mapped sources does not grow into k checkpoints.
"""
from __future__ import annotations

import ctypes
import mmap
import sys
from typing import Any, Callable, Mapping, NamedTuple, Optional, Sequence

import torch

from .. import distributed as _distributed
from . import sources as _sources
from .sources import OP, Entry, Key, Source

#: (offsets, lengths) of a piece inside the (local) tensor asked for; None: all of it
Box = Optional[tuple[tuple[int, ...], tuple[int, ...]]]
Sink = Callable[[str, Box, torch.Tensor], None]


class Piece(NamedTuple):
    """A tensor of a source (or a part of it) and where it goes."""
    name: str
    box: Box
    tensor: torch.Tensor


class Reader:
    """One opened source: :attr:`layout` (plain name -> :class:`Entry`) and :meth:`read`."""

    def __init__(self, index: int, source: Source) -> None:
        self.index = index
        self.where = _sources.describe(index, source)
        self.layout: dict[str, Entry] = {}

    def device(self, name: str) -> torch.device:
        """Where the tensor ``name`` is read to."""
        return torch.device("cpu")

    def read(self, names: Sequence[str], targets: Mapping[str, torch.Tensor],
             sink: Sink) -> None:
        """``sink(name, box, tensor)`` for every piece of every tensor in ``names`` (the
        local shard of ``targets[name]`` where given); a piece dies when sink returns."""
        for name in names:
            tensor = self.tensor(name)
            like = targets.get(name)
            if _distributed.is_dtensor(tensor):  # a sharded state dict in memory
                if like is None or not _distributed.same_layout(tensor, like):
                    raise ValueError(f"{OP}: {self.where}: tensor {name!r} is "
                                     f"{_distributed.describe(tensor)}; a sharded source is "
                                     "read only into like= tensors laid out the same")
                tensor = tensor._local_tensor
            elif like is not None and _distributed.is_dtensor(like):
                tensor = shard_of(self.where, name, tensor, like)
            sink(name, None, tensor)
            self.release(tensor)

    def tensor(self, name: str) -> torch.Tensor:
        """The whole tensor ``name`` (a mapped view, for files)."""
        raise NotImplementedError

    def release(self, tensor: torch.Tensor) -> None:
        """Called when ``tensor`` (from :meth:`tensor`) is no longer used."""

    def close(self) -> None:
        """Drop what the reader holds (mappings, open files)."""


def shard_of(where: str, name: str, full: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """``like``'s local shard of the full tensor ``full`` (a view), or an error naming it."""
    box = _distributed.local_box(full, like)
    if box is None:
        raise ValueError(f"{OP}: {where}: tensor {name!r}: the local shard of like= "
                         f"({_distributed.describe(like)}) is not a box of the full tensor")
    return box


class MappingReader(Reader):
    """A state dict given in memory (``key=`` picks it inside a checkpoint object)."""

    def __init__(self, index: int, source: Mapping[str, Any], key: Key) -> None:
        super().__init__(index, source)
        self._sd = _sources.select(source, key, self.where)
        self.layout = _sources.layout(index, source, self._sd)

    def device(self, name: str) -> torch.device:
        return _distributed.local(self._sd[self.layout[name].key]).device

    def tensor(self, name: str) -> torch.Tensor:
        return self._sd[self.layout[name].key]

    def close(self) -> None:
        self._sd = {}


class TorchFileReader(MappingReader):
    """A ``torch.save`` file, loaded once with ``torch.load(mmap=True,
    weights_only=True)``.  A ``map_location`` that names a device (``"cuda:0"``) loads
    on the CPU and moves one tensor at a time there; a dict or callable is passed to
    ``torch.load`` as it is."""

    def __init__(self, index: int, path, key: Key, map_location) -> None:
        Reader.__init__(self, index, path)
        self._to = None
        if isinstance(map_location, (str, torch.device)):
            self._to = torch.device(map_location)
            map_location = "cpu"
        # pages are handed back only where they are a clean mapping of the file
        obj, mapped = _sources.load_file(index, path, map_location)
        self._mapped = mapped and map_location in (None, "cpu")
        self._sd = _sources.select(obj, key, self.where)
        self.layout = _sources.layout(index, path, self._sd)

    def device(self, name: str) -> torch.device:
        return self._to if self._to is not None else super().device(name)

    def tensor(self, name: str) -> torch.Tensor:
        t = super().tensor(name)
        return t if self._to is None else t.to(self._to)

    def release(self, tensor: torch.Tensor) -> None:
        if self._mapped and tensor.device.type == "cpu":
            drop_pages(tensor)


def _madvise() -> Optional[Callable]:
    if not sys.platform.startswith("linux"):
        return None
    try:
        fn = ctypes.CDLL(None, use_errno=True).madvise
    except (OSError, AttributeError):
        return None
    fn.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
    fn.restype = ctypes.c_int
    return fn


_MADVISE = _madvise()
_DONTNEED = 4  # MADV_DONTNEED on Linux


def drop_pages(tensor: torch.Tensor) -> None:
    """Hand back to the kernel the whole pages of a file-mapped tensor's bytes (the
    partial pages at its ends stay).  Only for the tensors of a ``torch.load(mmap=True)``
    mapping this module made and never wrote: their pages are clean copies of the file,
    read again on the next access.  On ordinary memory ``madvise`` would zero it."""
    if _MADVISE is None or tensor.numel() == 0:
        return
    # the bytes between a view's first and last element (a shard along a later dim
    # skips over others' parts: those pages are file pages too)
    span = 1 + sum((n - 1) * st for n, st in zip(tensor.shape, tensor.stride()))
    start = tensor.data_ptr()
    end = start + span * tensor.element_size()
    page = mmap.PAGESIZE
    first, last = -(-start // page) * page, end // page * page
    if last > first:
        _MADVISE(first, last - first, _DONTNEED)

