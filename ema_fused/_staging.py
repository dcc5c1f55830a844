"""Run the ops when the two sides live on different devices (e.g. shadows on the CPU).

Same-device pairs go straight to the op.  Cross-device sources are moved to the
destination's device in chunks of at most ``fallback.CHUNK_BYTES`` (in the
source's own dtype, so a bf16 model moves 2 bytes per element), which bounds the
extra memory of one call.
"""
from __future__ import annotations

from typing import Callable, Iterator, Sequence

import torch

from .fallback import CHUNK_BYTES
from .ops import ema_copy_, ema_update_

Op = Callable[..., None]


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
    chunk_d, chunk_s, size = [], [], 0
    for d, s in far:
        nbytes = s.numel() * s.element_size()
        if chunk_d and size + nbytes > CHUNK_BYTES:
            yield chunk_d, chunk_s
            chunk_d, chunk_s, size = [], [], 0
        chunk_d.append(d)
        chunk_s.append(s.to(d.device))
        size += nbytes
    if chunk_d:
        yield chunk_d, chunk_s


def update_across_(shadows: Sequence[torch.Tensor], params: Sequence[torch.Tensor],
                   weight: float, backend: str) -> None:
    """:func:`ema_update_` for pairs that may sit on different devices."""
    for s, p in _staged(shadows, params):
        ema_update_(s, p, weight, backend=backend)


def copy_across_(dst: Sequence[torch.Tensor], src: Sequence[torch.Tensor],
                 scale: float, backend: str) -> None:
    """:func:`ema_copy_` for pairs that may sit on different devices."""
    for d, s in _staged(dst, src):
        ema_copy_(d, s, scale, backend=backend)
