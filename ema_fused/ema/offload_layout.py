"""Where an offloaded EMA stages the model's values, and the pieces its updates run in.

A :class:`Layout` is built once per update plan (a changed model makes a new plan, and
so a new layout).  Every tracked tensor gets a slot in one host buffer, in its own dtype
and strides (a bf16 param: 2 bytes an element; :class:`StagingPool` allocates the buffer
once and grows it only when the model grows; pinned when a source is on a GPU).  The
slots are cut into :class:`Piece` s of about :data:`PIECE_BYTES`; a piece is captured (the
model's values copied into its slots) and then averaged into its shadows by one kernel
call.  A tensor larger than a piece is cut at multiples of 2**16 elements (the CPU
kernel's chunk), so the kernel sees the very chunks it would see whole, and an
elementwise update gives the same bits however it is cut.

CUDA sources: the pieces of tensors written outside optimizer steps (buffers, copied
tensors: the forward writes them) are "early": the calling thread queues their copies.
The params' pieces are "late": queued by whoever runs the update's background work,
each followed by an event that the averaging of that piece waits for.
"""
from __future__ import annotations

import weakref
from typing import Callable, Optional, Sequence

import torch

from ..backends import extension as _extension
from ..backends import selection as _backend
from ..checks import rounding

#: staging bytes per piece: the transfer of piece i+1 overlaps the averaging of piece i
PIECE_BYTES = 64 << 20
_SPLIT = 1 << 16  # cuts inside a tensor fall on multiples of the CPU kernel's chunk
_ALIGN = 64


class StagingPool:
    """The host memory a layout's slots live in: one buffer, allocated once and grown
    only when a layout needs more (``allocations`` counts the allocations).  Pinned
    buffers are registered with CUDA at their exact size (``cudaHostRegister``), not
    taken from torch's pinned-memory cache, which rounds every block up to a power of
    two (a 2.2 GB model would pin 4 GB)."""

    def __init__(self) -> None:
        self.buffer: Optional[torch.Tensor] = None
        self.allocations = 0

    def get(self, nbytes: int, pinned: bool) -> torch.Tensor:
        buf = self.buffer
        if buf is None or buf.numel() < nbytes or (pinned and not getattr(buf, "_ema_pinned",
                                                                        False)):
            self.buffer = None  # the old buffer goes before the new one is made
            self.buffer = _allocate(max(nbytes, 1), pinned)
            self.allocations += 1
        return self.buffer


def _allocate(nbytes: int, pinned: bool) -> torch.Tensor:
    buf = torch.empty(nbytes, dtype=torch.uint8)
    if not pinned:
        return buf
    cudart = torch.cuda.cudart()
    err = int(cudart.cudaHostRegister(buf.data_ptr(), nbytes, 1))  # 1: portable
    if err != 0:
        raise RuntimeError(f"EMA: pinning {nbytes / 2**20:.1f} MiB of host memory for the "
                           f"offloaded shadows' staging failed (cudaHostRegister returned "
                           f"cudaError {err})")
    weakref.finalize(buf, cudart.cudaHostUnregister, buf.data_ptr())
    buf._ema_pinned = True
    return buf


def _dense(t: torch.Tensor) -> bool:
    """Whether ``t`` covers exactly ``numel`` elements (any order): its slot can then
    have its strides, so that the kernel takes the same path it takes on ``t``."""
    if t.is_contiguous():
        return True
    dims = sorted((st, sz) for st, sz in zip(t.stride(), t.shape) if sz != 1)
    expected = 1
    for st, sz in dims:
        if st != expected:
            return False
        expected *= sz
    return True


def _slot(buf: torch.Tensor, offset: int, t: torch.Tensor) -> torch.Tensor:
    flat = buf[offset:offset + t.numel() * t.element_size()].view(t.dtype)
    if t.is_contiguous() or not _dense(t):
        return flat.view(t.shape)
    return flat.as_strided(t.shape, t.stride())


class Piece:
    """Slots captured together and averaged by one kernel call: ``captures`` are
    ``(slot, model tensor)`` copies; ``shadows[i]`` is averaged with ``staged[i]``;
    ``copied`` are ``(shadow, slot)`` pairs copied, not averaged."""

    def __init__(self, device: torch.device, early: bool) -> None:
        self.device, self.early = device, early
        self.captures: list[tuple[torch.Tensor, torch.Tensor]] = []
        self.shadows: list[torch.Tensor] = []
        self.staged: list[torch.Tensor] = []
        self.counters: list[tuple[int, int]] = []  # (position, start) of each shadow
        self.copied: list[tuple[torch.Tensor, torch.Tensor]] = []
        self.bytes = 0
        # CUDA sources: recorded after this piece's copies, waited for before averaging it
        self.event = torch.cuda.Event() if device.type == "cuda" else None
        self._prepared = None

    def add(self, shadow: Optional[torch.Tensor], slot: torch.Tensor, src: torch.Tensor,
            counter: tuple[int, int] = (0, 0)) -> None:
        self.captures.append((slot, src))
        if shadow is None:
            return
        self.shadows.append(shadow)
        self.staged.append(slot)
        self.counters.append(counter)
        self.bytes += slot.numel() * slot.element_size()

    def prepare(self, backend: str) -> None:
        """The kernel call over this piece's pairs, made once (the backend EMA picks for
        CPU shadows: the ``cpu`` kernels where the extension is built)."""
        if self.shadows:
            impl = _backend.select(backend, torch.device("cpu"))
            self._prepared = impl.prepare(self.shadows, self.staged)

    def average(self, weight: float, copy: bool, skip: bool,
                copied_value: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
                stochastic: Optional[tuple[int, int]] = None) -> None:
        """Wait for this piece's transfer (CUDA sources), then one kernel call over its
        pairs (the GIL is released while it runs), then its copied tensors.
        ``stochastic``: (seed, step) of a stochastic update (each pair's position and start
        are the layout's: a cut tensor draws the bits of the whole one)."""
        if self.event is not None:
            self.event.synchronize()
        prepared = self._prepared
        if prepared is not None and copy:
            prepared.copy_(1.0)
        elif prepared is not None and stochastic is not None:
            seed, step = stochastic
            prepared.update_(weight, skip, stochastic=rounding.Stochastic(
                seed, step, tuple(p for p, _ in self.counters),
                tuple(s for _, s in self.counters)))
        elif prepared is not None:
            prepared.update_(weight, skip)
        for s, slot in self.copied:
            s.copy_(copied_value(s, slot))


class Layout:
    """Slots and pieces for one plan's pairs (see the module docstring)."""

    def __init__(self, pool: StagingPool, shadows: Sequence[torch.Tensor],
                 params: Sequence[torch.Tensor], is_buffer: Sequence[bool],
                 copy_s: Sequence[torch.Tensor], copy_p: Sequence[torch.Tensor],
                 backend: str, piece_bytes: Optional[int] = None,
                 positions: Optional[Sequence[int]] = None) -> None:
        piece_bytes = piece_bytes or PIECE_BYTES
        # each averaged pair's position (its tracked-tensor index: a stochastic update's)
        positions = list(range(len(shadows))) if positions is None else list(positions)
        items = [(s, p, True, 0) for s, p in zip(copy_s, copy_p)]  # copied: always early
        items += [(s, p, False, q) for s, p, b, q in zip(shadows, params, is_buffer, positions)
                  if b]
        late = [(s, p, q) for s, p, b, q in zip(shadows, params, is_buffer, positions) if not b]
        offsets, total = [], 0
        for p in [p for _, p, _, _ in items] + [p for _, p, _ in late]:
            offsets.append(total)
            total += -(-p.numel() * p.element_size() // _ALIGN) * _ALIGN
        pinned = any(p.device.type == "cuda" for _, p, _, _ in items) or any(
            p.device.type == "cuda" for _, p, _ in late)
        buf = pool.get(total, pinned)
        self.pieces: list[Piece] = []
        early: dict[torch.device, Piece] = {}
        for (s, p, copied, q), off in zip(items, offsets):
            piece = early.get(p.device)
            if piece is None:
                piece = early[p.device] = Piece(p.device, True)
                self.pieces.append(piece)
            slot = _slot(buf, off, p)
            piece.add(None if copied else s, slot, p, (q, 0))
            if copied:
                piece.copied.append((s, slot))
        current: dict[torch.device, Piece] = {}
        for (s, p, q), off in zip(late, offsets[len(items):]):
            slot = _slot(buf, off, p)
            for start, s_part, slot_part, p_part in _cut(s, slot, p, piece_bytes):
                piece = current.get(p.device)
                size = slot_part.numel() * slot_part.element_size()
                if piece is None or (piece.bytes and piece.bytes + size > piece_bytes):
                    piece = current[p.device] = Piece(p.device, False)
                    self.pieces.append(piece)
                piece.add(s_part, slot_part, p_part, (q, start))
        for piece in self.pieces:
            piece.prepare(backend)
        cpu = [c for pc in self.pieces if pc.device.type == "cpu" for c in pc.captures]
        mod = _extension.module() if _extension.load(build=False) else None
        self._capture = mod.capture_ if mod is not None and hasattr(mod, "capture_") else None
        fast = [(d, s) for d, s in cpu if self._capture and d.is_contiguous()
                and s.is_contiguous()]
        self._fast = ([d for d, _ in fast], [s for _, s in fast])
        self._slow = [(d, s) for d, s in cpu if not (self._capture and d.is_contiguous()
                                                     and s.is_contiguous())]
        self.cuda_devices = sorted({pc.device for pc in self.pieces if pc.device.type == "cuda"},
                                   key=str)

    def capture_cpu(self) -> None:
        """Copy the CPU sources into their slots, bit for bit, on the calling thread: one
        C++ call for the contiguous ones (csrc/cpu_offload.cpp), ``copy_`` for the rest."""
        if self._fast[0]:
            self._capture(*self._fast)
        for d, s in self._slow:
            d.copy_(s)


def _cut(s: torch.Tensor, slot: torch.Tensor, p: torch.Tensor, piece_bytes: int):
    """``(start, shadow, slot, param)`` parts of one pair: whole (start 0), or flat slices
    of at most ``piece_bytes`` of staging cut at multiples of ``_SPLIT`` elements
    (contiguous only), ``start`` the index of a slice's first element."""
    step = max(_SPLIT, piece_bytes // p.element_size() // _SPLIT * _SPLIT)
    n = p.numel()
    if n <= step or not (s.is_contiguous() and p.is_contiguous() and slot.is_contiguous()):
        return [(0, s, slot, p)]
    fs, fslot, fp = s.view(-1), slot.view(-1), p.view(-1)
    return [(i, fs[i:i + step], fslot[i:i + step], fp[i:i + step]) for i in range(0, n, step)]
