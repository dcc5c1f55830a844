"""safetensors files: reading them as sources, and writing one a tensor at a time.

Format (https://github.com/huggingface/safetensors, "Format"): an unsigned 64-bit
little-endian header length N, N bytes of JSON (``{name: {"dtype": "F32", "shape":
[...], "data_offsets": [begin, end]}, "__metadata__": {str: str}}``, padded with
spaces), then the tensors' bytes, little-endian, C order, back to back with no holes.

Reading uses the ``safetensors`` package (``pip install 'ema_fused[safetensors]'``): a
file is opened for each tensor read and closed at once, so that its mapped pages do not
pile up.  Writing needs no package: the library writes a file from tensors that are
all in memory (its maintainers keep it so, safetensors issues 291 and 531), while
averaging knows every name, shape and dtype before the first sum, so :class:`Writer`
writes the header first and then each tensor as it is made.
"""
from __future__ import annotations

import json
import os
import struct
import sys
from typing import Mapping, Sequence

import torch

from .. import distributed as _distributed
from . import sources as _sources
from .readers import Reader, Sink
from .sources import OP, Key

#: the format's dtype codes
CODES = {torch.float64: "F64", torch.float32: "F32", torch.float16: "F16",
         torch.bfloat16: "BF16", torch.int64: "I64", torch.int32: "I32", torch.int16: "I16",
         torch.int8: "I8", torch.uint8: "U8", torch.bool: "BOOL",
         torch.float8_e4m3fn: "F8_E4M3", torch.float8_e5m2: "F8_E5M2"}
for _name, _code in (("uint16", "U16"), ("uint32", "U32"), ("uint64", "U64")):
    if hasattr(torch, _name):
        CODES[getattr(torch, _name)] = _code
DTYPES = {code: dtype for dtype, code in CODES.items()}


def is_safetensors_file(path) -> bool:
    """Whether ``path`` is a file that starts like a safetensors file (a header length
    that fits the file, then ``{``)."""
    try:
        with open(path, "rb") as f:
            head = f.read(9)
            size = os.fstat(f.fileno()).st_size
    except OSError:
        return False
    return len(head) == 9 and head[8:] == b"{" and struct.unpack("<Q", head[:8])[0] <= size - 8


def _safe_open(where: str):
    try:
        from safetensors import safe_open
    except ImportError as exc:
        raise ImportError(f"{OP}: {where} is a safetensors file: reading it needs the "
                          "safetensors package (pip install 'ema_fused[safetensors]' or "
                          "pip install safetensors)") from exc
    return safe_open


class SafetensorsReader(Reader):
    """A safetensors file: ``key=`` picks the tensors under a dotted prefix."""

    def __init__(self, index: int, path, key: Key) -> None:
        super().__init__(index, path)
        self._path = os.fspath(path)
        self._open = _safe_open(self.where)
        with self._open(self._path, framework="pt") as f:
            for inner, k in _sources.select_flat(list(f.keys()), key, self.where).items():
                piece = f.get_slice(k)
                code = piece.get_dtype()
                if code not in DTYPES:
                    raise TypeError(f"{OP}: {self.where}: tensor {k!r} has dtype {code}, "
                                    "which this torch cannot hold")
                _sources.add_entry(self.layout, self.where, k, piece.get_shape(),
                                   DTYPES[code], inner)

    def read(self, names: Sequence[str], targets: Mapping[str, torch.Tensor],
             sink: Sink) -> None:
        for name in names:
            key, like = self.layout[name].key, targets.get(name)
            # one opening per tensor: closing it unmaps the pages it touched
            with self._open(self._path, framework="pt") as f:
                if like is not None and _distributed.is_dtensor(like) and like.dim() > 0:
                    bounds = _distributed.local_bounds(like)
                    if bounds is None:
                        raise ValueError(f"{OP}: {self.where}: tensor {name!r}: the local "
                                         "shard of like= is not a box of the full tensor")
                    box = tuple(slice(o, o + n) for o, n in zip(*bounds))
                    tensor = f.get_slice(key)[box]
                else:
                    tensor = f.get_tensor(key)
                sink(name, None, tensor)
                del tensor


def header(specs: Mapping[str, tuple[tuple[int, ...], torch.dtype]],
           metadata: Mapping[str, str]) -> tuple[bytes, dict[str, tuple[int, int]]]:
    """The length-prefixed, padded header for tensors ``name -> (shape, dtype)`` laid out
    in that order, and each one's ``(begin, end)`` in the data that follows."""
    if sys.byteorder != "little":
        raise RuntimeError(f"{OP}: safetensors files are little-endian; this machine is not")
    table: dict = {"__metadata__": dict(metadata)}
    offsets, at = {}, 0
    for name, (shape, dtype) in specs.items():
        if dtype not in CODES:
            raise TypeError(f"{OP}: tensor {name!r} has dtype {dtype}, which safetensors "
                            "files cannot hold")
        size = torch.Size(shape).numel() * torch.empty((), dtype=dtype).element_size()
        offsets[name] = (at, at + size)
        table[name] = {"dtype": CODES[dtype], "shape": list(shape), "data_offsets": [at, at + size]}
        at += size
    text = json.dumps(table, separators=(",", ":")).encode()
    text += b" " * (-len(text) % 8)  # the data starts 8-byte aligned
    return struct.pack("<Q", len(text)) + text, offsets


def tensor_bytes(tensor: torch.Tensor) -> memoryview:
    """The bytes of ``tensor`` in C order, as a view when it is contiguous on the CPU."""
    t = tensor.detach().to("cpu").contiguous().reshape(-1)
    return memoryview(t.view(torch.uint8).numpy()) if t.numel() else memoryview(b"")
