"""The ``foreach`` backend: pure PyTorch, runs wherever PyTorch runs.

``torch._foreach_lerp_`` refuses mixed dtypes, and casting a whole bf16 model to
fp32 first would need a full fp32 copy of it.  Pairs are therefore grouped by
(shadow dtype, param dtype): equal dtypes go straight to ``_foreach_lerp_``;
mixed pairs are cast in chunks of at most :data:`CHUNK_BYTES` of temporaries
(a single larger tensor forms a chunk of its own), so the extra memory of one
update stays under ``max(CHUNK_BYTES, largest tensor in the compute dtype)``.
The math runs in the wider of the two dtypes (fp32 for any bf16/fp16 mix).
"""
from __future__ import annotations

from collections import defaultdict
from typing import Iterator, Sequence

import torch

from ._backend import Backend, register_backend

#: Upper bound on the temporaries of one chunk of mixed-dtype pairs.
CHUNK_BYTES = 64 * 2**20

Pairs = list[tuple[torch.Tensor, torch.Tensor]]


def _group(a: Sequence[torch.Tensor], b: Sequence[torch.Tensor]) -> dict:
    groups: dict[tuple[torch.dtype, torch.dtype], Pairs] = defaultdict(list)
    for x, y in zip(a, b):
        if x.numel():
            groups[(x.dtype, y.dtype)].append((x, y))
    return groups


def _chunks(pairs: Pairs, bytes_per_element: int) -> Iterator[Pairs]:
    """Split ``pairs`` so that each chunk's temporaries stay under CHUNK_BYTES."""
    chunk: Pairs = []
    size = 0
    for pair in pairs:
        nbytes = pair[0].numel() * bytes_per_element
        if chunk and size + nbytes > CHUNK_BYTES:
            yield chunk
            chunk, size = [], 0
        chunk.append(pair)
        size += nbytes
    if chunk:
        yield chunk


def update_(shadows: Sequence[torch.Tensor], params: Sequence[torch.Tensor], weight: float) -> None:
    """``shadows[i] += weight * (params[i] - shadows[i])`` with ``torch._foreach_lerp_``."""
    for (sd, pd), pairs in _group(shadows, params).items():
        if sd == pd:
            s, p = zip(*pairs)
            torch._foreach_lerp_(list(s), list(p), weight)
            continue
        wide = torch.promote_types(sd, pd)
        if wide == sd:  # only the params need a cast
            for chunk in _chunks(pairs, wide.itemsize):
                torch._foreach_lerp_([s for s, _ in chunk], [p.to(wide) for _, p in chunk], weight)
            continue
        # the shadow is the narrower one: compute in `wide`, round once when writing back
        for chunk in _chunks(pairs, 2 * wide.itemsize):
            tmp = [s.to(wide) for s, _ in chunk]
            torch._foreach_lerp_(tmp, [p.to(wide) for _, p in chunk], weight)
            torch._foreach_copy_([s for s, _ in chunk], tmp)


def copy_(dst: Sequence[torch.Tensor], src: Sequence[torch.Tensor], scale: float) -> None:
    """``dst[i] = src[i] * scale``, cast to ``dst[i].dtype`` in the same pass."""
    for d, s in zip(dst, src):
        if not d.numel():
            continue
        if scale == 1.0:
            d.copy_(s)
            continue
        wide = torch.promote_types(torch.promote_types(d.dtype, s.dtype), torch.float32)
        wide_src = s.to(wide)  # no copy when it is already `wide`
        if d.dtype == wide:
            torch.mul(wide_src, scale, out=d)
        else:  # round once, from the wide product
            d.copy_(wide_src * scale)


def _reasons(device) -> list[str]:
    return []


register_backend(Backend(
    "foreach", "pure PyTorch (torch._foreach_lerp_), runs on every device",
    update_, copy_, _reasons))
