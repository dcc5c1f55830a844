"""The ``foreach`` backend: pure PyTorch, runs wherever PyTorch runs.

``torch._foreach_lerp_`` refuses mixed dtypes, and casting a whole bf16 model to
fp32 first would need a full fp32 copy of it.  Pairs are therefore grouped by
(shadow dtype, param dtype): equal dtypes go straight to ``_foreach_lerp_``;
mixed pairs are cut into pieces of at most :func:`piece_elements` elements
(large tensors are sliced along their first dimension, small ones batched), and
each piece is cast and lerped while its temporaries are still in cache.  The
math runs in the wider of the two dtypes (fp32 for any bf16/fp16 mix).

Why small pieces, measured on the project's 2-core CPU machine (336M-parameter
bf16 model, fp32 shadows, benchmarks/bench_fallback.py): casting in 64 MiB chunks
took 628 ms per update, slower than timm's ModelEmaV3 (566 ms, same run), because
every large temporary came fresh from the OS (~280k page faults per update).  With
2^20-element pieces: 95.7 ms vs timm's 487.9 ms (same run; 2^14: 4x slower from
Python overhead, 2^22: no better).  The extra memory of one update is then a few MiB
(one piece, or one row of a tensor whose rows are larger: 8 MiB measured), far under
max(64 MiB, largest tensor in fp32).
"""
from __future__ import annotations

from collections import defaultdict
from typing import Iterator, Optional, Sequence

import torch

from ..checks import multi, rounding, tensors
from . import stochastic as _stochastic
from .selection import Backend, register_backend

#: Elements per piece: small enough to stay in cache on a CPU, large enough to keep
#: a GPU busy (where the fused backends should be used anyway).
CPU_PIECE = 1 << 20
GPU_PIECE = 1 << 24

Pairs = list[tuple[torch.Tensor, torch.Tensor]]


def piece_elements(device: torch.device) -> int:
    """How many elements one piece of a mixed-dtype pass holds on ``device``."""
    return CPU_PIECE if device.type == "cpu" else GPU_PIECE


def _group(a: Sequence[torch.Tensor], b: Sequence[torch.Tensor]) -> dict:
    groups: dict[tuple[torch.dtype, torch.dtype], Pairs] = defaultdict(list)
    for x, y in zip(a, b):
        if x.numel():
            groups[(x.dtype, y.dtype)].append((x, y))
    return groups


def pieces(pairs: Pairs, budget: int) -> Iterator[Pairs]:
    """Batches of matching views of ``pairs`` holding at most ``budget`` elements each.

    Tensors above the budget are cut along dim 0 (any strides work: rows of a view
    are views); a single row above the budget forms a piece of its own.
    """
    batch: Pairs = []
    size = 0
    for a, b in pairs:
        n = a.numel()
        if n > budget and a.dim() > 0:
            if batch:
                yield batch
                batch, size = [], 0
            rows = max(1, budget // max(1, n // a.shape[0]))
            for i in range(0, a.shape[0], rows):
                yield [(a[i:i + rows], b[i:i + rows])]
            continue
        if batch and size + n > budget:
            yield batch
            batch, size = [], 0
        batch.append((a, b))
        size += n
    if batch:
        yield batch


def _update_tensor_weight_(pairs: Pairs, weight: torch.Tensor) -> None:
    """The graph-safe form: ``weight`` stays on the device (``_foreach_lerp_`` would
    turn a tensor weight into a Python number, a host sync), so lerp tensor by tensor.
    Its ends are exact as in the kernels: 0 keeps the shadow (an Inf param would make
    lerp's NaN), 1 gives the param (an Inf shadow would make lerp's NaN)."""
    wides: dict[torch.dtype, tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = {}
    for piece in pieces(pairs, piece_elements(pairs[0][0].device)):
        for s, p in piece:
            wide = torch.promote_types(torch.promote_types(s.dtype, p.dtype), torch.float32)
            if wide not in wides:
                w = weight.reshape(()).to(wide)
                wides[wide] = (w, w == 0, w == 1)
            w, keep, take = wides[wide]
            start, end = s.to(wide), p.to(wide)
            s.copy_(torch.where(keep, start, torch.where(take, end, start.lerp(end, w))))


def _finite_pieces(shadows: Sequence[torch.Tensor], params: Sequence[torch.Tensor]):
    """Piece by piece: (shadows, params with each NaN/Inf element replaced by its
    shadow's value, in the pair's wider dtype).  ``lerp(s, s, w)`` is exactly ``s`` on
    both sides of the two-sided lerp, so updating with these leaves those elements as
    they were and all others as the plain update would (the kernels decide in
    registers instead; this fallback pays one temporary piece)."""
    pairs = [(s, p) for s, p in zip(shadows, params) if s.numel()]
    for piece in pieces(pairs, piece_elements(pairs[0][0].device)) if pairs else ():
        clean = []
        for s, p in piece:
            wide = torch.promote_types(s.dtype, p.dtype)
            clean.append(torch.where(torch.isfinite(p), p.to(wide), s.to(wide)))
        yield [s for s, _ in piece], clean


def split_stochastic(shadows: Sequence[torch.Tensor], params: Sequence[torch.Tensor],
                     supported) -> tuple[list[int], list[int], list[int]]:
    """Where the pairs of a stochastic update go, as indices: (16-bit shadows a kernel takes
    (``supported(shadow, param)``), other 16-bit shadows (the torch code of
    :mod:`.stochastic`), wider shadows (nothing to round: the nearest update))."""
    kernel, torch_code, nearest = [], [], []
    for i, (s, p) in enumerate(zip(shadows, params)):
        if s.dtype not in rounding.ROUNDED_DTYPES:
            nearest.append(i)
        else:
            (kernel if supported(s, p) else torch_code).append(i)
    return kernel, torch_code, nearest


def update_stochastic(shadows: Sequence[torch.Tensor], params: Sequence[torch.Tensor],
                      weight: float, skip_nonfinite: bool, spec: rounding.Stochastic, supported,
                      kernel, nearest) -> None:
    """A stochastic update (0 < weight < 1) split as :func:`split_stochastic` says:
    ``kernel(shadows, params, weight, skip_nonfinite, spec)`` for the first group,
    ``nearest(shadows, params, weight, skip_nonfinite)`` for the last.  All pairs are
    checked for overlaps first when they go more than one way."""
    groups = split_stochastic(shadows, params, supported)
    if sum(1 for g in groups if g) > 1:
        tensors.check_no_overlap("update", shadows, params)
    k, t, n = groups
    if k:
        kernel([shadows[i] for i in k], [params[i] for i in k], weight, skip_nonfinite,
               spec.pick(k))
    if t:
        _stochastic.update_([shadows[i] for i in t], [params[i] for i in t], weight,
                            skip_nonfinite, spec.pick(t), piece_elements(shadows[t[0]].device))
    if n:
        nearest([shadows[i] for i in n], [params[i] for i in n], weight, skip_nonfinite)


def _no_kernel(s: torch.Tensor, p: torch.Tensor) -> bool:
    return False


def update_unchecked(shadows: Sequence[torch.Tensor], params: Sequence[torch.Tensor],
                     weight, skip_nonfinite: bool = False,
                     stochastic: Optional[rounding.Stochastic] = None) -> None:
    """:func:`update_` without the overlap check, for callers that made it already."""
    if stochastic is not None and weight not in (0.0, 1.0):  # the ends are exact: no rounding
        update_stochastic(shadows, params, weight, skip_nonfinite, stochastic, _no_kernel, None,
                          update_unchecked)
        return
    if skip_nonfinite:
        if isinstance(weight, torch.Tensor) or weight != 0.0:
            for s, clean in _finite_pieces(shadows, params):
                update_unchecked(s, clean, weight)
        return
    if isinstance(weight, torch.Tensor):
        pairs = [(s, p) for s, p in zip(shadows, params) if s.numel()]
        if pairs:
            _update_tensor_weight_(pairs, weight)
        return
    if weight == 0.0:  # nothing changes (and an Inf param must not make a NaN shadow)
        return
    if weight == 1.0:  # exactly the params, whatever the shadows held
        copy_unchecked(shadows, params, 1.0)
        return
    for (sd, pd), pairs in _group(shadows, params).items():
        if sd == pd:
            torch._foreach_lerp_([s for s, _ in pairs], [p for _, p in pairs], weight)
            continue
        wide = torch.promote_types(sd, pd)
        for piece in pieces(pairs, piece_elements(pairs[0][0].device)):
            wide_params = [p.to(wide) for _, p in piece]
            if wide == sd:  # only the params need a cast
                torch._foreach_lerp_([s for s, _ in piece], wide_params, weight)
            else:  # the shadow is narrower: compute in `wide`, round once when writing back
                tmp = [s.to(wide) for s, _ in piece]
                torch._foreach_lerp_(tmp, wide_params, weight)
                torch._foreach_copy_([s for s, _ in piece], tmp)


def copy_unchecked(dst: Sequence[torch.Tensor], src: Sequence[torch.Tensor],
                   scale: float) -> None:
    """:func:`copy_` without the overlap check."""
    for (dd, sd), pairs in _group(dst, src).items():
        if scale == 1.0:
            torch._foreach_copy_([d for d, _ in pairs], [s for _, s in pairs])
            continue
        wide = torch.promote_types(torch.promote_types(dd, sd), torch.float32)
        for piece in pieces(pairs, piece_elements(pairs[0][0].device)):
            for d, s in piece:
                if d.dtype == wide:
                    torch.mul(s.to(wide), scale, out=d)
                else:
                    d.copy_(s.to(wide) * scale)


def swap_unchecked(a: Sequence[torch.Tensor], b: Sequence[torch.Tensor]) -> None:
    """:func:`swap_` without the overlap check."""
    for _, pairs in _group(a, b).items():
        for piece in pieces(pairs, piece_elements(pairs[0][0].device)):
            xs, ys = [x for x, _ in piece], [y for _, y in piece]
            tmp = [x.clone() for x in xs]
            torch._foreach_copy_(xs, ys)
            torch._foreach_copy_(ys, tmp)


def weighted_sum_unchecked(out: Sequence[torch.Tensor], inputs: Sequence[torch.Tensor],
                           weight: float) -> None:
    """:func:`weighted_sum_` without the overlap check."""
    if weight == 0.0:  # adds nothing (and an Inf input must not make a NaN)
        return
    in_float32 = float(torch.tensor(weight, dtype=torch.float32)) != 0.0
    for (od, xd), pairs in _group(out, inputs).items():
        if od == torch.float32 and xd != torch.float64 and not in_float32:
            continue  # float32 math: this weight is 0 there (no 0 * Inf = NaN either)
        if od == xd:
            torch._foreach_add_([o for o, _ in pairs], [x for _, x in pairs], alpha=weight)
            continue
        wide = torch.promote_types(torch.promote_types(od, xd), torch.float32)
        for piece in pieces(pairs, piece_elements(pairs[0][0].device)):
            wide_inputs = [x.to(wide) for _, x in piece]
            if wide == od:  # only the inputs need a cast (a bf16/fp16 input, fp32 out)
                torch._foreach_add_([o for o, _ in piece], wide_inputs, alpha=weight)
            else:  # a float64 input into a float32 out: add in float64, round once
                tmp = [o.to(wide) for o, _ in piece]
                torch._foreach_add_(tmp, wide_inputs, alpha=weight)
                torch._foreach_copy_([o for o, _ in piece], tmp)


def update_(shadows: Sequence[torch.Tensor], params: Sequence[torch.Tensor], weight,
            skip_nonfinite: bool = False, stochastic: Optional[rounding.Stochastic] = None) -> None:
    """``shadows[i] += weight * (params[i] - shadows[i])`` with ``torch._foreach_lerp_``;
    weight 0 changes nothing and weight 1 copies, exactly, as in the kernels.

    ``weight``: a Python number, or a 1-element device tensor (graph-safe form).
    ``skip_nonfinite``: elements whose param is NaN or +-Inf keep their shadow.
    ``stochastic``: round 16-bit shadows stochastically with these counter words (the
    kernels' bits, from torch ops: :mod:`.stochastic`).
    Pairs that share memory are refused first (``checks.tensors.check_no_overlap``)."""
    tensors.check_no_overlap("update", shadows, params)
    update_unchecked(shadows, params, weight, skip_nonfinite, stochastic)


def copy_(dst: Sequence[torch.Tensor], src: Sequence[torch.Tensor], scale: float) -> None:
    """``dst[i] = src[i] * scale``, computed in at least fp32 and rounded once into ``dst[i]``."""
    tensors.check_no_overlap("copy", dst, src)
    copy_unchecked(dst, src, scale)


def swap_(a: Sequence[torch.Tensor], b: Sequence[torch.Tensor]) -> None:
    """Exchange ``a[i]`` and ``b[i]`` (equal dtypes) through piece-sized temporaries."""
    tensors.check_no_overlap("swap", a, b)
    swap_unchecked(a, b)


def weighted_sum_(out: Sequence[torch.Tensor], inputs: Sequence[torch.Tensor],
                  weight: float) -> None:
    """``out[i] += weight * inputs[i]`` with ``torch._foreach_add_(alpha=weight)`` where the
    dtypes agree, else in piece-sized casts; computed in the wider of the two dtypes (at
    least fp32) and rounded once into ``out[i]``.  Weight 0 changes and reads nothing."""
    tensors.check_no_overlap("weighted_sum", out, inputs)
    weighted_sum_unchecked(out, inputs, weight)


def split_for_kernels(kind: str, a: Sequence[torch.Tensor], b: Sequence[torch.Tensor],
                      supported) -> tuple[list, list, list, list]:
    """``(kernel a, kernel b, rest a, rest b)``: the pairs ``supported(x, y)`` takes for a
    kernel backend, and the rest for this module's ``*_unchecked`` functions.  The
    kernels check their own pairs for overlaps; when some pairs go to the fallback, all
    of them are checked here first, so that nothing is written before a refusal."""
    ka, kb, ra, rb = [], [], [], []
    for x, y in zip(a, b):
        if supported(x, y):
            ka.append(x)
            kb.append(y)
        else:
            ra.append(x)
            rb.append(y)
    if ra:
        tensors.check_no_overlap(kind, a, b)
    return ka, kb, ra, rb


class _Prepared:
    """Pairs checked for overlaps once (for EMA's cached plan, which re-checks every
    address and layout before each reuse)."""

    def __init__(self, shadows: Sequence[torch.Tensor], params: Sequence[torch.Tensor]) -> None:
        tensors.check_no_overlap("update", shadows, params)
        self.shadows, self.params = list(shadows), list(params)

    def update_(self, weight, skip_nonfinite: bool = False,
                stochastic: Optional[rounding.Stochastic] = None) -> None:
        update_unchecked(self.shadows, self.params, weight, skip_nonfinite, stochastic)

    def copy_(self, scale: float) -> None:
        copy_unchecked(self.shadows, self.params, scale)


def multi_update_(shadows: Sequence[Sequence[torch.Tensor]], params: Sequence[torch.Tensor],
                  weights: Sequence[float], stochastic: Optional[rounding.MultiStochastic] = None) -> None:
    """For each profile k, :func:`update_` of ``shadows[k]`` with ``weights[k]`` (and
    ``stochastic.profile(k)``): the same bits by construction (each profile reads the
    params again; the kernel backends read them once).  Shadows that share memory with
    any shadow or param are refused first."""
    multi.check_no_overlap([list(p) for p in shadows], params)
    for k, (profile, weight) in enumerate(zip(shadows, weights)):
        update_unchecked(profile, params, weight,
                         stochastic=None if stochastic is None else stochastic.profile(k))


def _reasons(device) -> list[str]:
    return []


register_backend(Backend(
    "foreach", "pure PyTorch (torch._foreach_lerp_), runs on every device",
    update_, copy_, _reasons, swap_=swap_, prepare=_Prepared, weighted_sum_=weighted_sum_,
    multi_update_=multi_update_))
