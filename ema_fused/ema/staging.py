"""Run the ops when the two sides live on different devices (e.g. shadows on the CPU).

Same-device pairs go straight to the op.  Cross-device sources are moved to the
destination's device in pieces of at most :data:`STAGE_ELEMENTS` elements (in the
source's own dtype, so a bf16 model moves 2 bytes per element; large tensors are
cut along dim 0), which bounds the extra memory of one call to 64 MiB for fp32.
"""
from __future__ import annotations

from typing import Iterator, Optional, Sequence

import torch

from ..backends.foreach import pieces
from ..backends.stochastic import pieces_with_starts
from ..checks import rounding
from ..ops import dispatch

STAGE_ELEMENTS = 1 << 24


def _staged(dst: Sequence[torch.Tensor], src: Sequence[torch.Tensor]) -> Iterator[tuple[list, list]]:
    local_d, local_s, far = [], [], []
    for d, s in zip(dst, src):
        if d.device == s.device:
            local_d.append(d)
            local_s.append(s)
        else:
            far.append((d, s))
    if local_d:
        yield local_d, local_s
    for piece in pieces(far, STAGE_ELEMENTS):
        yield [d for d, _ in piece], [s.to(d.device) for d, s in piece]


def _staged_stochastic(dst: Sequence[torch.Tensor], src: Sequence[torch.Tensor],
                       spec: rounding.Stochastic) -> Iterator[tuple[list, list, rounding.Stochastic]]:
    """:func:`_staged` with each piece's counter words: a tensor cut into row pieces keeps
    its position, and each piece starts at the index of its first element, so the random
    bits are the ones an unstaged update would draw."""
    near = [i for i, (d, s) in enumerate(zip(dst, src)) if d.device == s.device]
    if near:
        yield [dst[i] for i in near], [src[i] for i in near], spec.pick(near)
    far = [(dst[i], src[i], spec.positions[i], spec.starts[i])
           for i, (d, s) in enumerate(zip(dst, src)) if d.device != s.device]
    for piece in pieces_with_starts(far, STAGE_ELEMENTS):
        yield ([d for d, _, _, _ in piece], [s.to(d.device) for d, s, _, _ in piece],
               spec._replace(positions=tuple(q for _, _, q, _ in piece),
                             starts=tuple(f for _, _, _, f in piece)))


def update_across_(shadows: Sequence[torch.Tensor], params: Sequence[torch.Tensor],
                   weight: float, backend: str, skip_nonfinite: bool = False,
                   stochastic: Optional[rounding.Stochastic] = None) -> None:
    """``ema_update_`` for checked pairs that may sit on different devices (``stochastic``:
    the counter words of the pairs, for a stochastic update)."""
    if stochastic is not None:
        for s, p, spec in _staged_stochastic(shadows, params, stochastic):
            dispatch("update", s, p, weight, backend, skip_nonfinite, spec)
        return
    for s, p in _staged(shadows, params):
        dispatch("update", s, p, weight, backend, skip_nonfinite)


def copy_across_(dst: Sequence[torch.Tensor], src: Sequence[torch.Tensor],
                 scale: float, backend: str) -> None:
    """``ema_copy_`` for checked pairs that may sit on different devices."""
    for d, s in _staged(dst, src):
        dispatch("copy", d, s, scale, backend)
