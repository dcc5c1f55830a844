"""The stochastic update in torch ops: the ``foreach`` backend's, and the fallback of the
kernel backends for pairs their kernels do not take (float64 params, non-contiguous).

Bit for bit what the kernels compute (``csrc/stochastic.h``): the same Philox4x32-10 draws,
here on int64 tensors (a 32 x 32-bit product split into 16-bit halves, so nothing
overflows), the same fp32 update without FMA (a product and a sum, each rounded) and the
same rounding, as integer ops on the fp32 bits.  The draws of every tensor of a piece
(at most ``foreach.piece_elements`` elements) are made in one pass.  It costs about 200
tensor ops per piece, so it is the slow path: the kernels draw in registers.

A float64 param is read as float32 (the stochastic update's math is fp32).
"""
from __future__ import annotations

from typing import Iterator, Sequence

import torch

from ..checks import rounding

_MUL_A, _MUL_B = 0xD2511F53, 0xCD9E8D57
_KEY_A, _KEY_B = 0x9E3779B9, 0xBB67AE85
_ROUNDS = 10
_M32 = 0xFFFFFFFF


def _mul_hi_lo(x: torch.Tensor, m: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(high, low) 32-bit words of ``x * m`` for int64 ``x`` in [0, 2**32): the products with
    m's 16-bit halves stay below 2**48."""
    t1, t2 = x * (m & 0xFFFF), x * (m >> 16)
    return (t2 + (t1 >> 16)) >> 16, (t1 + ((t2 & 0xFFFF) << 16)) & _M32


def philox(c0: torch.Tensor, c1: torch.Tensor, c2: torch.Tensor, c3: torch.Tensor,
           seed: int) -> torch.Tensor:
    """Philox4x32-10 of counters (c0, c1, c2, c3) (int64 tensors of 32-bit values) under key
    ``seed``: an int64 tensor [..., 4] of the output words."""
    k0, k1 = seed & _M32, seed >> 32
    for _ in range(_ROUNDS):
        hi_b, lo_b = _mul_hi_lo(c2, _MUL_B)
        hi_a, lo_a = _mul_hi_lo(c0, _MUL_A)
        c0, c2, c1, c3 = hi_b ^ c1 ^ k0, hi_a ^ c3 ^ k1, lo_b, lo_a
        k0, k1 = (k0 + _KEY_A) & _M32, (k1 + _KEY_B) & _M32
    return torch.stack([c0, c1, c2, c3], -1)


def random16(seed: int, offset: int, items: Sequence[tuple[int, int, int]],
             device: torch.device) -> torch.Tensor:
    """The 16-bit random numbers (int64) of ``items`` = [(position, first, n)]: elements
    first .. first + n - 1 of the tensor at ``position``, concatenated."""
    firsts = torch.tensor([f >> 3 for _, f, _ in items], dtype=torch.int64)
    counts = torch.tensor([((f + n - 1) >> 3) - (f >> 3) + 1 for _, f, n in items],
                          dtype=torch.int64)
    ends = torch.cumsum(counts, 0)
    which = torch.repeat_interleave(torch.arange(len(items)), counts)
    group = torch.arange(int(ends[-1])) - (ends - counts)[which] + firsts[which]
    position = torch.tensor([p for p, _, _ in items], dtype=torch.int64)[which]
    c0, c1 = (group & _M32).to(device), position.to(device)
    c2 = torch.full_like(c0, offset & _M32)
    c3 = torch.full_like(c0, offset >> 32)
    words = philox(c0, c1, c2, c3, seed)
    halves = torch.stack([words & 0xFFFF, words >> 16], -1).reshape(-1)  # 8 per draw
    starts = ((ends - counts) * 8).tolist()
    return torch.cat([halves[s + (f & 7):s + (f & 7) + n]
                      for s, (_, f, n) in zip(starts, items)])


def _bits16(out: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """int64 values in [0, 2**16) as a tensor of 16-bit ``dtype`` with those bits."""
    return (out - ((out >> 15) << 16)).to(torch.int16).view(dtype)


def round_bf16(x: torch.Tensor, r: torch.Tensor) -> torch.Tensor:
    """``stochastic.h``'s round_bf16 of fp32 ``x`` with the 16-bit numbers ``r``."""
    u = x.view(torch.int32).to(torch.int64) & _M32
    a = u & 0x7FFFFFFF
    out = (u + torch.where(a > 0x7F7F0000, 0x8000, r)) >> 16  # beyond the largest bf16: nearest
    return _bits16(torch.where(a > 0x7F800000, 0x7FC0, out), torch.bfloat16)


def round_f16(x: torch.Tensor, r: torch.Tensor) -> torch.Tensor:
    """``stochastic.h``'s round_f16 of fp32 ``x`` with the 16-bit numbers ``r``."""
    u = x.view(torch.int32).to(torch.int64) & _M32
    a = u & 0x7FFFFFFF
    normal = (a - 0x38000000 + (r >> 3)) >> 13
    e = a >> 23
    nonzero = e != 0
    m = (a & 0x7FFFFF) | torch.where(nonzero, 0x800000, 0)
    count = 118 - torch.where(nonzero, e, 1)
    q = torch.where((count >= 0) & (count < 32), (m << 8) >> count.clamp(0, 31), 0)
    out = torch.where(a < 0x38800000, (q + r) >> 16, normal)
    out = torch.where(a > 0x477FE000, torch.where(a >= 0x477FF000, 0x7C00, 0x7BFF), out)
    out = torch.where(a > 0x7F800000, 0x7E00, out) | ((u >> 16) & 0x8000)
    return _bits16(out, torch.float16)


def lerp_unfused(a: torch.Tensor, b: torch.Tensor, weight: float) -> torch.Tensor:
    """The fp32 update with each product and sum rounded (as the kernels, without FMA)."""
    w = torch.tensor(weight, dtype=torch.float32).item()  # the kernels take it as float32
    d = b - a
    if w < 0.5:
        return a + d * w
    return b - d * (1.0 - w)  # exact in fp32 for w >= 0.5


_ROUND = {torch.bfloat16: round_bf16, torch.float16: round_f16}


def pieces_with_starts(items: list, budget: int) -> Iterator[list]:
    """Batches of ``items`` = [(a, b, position, start)] as (a view, b view, position,
    first), at most ``budget`` elements each; a tensor above it is cut along dim 0
    (``first``: the index of the view's first element, counted from ``start``)."""
    batch, size = [], 0
    for s, p, position, start in items:
        n = s.numel()
        if n > budget and s.dim() > 0:
            if batch:
                yield batch
                batch, size = [], 0
            row = n // s.shape[0]
            rows = max(1, budget // max(1, row))
            for i in range(0, s.shape[0], rows):
                yield [(s[i:i + rows], p[i:i + rows], position, start + i * row)]
            continue
        if batch and size + n > budget:
            yield batch
            batch, size = [], 0
        batch.append((s, p, position, start))
        size += n
    if batch:
        yield batch


def update_(shadows: Sequence[torch.Tensor], params: Sequence[torch.Tensor], weight: float,
            skip_nonfinite: bool, spec: rounding.Stochastic, budget: int) -> None:
    """The stochastic update of bfloat16/float16 ``shadows`` (0 < weight < 1; the callers
    take the ends, which are exact), without overlap checks.  Pairs of one shadow dtype
    are batched into pieces of at most ``budget`` elements."""
    by_dtype: dict[torch.dtype, list] = {}
    for i, (s, p) in enumerate(zip(shadows, params)):
        if s.numel():
            by_dtype.setdefault(s.dtype, []).append((s, p, spec.positions[i], spec.starts[i]))
    for dtype, items in by_dtype.items():
        for piece in pieces_with_starts(items, budget):
            s_flat = [s.reshape(-1) for s, _, _, _ in piece]
            a = torch.cat(s_flat).float()
            b = torch.cat([p.reshape(-1).float() for _, p, _, _ in piece])
            r = random16(spec.seed, spec.offset, [(pos, f, s.numel()) for s, _, pos, f in piece],
                         a.device)
            out = _ROUND[dtype](lerp_unfused(a, b, weight), r)
            if skip_nonfinite:
                out = torch.where(torch.isfinite(b), out, torch.cat(s_flat))
            for (s, _, _, _), part in zip(piece, torch.split(out, [t.numel() for t in s_flat])):
                s.copy_(part.view(s.shape))
