"""Weighted averaging of k checkpoints (SWA as practitioners run it on the last k saves).

``average_checkpoints`` opens every source (names, shapes and dtypes: nothing is read
yet), refuses a mismatch listing every name (:mod:`.plan`), then streams the sum tensor
by tensor (:mod:`.engine`) into float32 (or float64) accumulators through
:func:`ema_fused.ema_weighted_sum_`, so bf16 checkpoints are summed in fp32.  Without
``out=`` the dict is returned; with it each tensor is written as it is made.
"""
from __future__ import annotations

from typing import Mapping, Optional, Sequence

import torch

from ..ops import SUM_OUT_DTYPES
from . import engine as _engine
from . import sources as _sources
from . import writers as _writers
from .engine import Progress
from .plan import check_like, check_plan, normalised_weights
from .readers import Reader
from .sources import OP, Key, Source

Out = Optional[Mapping[str, torch.Tensor]]


def average_with_progress(sources, weights=None, *, key: Key = None, strict: bool = True,
                          dtype: torch.dtype = torch.float32, map_location="cpu", out=None,
                          like: Out = None, on_tensor: Optional[Progress] = None):
    """:func:`average_checkpoints` with a progress hook (the command line's):
    ``on_tensor(tensors done, tensors in all, bytes read, bytes to read)``."""
    sources = _sources.check_sources(sources)
    coeffs = normalised_weights(weights, len(sources))
    _sources.check_key(key)
    if dtype not in SUM_OUT_DTYPES:
        raise TypeError(f"{OP}: dtype must be torch.float32 or torch.float64 (the dtype the "
                        f"sums are made and returned in), got {dtype}")
    if not isinstance(strict, bool):
        raise TypeError(f"{OP}: strict must be a bool, got {type(strict).__name__}")
    if like is not None and not isinstance(like, Mapping):
        raise TypeError(f"{OP}: like must be a state dict (names to tensors or DTensors), "
                        f"got {type(like).__name__}")
    writer = _writers.check_out(out, like)
    readers: list[Reader] = []
    try:
        for i, source in enumerate(sources):
            readers.append(_engine.open_source(i, source, key, map_location))
        plan = check_plan(readers, strict)
        targets = None if like is None else check_like(like, plan)
    except BaseException:
        for r in readers:
            r.close()
        raise
    return _engine.weighted_sum(readers, coeffs, plan, writer, dtype=dtype, targets=targets,
                                on_tensor=on_tensor)


def average_checkpoints(sources: Sequence[Source], weights: Optional[Sequence[float]] = None,
                        *, key: Key = None, strict: bool = True,
                        dtype: torch.dtype = torch.float32, map_location="cpu", out=None,
                        like: Out = None) -> Optional[dict[str, torch.Tensor]]:
    """The weighted average of k checkpoints' tensors: a new state dict, or written to ``out``.

    Args:
        sources: in any mix: state dicts; ``torch.save`` files (loaded with
            ``torch.load(mmap=True, weights_only=True)``); safetensors files (needs the
            ``safetensors`` package); DCP checkpoint directories (written by
            ``torch.distributed.checkpoint.save`` on any number of ranks, recognised by
            their ``.metadata``).
        weights: one finite number per source, normalised by their sum as
            ``numpy.average`` does (``[1, 1, 2]`` gives 1/4, 1/4, 1/2); negative ones are
            allowed (extrapolation), a sum of zero is refused.  Default: uniform.
        key: where the state dict lies in each checkpoint: None (the checkpoint is the
            state dict), a key such as ``"model"`` or ``"state_dict"``, a dotted path for
            nested dicts (``"ema.shadows"``; a key that holds the dot itself is tried
            first), or a callable ``checkpoint -> state dict``.  In DCP checkpoints and
            safetensors files (flat, dotted names) a string selects the tensors under
            that prefix: ``"model"`` for ``dcp.save({"model": model.state_dict()})``.
        strict: names are compared without the ``module.`` (DDP/DataParallel) and
            ``_orig_mod.`` (torch.compile) segments wrappers insert.  True: every source
            must hold the same names; otherwise one error lists every missing and
            unexpected name of every source, before anything is read or written.
            False: the names every source holds are averaged, the rest left out with a
            warning.
        dtype: torch.float32 or torch.float64: floating-point tensors are summed and
            written in it, whatever their dtype in the sources (bf16 checkpoints are
            summed in fp32, each rounded once per addition).
        map_location: for ``torch.save`` files: a device (``"cpu"``, ``"cuda:0"``): each
            tensor is moved there as it is read; a dict or callable is passed to
            ``torch.load`` as it is.
        out: None (return the dict), a path ending in ``.safetensors`` (one safetensors
            file, written to a temporary name and renamed when complete), or a new or
            empty directory (a DCP checkpoint).  The average is written tensor by tensor.
        like: under ``torchrun``, on every rank: a state dict laid out as the output
            should be (e.g. the sharded model's ``state_dict()``).  Each rank reads only
            its shards of every source and makes only those, with no communication;
            ``out`` must then be a directory (every rank writes its shards through DCP,
            whose save is the only collective), or None (each rank gets DTensors laid
            out like ``like``).  ``like`` must hold exactly the averaged names.

    Returns:
        Without ``out``: a dict, in the first source's order (for a DCP checkpoint, the
        order its metadata lists), named by the first source's names with the wrapper
        prefixes removed.  Floating-point tensors: the weighted
        average, in ``dtype``, on the device of the first source's tensor.  Integer and
        bool tensors (BatchNorm's ``num_batches_tracked``): a copy of the last source's,
        never averaged.  With ``out``: None.

    Shapes must agree across sources, and a tensor floating in one source must be
    floating in all; the error names the tensor and both sources.  Memory: about one
    output tensor plus one source tensor (a DCP chunk, a safetensors tensor, a mapped
    ``torch.save`` tensor whose pages are handed back on Linux once added), plus the
    returned dict when there is no ``out``.
    """
    return average_with_progress(sources, weights, key=key, strict=strict, dtype=dtype,
                                 map_location=map_location, out=out, like=like)
