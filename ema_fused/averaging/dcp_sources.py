"""``torch.distributed.checkpoint`` (DCP) directories as sources, read a few tensors at a time.

A DCP checkpoint is a directory of ``.distcp`` files written by every rank and a
``.metadata`` file, written last, that lists every tensor with its global shape, dtype
and the chunks each rank saved.  A source is recognised by that file.  One group of
tensors is read with ``dcp.load`` of a state dict holding only them (placeholders: DCP
plans from shapes: :func:`placeholder`), in this process alone (``no_dist=True``), through a
``FileSystemReader`` that keeps the metadata it read once.  DCP reshards on its own: a
target that is a DTensor gets only its local shard, whatever the world size that saved.

DCP's own reader loads each saved chunk and copies it into a target tensor; here each
chunk is handed to the caller directly (``ChunkReader.read_data``), so no target
is allocated: reading holds one chunk, not a chunk and a copy.  Chunks written through
a storage transform (DCP extensions, e.g. compression) take DCP's own path.
"""
from __future__ import annotations

import contextlib
import io
import os
import warnings
from typing import Iterator, Mapping, Sequence

import torch

from .. import distributed as _distributed
from . import sources as _sources
from .readers import Reader, Sink
from .sources import OP, Key

METADATA = ".metadata"


def is_dcp_dir(path) -> bool:
    """Whether ``path`` is a directory holding a DCP checkpoint's metadata."""
    return os.path.isdir(path) and os.path.isfile(os.path.join(path, METADATA))


class _FileSlice(io.RawIOBase):
    """Bytes ``[offset, offset + length)`` of an open file as a seekable file of their own
    (``torch.load`` reads a saved chunk straight from it, with ``readinto``)."""

    def __init__(self, f, offset: int, length: int) -> None:
        super().__init__()
        self._f, self._start, self._len, self._pos = f, offset, length, 0

    def readable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return True

    def tell(self) -> int:
        return self._pos

    def seek(self, pos: int, whence: int = io.SEEK_SET) -> int:
        base = {io.SEEK_SET: 0, io.SEEK_CUR: self._pos, io.SEEK_END: self._len}[whence]
        self._pos = max(0, base + pos)
        return self._pos

    def readinto(self, buffer) -> int:
        view = memoryview(buffer).cast("B")
        n = max(0, min(len(view), self._len - self._pos))
        self._f.seek(self._start + self._pos)
        got = self._f.readinto(view[:n]) if n else 0
        self._pos += got
        return got


def _narrow(t: torch.Tensor, offsets: Sequence[int], lengths: Sequence[int]) -> torch.Tensor:
    for dim, (start, length) in enumerate(zip(offsets, lengths)):
        if start != 0 or length != t.shape[dim]:
            t = t.narrow(dim, start, length)
    return t


def _classes():
    """The reader and planner classes, made on first use: ``torch.distributed``
    is imported only when a DCP source is read."""
    global _ChunkReader, _SinkPlanner
    if _ChunkReader is not None:
        return _ChunkReader, _SinkPlanner
    from torch.distributed.checkpoint import DefaultLoadPlanner, FileSystemReader
    from torch.futures import Future

    class ChunkReader(FileSystemReader):
        """A ``FileSystemReader`` that reads the metadata once and hands each chunk to
        the planner's sink instead of copying it into a target."""

        def __init__(self, path) -> None:
            super().__init__(path)
            self._metadata = None

        def read_metadata(self):
            if self._metadata is None:
                self._metadata = super().read_metadata()
            return self._metadata

        def read_data(self, plan, planner):
            infos = [self.storage_data[r.storage_index] for r in plan.items]
            if not isinstance(planner, SinkPlanner) or any(
                    getattr(i, "transform_descriptors", None) for i in infos):
                return super().read_data(plan, planner)
            order = sorted(range(len(infos)),
                           key=lambda i: (infos[i].relative_path, infos[i].offset))
            for i in order:
                req, info = plan.items[i], infos[i]
                with open(os.path.join(self.path, info.relative_path), "rb") as f:
                    chunk = torch.load(_FileSlice(f, info.offset, info.length),
                                       map_location="cpu", weights_only=True)
                planner.commit_tensor(req, _narrow(chunk, req.storage_offsets, req.lengths))
                del chunk
            done: Future = Future()
            done.set_result(None)
            return done

    class SinkPlanner(DefaultLoadPlanner):
        """Loads nothing into the state dict: every piece read goes to ``sink``."""

        def __init__(self, sink: Sink, names: Mapping[str, str],
                     dtypes: Mapping[str, torch.dtype]) -> None:
            super().__init__()
            self._sink, self._names, self._dtypes = sink, names, dtypes

        def resolve_tensor(self, read_item):  # DCP's own read path copies into this
            return torch.empty(tuple(read_item.lengths),
                               dtype=self._dtypes[read_item.dest_index.fqn])

        def commit_tensor(self, read_item, tensor) -> None:
            box = (tuple(read_item.dest_offsets), tuple(read_item.lengths))
            self._sink(self._names[read_item.dest_index.fqn], box, tensor)

    _ChunkReader, _SinkPlanner = ChunkReader, SinkPlanner
    return _ChunkReader, _SinkPlanner


_ChunkReader = _SinkPlanner = None


@contextlib.contextmanager
def calling_dcp() -> Iterator[None]:
    """Around a ``dcp.load``/``dcp.save``: without the warning DCP gives on every
    single-process call, and raising the first error that DCP wrapped in its
    ``CheckpointException`` (a ``BaseException`` whose ``failures`` map ranks to
    ``(exception, traceback)``) as that error itself: an error of ours raised
    inside DCP, an ``OSError`` of the disk, come out as they are, on every rank."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="torch.distributed is .*unavailable or "
                                "uninitialized, assuming")
        try:
            yield
        except BaseException as exc:
            failures = getattr(exc, "failures", None)
            if isinstance(failures, Mapping):
                for failure in failures.values():
                    inner = failure[0] if isinstance(failure, tuple) and failure else failure
                    if isinstance(inner, Exception):
                        raise inner from None
            raise


def placeholder(shape, dtype: torch.dtype) -> torch.Tensor:
    """A tensor of ``shape`` that holds one element (expanded): DCP plans reads and
    writes from shapes, and is handed tensors of the real sizes elsewhere.  (Meta
    tensors would not do: DCP's load planner makes them real, on the process group's
    device.)"""
    return torch.empty((), dtype=dtype).expand(tuple(shape))


class DcpReader(Reader):
    """A DCP checkpoint directory: ``key=`` picks the tensors under a dotted prefix
    (``"model"`` for ``dcp.save({"model": ...})``)."""

    def __init__(self, index: int, path, key: Key) -> None:
        super().__init__(index, path)
        reader_class, _ = _classes()
        self._storage = reader_class(path)
        try:
            items = self._storage.read_metadata().state_dict_metadata
        except Exception as exc:
            raise type(exc)(f"{OP}: {self.where}: cannot read the DCP metadata: "
                            f"{exc}") from exc
        for inner, fqn in _sources.select_flat(list(items), key, self.where).items():
            md = items[fqn]
            if not hasattr(md, "chunks"):
                raise _sources.not_a_tensor(self.where, fqn, "a non-tensor value (saved "
                                            "as bytes)")
            _sources.add_entry(self.layout, self.where, fqn, md.size, md.properties.dtype,
                               inner)

    def read(self, names: Sequence[str], targets: Mapping[str, torch.Tensor],
             sink: Sink) -> None:
        import torch.distributed.checkpoint as dcp
        state, fqn_names, dtypes = {}, {}, {}
        for name in names:
            e = self.layout[name]
            like = targets.get(name)
            if like is not None and _distributed.is_dtensor(like):
                local = placeholder(like._local_tensor.shape, e.dtype)
                state[e.key] = _distributed.wrap_like(like, local)
            else:
                state[e.key] = placeholder(e.shape, e.dtype)
            fqn_names[e.key], dtypes[e.key] = name, e.dtype
        planner = _classes()[1](sink, fqn_names, dtypes)
        with calling_dcp():
            dcp.load(state, storage_reader=self._storage, planner=planner, no_dist=True)
