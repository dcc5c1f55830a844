"""Weighted averaging of k checkpoints (SWA as practitioners run it on the last k saves).

``average_checkpoints`` reads every source's names and shapes first (cheap: paths are
memory-mapped), refuses a mismatch listing every name, then adds one source at a time
into float32 (or float64) accumulators through :func:`ema_fused.ema_weighted_sum_`, so
peak memory is the output plus one source, and bf16 checkpoints are summed in fp32.
"""
from __future__ import annotations

import math
import numbers
import time
import warnings
from typing import Callable, Mapping, Optional, Sequence

import torch

from ..checks import FLOAT_DTYPES
from ..ops import SUM_OUT_DTYPES, ema_weighted_sum_
from . import sources as _sources
from .sources import OP, Entry, Key, Source, describe, listed

#: on_source(index, source, tensors added, bytes read, seconds) after each source
Progress = Callable[[int, Source, int, int, float], None]


def normalised_weights(weights: Optional[Sequence[float]], k: int) -> list[float]:
    """``weights / sum(weights)`` (1/k each by default), as ``numpy.average`` does."""
    if weights is None:
        return [1.0 / k] * k
    if isinstance(weights, (str, bytes)) or not hasattr(weights, "__len__"):
        raise TypeError(f"{OP}: weights must be a sequence of numbers, one per source")
    if len(weights) != k:
        raise ValueError(f"{OP}: {len(weights)} weights for {k} sources")
    values = []
    for i, w in enumerate(weights):
        if isinstance(w, torch.Tensor) and w.numel() == 1:
            w = w.item()
        if isinstance(w, bool) or not isinstance(w, numbers.Real) or not math.isfinite(w):
            raise ValueError(f"{OP}: weights[{i}] must be a finite real number, got {w!r}")
        values.append(float(w))
    total = math.fsum(values)
    # zero, or zero up to the rounding of the sum: the quotients would be noise
    if abs(total) <= 4 * k * torch.finfo(torch.float64).eps * math.fsum(map(abs, values)):
        raise ValueError(f"{OP}: the weights {values} sum to zero; they cannot be normalised")
    return [w / total for w in values]


def _plan(layouts: list[dict[str, Entry]], sources: list, strict: bool) -> dict[str, Entry]:
    """Output name -> the first source's entry, after every cross-source check."""
    first = layouts[0]
    if strict:
        problems = []
        for j, lay in enumerate(layouts[1:], 1):
            missing = [n for n in first if n not in lay]
            unexpected = [e.key for n, e in lay.items() if n not in first]
            if missing or unexpected:
                parts = ([f"missing {listed(missing)}"] if missing else []) + \
                    ([f"unexpected {listed(unexpected)}"] if unexpected else [])
                problems.append(f"  {describe(j, sources[j])}: {'; '.join(parts)}")
        if problems:
            raise KeyError(f"{OP}: the sources do not hold the same tensors as "
                           f"{describe(0, sources[0])} (strict=True; names compared without "
                           "module./_orig_mod. prefixes):\n" + "\n".join(problems))
    names = [n for n in first if all(n in lay for lay in layouts)]
    kept = set(names)
    left_out = list(dict.fromkeys(n for lay in layouts for n in lay if n not in kept))
    if left_out:
        warnings.warn(f"{OP}: strict=False: {len(left_out)} tensors not in every source are "
                      f"left out: {listed(left_out, 20)}", stacklevel=3)
    problems = []
    for n in names:
        e0 = first[n]
        for j, lay in enumerate(layouts[1:], 1):
            e = lay[n]
            if e.shape != e0.shape:
                problems.append(f"  {n!r}: shape {e0.shape} in {describe(0, sources[0])} but "
                                f"{e.shape} in {describe(j, sources[j])}")
            elif e.kind != e0.kind:
                problems.append(f"  {n!r}: {e0.dtype} in {describe(0, sources[0])} but "
                                f"{e.dtype} in {describe(j, sources[j])} (floating point "
                                "tensors are averaged, integer ones are not)")
    if problems:
        raise ValueError(f"{OP}: tensors that do not match across sources:\n" +
                         "\n".join(problems))
    return {n: first[n] for n in names}


def _add_source(j: int, source: Source, key: Key, map_location, coeff: float,
                keys: dict[str, Entry], plan: dict[str, Entry], out: dict[str, torch.Tensor],
                dtype: torch.dtype, last: bool) -> int:
    """Add source ``j`` times ``coeff`` into ``out`` (made at ``j == 0``); returns the
    bytes read.  Its tensors die on return, and with them a path's mapped pages."""
    sd = _sources.state_dict(j, source, key, map_location)
    if not isinstance(source, Mapping) and _sources.layout(j, source, sd) != keys:
        raise RuntimeError(f"{OP}: {describe(j, source)} changed on disk while averaging")
    outs, inputs, read = [], [], 0
    for name, entry in plan.items():
        t = sd[keys[name].key]
        read += t.numel() * t.element_size()
        if entry.kind == "integer":
            if last:  # a copy: the output must not hold the source's pages
                out[name] = t.detach().clone()
            continue
        if j == 0:
            out[name] = torch.zeros(entry.shape, dtype=dtype, device=t.device)
        acc = out[name]
        if t.dtype not in FLOAT_DTYPES or t.device != acc.device:
            t = t.detach().to(device=acc.device, dtype=dtype)  # e.g. float8: exact in fp32
        outs.append(acc)
        inputs.append(t)
    ema_weighted_sum_(outs, inputs, coeff)
    return read


def average_with_progress(sources, weights=None, *, key: Key = None, strict: bool = True,
                          dtype: torch.dtype = torch.float32, map_location="cpu",
                          on_source: Optional[Progress] = None) -> dict[str, torch.Tensor]:
    """:func:`average_checkpoints` with a progress hook (the command line's)."""
    sources = _sources.check_sources(sources)
    coeffs = normalised_weights(weights, len(sources))
    _sources.check_key(key)
    if dtype not in SUM_OUT_DTYPES:
        raise TypeError(f"{OP}: dtype must be torch.float32 or torch.float64 (the dtype the "
                        f"sums are made and returned in), got {dtype}")
    if not isinstance(strict, bool):
        raise TypeError(f"{OP}: strict must be a bool, got {type(strict).__name__}")
    layouts = [_sources.first_pass(i, s, key) for i, s in enumerate(sources)]
    plan = _plan(layouts, sources, strict)
    out: dict[str, torch.Tensor] = {}
    for j, (source, coeff) in enumerate(zip(sources, coeffs)):
        start = time.perf_counter()
        read = _add_source(j, source, key, map_location, coeff, layouts[j], plan, out, dtype,
                           last=j == len(sources) - 1)
        if on_source is not None:
            on_source(j, source, len(plan), read, time.perf_counter() - start)
    return {name: out[name] for name in plan}


def average_checkpoints(sources: Sequence[Source], weights: Optional[Sequence[float]] = None,
                        *, key: Key = None, strict: bool = True,
                        dtype: torch.dtype = torch.float32,
                        map_location="cpu") -> dict[str, torch.Tensor]:
    """The weighted average of k checkpoints' tensors, as a new state dict.

    Args:
        sources: paths (loaded one at a time with ``torch.load(mmap=True,
            weights_only=True, map_location=map_location)``) or state dicts, in any mix.
        weights: one finite number per source, normalised by their sum as
            ``numpy.average`` does (``[1, 1, 2]`` gives 1/4, 1/4, 1/2); negative ones are
            allowed (extrapolation), a sum of zero is refused.  Default: uniform.
        key: where the state dict lies in each checkpoint: None (the checkpoint is the
            state dict), a key such as ``"model"`` or ``"state_dict"``, a dotted path for
            nested dicts (``"ema.shadows"``; a key that holds the dot itself is tried
            first), or a callable ``checkpoint -> state dict``.
        strict: names are compared without the ``module.`` (DDP/DataParallel) and
            ``_orig_mod.`` (torch.compile) segments wrappers insert.  True: every source
            must hold the same names; otherwise one error lists every missing and
            unexpected name of every source, before anything is averaged.  False: the
            names every source holds are averaged, the rest left out with a warning.
        dtype: torch.float32 or torch.float64: floating-point tensors are summed and
            returned in it, whatever their dtype in the sources (bf16 checkpoints are
            summed in fp32, each rounded once per addition).
        map_location: passed to ``torch.load`` for path sources.

    Returns:
        A dict, in the first source's order, named by the first source's names with the
        wrapper prefixes removed.  Floating-point tensors: the weighted average, in
        ``dtype``, on the device of the first source's tensor.  Integer and bool tensors
        (BatchNorm's ``num_batches_tracked``): a copy of the last source's, never averaged.

    Shapes must agree across sources, and a tensor floating in one source must be
    floating in all; the error names the tensor and both sources.  Memory: the output
    plus one source (a path's mapped pages are released before the next is read).
    """
    return average_with_progress(sources, weights, key=key, strict=strict, dtype=dtype,
                    map_location=map_location)
