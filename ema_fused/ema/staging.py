"""Run the ops when the two sides live on different devices (e.g. shadows on the CPU).

Same-device pairs go straight to the op.  Cross-device sources are moved to the
destination's device in pieces of at most :data:`STAGE_ELEMENTS` elements (in the
source's own dtype, so a bf16 model moves 2 bytes per element; large tensors are
cut along dim 0), which bounds the extra memory of one call to 64 MiB for fp32.
"""
from __future__ import annotations

from typing import Iterator, Sequence

import torch

from ..backends.foreach import pieces
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


def update_across_(shadows: Sequence[torch.Tensor], params: Sequence[torch.Tensor],
                   weight: float, backend: str, skip_nonfinite: bool = False) -> None:
    """``ema_update_`` for checked pairs that may sit on different devices."""
    for s, p in _staged(shadows, params):
        dispatch("update", s, p, weight, backend, skip_nonfinite)


def copy_across_(dst: Sequence[torch.Tensor], src: Sequence[torch.Tensor],
                 scale: float, backend: str) -> None:
    """``ema_copy_`` for checked pairs that may sit on different devices."""
    for d, s in _staged(dst, src):
        dispatch("copy", d, s, scale, backend)
