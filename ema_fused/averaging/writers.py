"""Where a streamed average goes: a dict (returned), a safetensors file, or a DCP checkpoint.

Every writer gets the output's names, shapes and dtypes first (``specs``, with tied
names in ``aliases``, and ``targets``: the layouts of a sharded output) and a
``compute(names) -> {name: tensor}`` that makes a few tensors at a time; it keeps each
only as long as it needs to.

* :class:`DictWriter` keeps them all (what ``average_checkpoints`` returns).
* :class:`SafetensorsWriter` writes the header, then each tensor, into a temporary file
  beside ``out``, syncs it and renames it over ``out``: a cut-off run leaves no file
  under that name.
* :class:`DcpWriter` runs ``dcp.save`` with a planner whose ``resolve_data`` computes a
  tensor when DCP writes it (one at a time: one writer thread, no copy-ahead, a file
  per tensor; DCP's writer still holds the tensor it wrote last while it asks for the
  next, so two output tensors are alive at once); with
  ``distributed=True`` on every rank of the process group (each writes its shards),
  else in this process alone.  DCP writes the ``.metadata`` last, so a cut-off run
  leaves a directory that no DCP reader takes for a checkpoint.
"""
from __future__ import annotations

import os
import shutil
from typing import Callable, Mapping, Optional, Sequence

import torch

from .. import distributed as _distributed
from . import safetensors_files as _st
from .dcp_sources import calling_dcp
from .sources import OP

Spec = tuple[tuple[int, ...], torch.dtype]  # global shape, dtype
Targets = Mapping[str, torch.Tensor]  # name -> the layout to make it in (like=)
Compute = Callable[[Sequence[str]], dict[str, torch.Tensor]]


class DictWriter:
    """Keeps every tensor: the returned state dict."""

    def run(self, specs: Mapping[str, Spec], aliases: Mapping[str, str], compute: Compute,
            groups: Sequence[Sequence[str]], targets: Targets) -> dict[str, torch.Tensor]:
        made: dict[str, torch.Tensor] = {}
        for group in groups:
            made.update(compute(group))
        for alias, name in aliases.items():
            made[alias] = made[name]
        return {name: made[name] for name in specs}


class SafetensorsWriter:
    """One safetensors file at ``path``, a tensor at a time."""

    def __init__(self, path: str) -> None:
        self.path = path

    def run(self, specs: Mapping[str, Spec], aliases: Mapping[str, str], compute: Compute,
            groups: Sequence[Sequence[str]], targets: Targets) -> None:
        head, offsets = _st.header(specs, {"format": "pt"})
        tmp = f"{self.path}.tmp-{os.getpid()}"
        try:
            with open(tmp, "w+b") as f:  # read too: tied names copy their bytes back
                f.write(head)
                for group in groups:
                    for name, tensor in compute(group).items():
                        f.seek(len(head) + offsets[name][0])
                        f.write(_st.tensor_bytes(tensor))
                        del tensor
                for alias, name in aliases.items():  # tied names: their data again
                    _copy_range(f, len(head) + offsets[name][0], len(head) + offsets[alias][0],
                                offsets[name][1] - offsets[name][0])
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, self.path)
        except BaseException:
            if os.path.exists(tmp):
                os.unlink(tmp)
            raise


def _copy_range(f, src: int, dst: int, size: int, piece: int = 64 << 20) -> None:
    done = 0
    while done < size:
        f.seek(src + done)
        data = f.read(min(piece, size - done))
        f.seek(dst + done)
        f.write(data)
        done += len(data)


class DcpWriter:
    """A DCP checkpoint directory at ``path``, written through ``dcp.save``."""

    def __init__(self, path: str, sharded: bool) -> None:
        self.path, self.sharded = path, sharded

    def run(self, specs: Mapping[str, Spec], aliases: Mapping[str, str], compute: Compute,
            groups: Sequence[Sequence[str]], targets: Targets) -> None:
        import torch.distributed.checkpoint as dcp
        from torch.distributed.checkpoint import DefaultSavePlanner, FileSystemWriter

        class ComputingPlanner(DefaultSavePlanner):
            def resolve_data(self, write_item):
                if write_item.tensor_data is None:  # nothing but tensors is saved here
                    return super().resolve_data(write_item)
                fqn = write_item.index.fqn
                return _distributed.local(compute([aliases.get(fqn, fqn)])[aliases.get(fqn, fqn)])

        state = {}
        for name, (shape, dtype) in specs.items():
            like = targets.get(aliases.get(name, name))
            if like is not None and _distributed.is_dtensor(like):
                local = torch.empty(like._local_tensor.shape, dtype=dtype, device="meta")
                state[name] = _distributed.wrap_like(like, local)
            else:
                state[name] = torch.empty(shape, dtype=dtype, device="meta")
        alone = not self.sharded
        made = not os.path.exists(self.path)
        # a file per tensor: DCP keeps every tensor of a file alive until the file is
        # closed (torch 2.14's writer holds them for its safetensors format), so one file
        # per rank would hold the whole output
        writer = FileSystemWriter(self.path, single_file_per_rank=False, thread_count=1,
                                  per_thread_copy_ahead=0)
        try:
            with calling_dcp():
                dcp.save(state, storage_writer=writer, planner=ComputingPlanner(),
                         no_dist=alone)
        except BaseException:
            if alone and made:  # a directory this call made holds no checkpoint: remove it
                shutil.rmtree(self.path, ignore_errors=True)
            raise


def check_out(out, like: Optional[Mapping[str, torch.Tensor]]):
    """The writer for ``out=`` (None: a dict), after checking the path; nothing is
    created yet.  ``like``: the output's layout when it is computed shard by shard."""
    if out is None:
        return DictWriter()
    if not isinstance(out, (str, os.PathLike)):
        raise TypeError(f"{OP}: out must be a path (a .safetensors file or a directory for "
                        f"a DCP checkpoint), got {type(out).__name__}")
    path = os.fspath(out)
    if path.endswith(".safetensors"):
        if like is not None:
            raise ValueError(f"{OP}: like= writes each rank's shards through DCP: out must "
                             f"be a directory, not {path!r} (make the safetensors file "
                             "afterwards in one process: average_checkpoints([dir], "
                             "out='....safetensors'))")
        if os.path.isdir(path):
            raise IsADirectoryError(f"{OP}: out={path!r} is a directory")
        return SafetensorsWriter(path)
    if os.path.isfile(path):
        raise FileExistsError(f"{OP}: out={path!r} is a file; out is a .safetensors file, "
                              "or a directory for a DCP checkpoint")
    if os.path.isdir(path) and os.listdir(path):
        raise FileExistsError(f"{OP}: out={path!r} is a directory that is not empty; a DCP "
                              "checkpoint is written into a new or empty directory")
    return DcpWriter(path, like is not None)
