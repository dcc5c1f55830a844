"""Functional multi-tensor ops, registered with ``torch.library``.

The ops take plain lists of tensors and a Python scalar, so they are useful on
their own (e.g. for optimizer moment buffers).  Every check runs before anything
is written; then each device's tensors go to the backend chosen for that device.

``torch.compile`` sees the registered custom ops (``torch.ops.ema_fused.update_``,
``torch.ops.ema_fused.copy_``).  Eager calls skip the custom-op dispatcher and run
the same implementation directly: its per-tensor bookkeeping cost about 300 us
per call for 500 tensors on the project's CPU machine (532 us vs 233 us for the
raw ``_foreach_lerp_``), which is more than the update itself for small tensors.
"""
from __future__ import annotations

import math
import numbers
from typing import Optional, Sequence, Union

import torch

from .backends import foreach as _fallback
from .backends import selection as _backend
from .checks import multi as _multi_checks
from .checks import rounding as _rounding
from .checks import tensors as _validate

Tensors = Sequence[torch.Tensor]


def group_by_device(a: Tensors, b: Tensors) -> dict[torch.device, tuple[list, list]]:
    groups: dict[torch.device, tuple[list, list]] = {}
    for x, y in zip(a, b):
        ga, gb = groups.setdefault(x.device, ([], []))
        ga.append(x)
        gb.append(y)
    return groups


def indices_by_device(a: Tensors) -> dict[torch.device, list[int]]:
    """The indices of ``a``'s tensors on each device, in order."""
    groups: dict[torch.device, list[int]] = {}
    for i, x in enumerate(a):
        groups.setdefault(x.device, []).append(i)
    return groups


def dispatch(kind: str, a: Tensors, b: Tensors, scalar: float, backend: str,
             skip_nonfinite: bool = False,
             stochastic: Optional[_rounding.Stochastic] = None) -> None:
    """Pick a backend per device (all before writing), then run ``kind`` on each group.

    No input checks beyond the backends' own (each refuses pairs that share memory
    before writing): for callers that already hold checked inputs (``EMA`` makes its
    shadows itself and checks each model tensor's shape and dtype as it reads it).  With
    several devices the overlap check runs here first for all of them, so that a
    refusal on the second device cannot follow writes on the first.  ``stochastic``: an
    update's counter words, one position and start per pair of ``a`` (each device's
    backend gets those of its pairs).
    """
    groups = indices_by_device(a)
    chosen = [(_backend.select(backend, dev), idx) for dev, idx in groups.items()]
    if len(chosen) > 1:
        for _, idx in chosen:
            _validate.check_no_overlap(kind, [a[i] for i in idx], [b[i] for i in idx])
    with torch.no_grad():  # params that require grad must not make the shadows part of a graph
        for impl, idx in chosen:
            ga, gb = [a[i] for i in idx], [b[i] for i in idx]
            if kind == "swap":
                (impl.swap_ or _fallback.swap_)(ga, gb)
            elif kind == "update" and stochastic is not None:
                impl.update_(ga, gb, scalar, skip_nonfinite, stochastic=stochastic.pick(idx))
            elif kind == "update":
                impl.update_(ga, gb, scalar, skip_nonfinite)
            else:
                impl.copy_(ga, gb, scalar)


def _check_update(shadows: Tensors, params: Tensors, weight):
    if isinstance(weight, torch.Tensor):
        _validate.check_weight_tensor("ema_update_", weight, shadows)
    else:
        weight = _validate.check_scalar("ema_update_", "weight", weight)
    _validate.check_pairs("ema_update_", "shadows", shadows, "params", params)
    _validate.check_writable("ema_update_", "shadows", shadows)
    return weight


def _check_copy(dst: Tensors, src: Tensors, scale: float) -> float:
    scale = _validate.check_scalar("ema_copy_", "scale", scale, 0.0, float("inf"))
    _validate.check_pairs("ema_copy_", "dst", dst, "src", src)
    _validate.check_writable("ema_copy_", "dst", dst)
    return scale


def _check_swap(a: Tensors, b: Tensors, _unused: float = 0.0) -> float:
    _validate.check_pairs("ema_swap_", "a", a, "b", b)
    for i, (x, y) in enumerate(zip(a, b)):
        if x.dtype != y.dtype:
            raise TypeError(f"ema_swap_: a[{i}] is {x.dtype} but b[{i}] is {y.dtype}; "
                            "swapping needs equal dtypes")
    _validate.check_writable("ema_swap_", "a", a)
    _validate.check_writable("ema_swap_", "b", b)
    return 0.0


@torch.library.custom_op("ema_fused::update_", mutates_args={"shadows"})
def _update_op(shadows: list[torch.Tensor], params: list[torch.Tensor], weight: float,
               backend: str, skip_nonfinite: bool = False) -> None:
    weight = _check_update(shadows, params, weight)
    dispatch("update", shadows, params, weight, backend, skip_nonfinite)


@_update_op.register_fake
def _update_fake(shadows, params, weight, backend, skip_nonfinite=False) -> None:
    _check_update(shadows, params, weight)


@torch.library.custom_op("ema_fused::update_graph_safe_", mutates_args={"shadows"})
def _update_graph_safe_op(shadows: list[torch.Tensor], params: list[torch.Tensor],
                          weight: torch.Tensor, backend: str,
                          skip_nonfinite: bool = False) -> None:
    _check_update(shadows, params, weight)
    dispatch("update", shadows, params, weight, backend, skip_nonfinite)


@_update_graph_safe_op.register_fake
def _update_graph_safe_fake(shadows, params, weight, backend, skip_nonfinite=False) -> None:
    _check_update(shadows, params, weight)


@torch.library.custom_op("ema_fused::update_stochastic_", mutates_args={"shadows"})
def _update_stochastic_op(shadows: list[torch.Tensor], params: list[torch.Tensor], weight: float,
                          backend: str, skip_nonfinite: bool, seed: int, offset: int) -> None:
    weight = _check_update(shadows, params, weight)
    spec = _rounding.spec("ema_update_", len(shadows), "stochastic", seed % _rounding.U64,
                          offset % _rounding.U64)
    dispatch("update", shadows, params, weight, backend, skip_nonfinite, spec)


@_update_stochastic_op.register_fake
def _update_stochastic_fake(shadows, params, weight, backend, skip_nonfinite, seed,
                            offset) -> None:
    _check_update(shadows, params, weight)


@torch.library.custom_op("ema_fused::copy_", mutates_args={"dst"})
def _copy_op(dst: list[torch.Tensor], src: list[torch.Tensor], scale: float, backend: str) -> None:
    scale = _check_copy(dst, src, scale)
    dispatch("copy", dst, src, scale, backend)


@_copy_op.register_fake
def _copy_fake(dst, src, scale, backend) -> None:
    _check_copy(dst, src, scale)


@torch.library.custom_op("ema_fused::swap_", mutates_args={"a", "b"})
def _swap_op(a: list[torch.Tensor], b: list[torch.Tensor], unused: float, backend: str) -> None:
    _check_swap(a, b)
    dispatch("swap", a, b, 0.0, backend)


@_swap_op.register_fake
def _swap_fake(a, b, unused, backend) -> None:
    _check_swap(a, b)


_CHECKS = {"update": _check_update, "copy": _check_copy, "swap": _check_swap}


def _run(kind: str, a: Tensors, b: Tensors, scalar: float, backend: str,
         skip_nonfinite: bool = False) -> None:
    """Eager: check, then dispatch.  Under torch.compile: go through the registered op."""
    a, b = list(a), list(b)
    if torch.compiler.is_compiling():
        graph_safe = isinstance(scalar, torch.Tensor)
        op = getattr(torch.ops.ema_fused, kind + ("_graph_safe_" if graph_safe else "_"))
        if kind == "update":
            op(a, b, scalar, backend, skip_nonfinite)
        else:
            op(a, b, scalar, backend)
        return
    scalar = _CHECKS[kind](a, b, scalar)
    dispatch(kind, a, b, scalar, backend, skip_nonfinite)


def ema_update_(shadows: Tensors, params: Tensors, weight: float, *,
                skip_nonfinite: bool = False, rounding: str = "nearest",
                seed: Optional[int] = None, offset: Optional[int] = None,
                backend: str = "auto") -> None:
    """In place, for every i: ``shadows[i] += weight * (params[i] - shadows[i])``.

    With ``weight = 1 - decay`` this is one EMA step.  Shadows and params may be
    float32/bfloat16/float16/float64 in any pairing; the math runs in at least fp32
    and rounds once into the shadow's dtype.  Pairs must match in shape and device, and
    must not share memory with each other (a shadow given twice, overlapping views, a
    shadow another pair reads as its param): every pair is updated at once.  Raises
    (naming the tensor index) before writing anything if an input is bad.

    Args:
        shadows: tensors updated in place.
        params: tensors read, one per shadow.
        weight: a Python number in [0, 1]; 0 leaves the shadows untouched (not even
            read, so an Inf param cannot make a NaN shadow), 1 copies the params exactly.
            Or a 1-element float32 tensor on the shadows' device, read on the device
            (graph-safe: a captured CUDA graph replays with its value at replay time;
            its value is not checked, as that would sync with the host).
        skip_nonfinite: leave a shadow element as it is where its param element is NaN
            or +-Inf (decided inside the kernels, per element: no extra pass, no host
            sync; the foreach fallback pays one temporary piece).
        rounding: ``"nearest"`` (even), or ``"stochastic"``: a bfloat16/float16 shadow
            gets the fp32 result rounded up or down at random, up with the probability
            of the remainder's share of one ulp, so that it is an unbiased estimate of
            the fp32 result (README, "16-bit shadows with stochastic rounding").  Wider
            shadows need no rounding and are updated as with ``"nearest"``.
        seed, offset: with ``rounding="stochastic"`` (both required): integers in
            [0, 2**64).  The random bits of element e of ``shadows[i]`` are a function of
            (seed, offset, i, e) alone, the same on every backend; give each call its own
            offset (e.g. the step), or it repeats the previous call's bits.
        backend: ``"auto"`` or one of ``"cuda"``, ``"triton"``, ``"cpu"``, ``"foreach"``.
    """
    if not isinstance(skip_nonfinite, bool):
        raise TypeError(f"ema_update_: skip_nonfinite must be a bool, got {skip_nonfinite!r}")
    spec = _rounding.spec("ema_update_", len(shadows), rounding, seed, offset)
    if spec is None:
        _run("update", shadows, params, weight, backend, skip_nonfinite)
        return
    if isinstance(weight, torch.Tensor):
        raise TypeError("ema_update_: rounding='stochastic' takes a Python number weight; the "
                        "graph-safe tensor weight is not supported with it")
    shadows, params = list(shadows), list(params)
    if torch.compiler.is_compiling():
        torch.ops.ema_fused.update_stochastic_(shadows, params, weight, backend, skip_nonfinite,
                                               *spec.signed())
        return
    weight = _check_update(shadows, params, weight)
    dispatch("update", shadows, params, weight, backend, skip_nonfinite, spec)


def ema_copy_(dst: Tensors, src: Tensors, scale: float = 1.0, *, backend: str = "auto") -> None:
    """In place, for every i: ``dst[i] = src[i] * scale`` rounded once into ``dst[i].dtype``.

    Used to write (bias-corrected) shadows into a model.  Same checks as
    :func:`ema_update_`; ``scale`` must be a finite number >= 0.
    """
    _run("copy", dst, src, scale, backend)


def ema_swap_(a: Tensors, b: Tensors, *, backend: str = "auto") -> None:
    """In place, for every i: exchange the contents of ``a[i]`` and ``b[i]``.

    Pairs must match in shape, dtype and device.  Used by ``EMA.average_parameters``
    to put the averages into the model without a backup copy of it.
    """
    _run("swap", a, b, 0.0, backend)


# --- The weighted sum: out[i] += weight * inputs[i] (checkpoint averaging, post-hoc EMA) ---

#: dtypes a weighted sum accumulates into (float64 runs on the foreach path)
SUM_OUT_DTYPES = (torch.float32, torch.float64)
_FP32_MAX = torch.finfo(torch.float32).max


def _check_weighted_sum(out: Tensors, inputs: Tensors, weight) -> float:
    op = "ema_weighted_sum_"
    if isinstance(weight, torch.Tensor):
        raise TypeError(f"{op}: weight must be a Python number, got a tensor")
    if isinstance(weight, bool) or not isinstance(weight, numbers.Real):
        raise TypeError(f"{op}: weight must be a real number, got {type(weight).__name__}")
    weight = float(weight)
    if not math.isfinite(weight):
        raise ValueError(f"{op}: weight must be finite, got {weight}")
    _validate.check_pairs(op, "out", out, "inputs", inputs)
    for i, o in enumerate(out):
        if o.dtype not in SUM_OUT_DTYPES:
            raise TypeError(f"{op}: out[{i}] has dtype {o.dtype}; a weighted sum accumulates "
                            "into float32 or float64 (sum into float32, then cast the result)")
        if o.dtype == torch.float32 and abs(weight) > _FP32_MAX:
            raise ValueError(f"{op}: weight {weight} overflows float32, the math dtype of "
                             f"out[{i}]")
    _validate.check_writable(op, "out", out)
    return weight


def _dispatch_weighted_sum(out: Tensors, inputs: Tensors, weight: float, backend: str) -> None:
    """As :func:`dispatch`: a backend per device, all chosen (and, with several devices,
    all pairs checked for overlaps) before anything is written."""
    groups = group_by_device(out, inputs)
    chosen = [(_backend.select(backend, dev), go, gi) for dev, (go, gi) in groups.items()]
    if len(chosen) > 1:
        for _, go, gi in chosen:
            _validate.check_no_overlap("weighted_sum", go, gi)
    with torch.no_grad():
        for impl, go, gi in chosen:
            (impl.weighted_sum_ or _fallback.weighted_sum_)(go, gi, weight)


@torch.library.custom_op("ema_fused::weighted_sum_", mutates_args={"out"})
def _weighted_sum_op(out: list[torch.Tensor], inputs: list[torch.Tensor], weight: float,
                     backend: str) -> None:
    weight = _check_weighted_sum(out, inputs, weight)
    _dispatch_weighted_sum(out, inputs, weight, backend)


@_weighted_sum_op.register_fake
def _weighted_sum_fake(out, inputs, weight, backend) -> None:
    _check_weighted_sum(out, inputs, weight)


def ema_weighted_sum_(out: Tensors, inputs: Tensors, weight: float, *,
                      backend: str = "auto") -> None:
    """In place, for every i: ``out[i] += weight * inputs[i]``.

    The building block of checkpoint averaging and post-hoc EMA: call it once per set
    of inputs with that set's weight.  One launch per device on the kernel backends.

    Args:
        out: float32 (or float64) tensors, read and written.  Other dtypes are refused:
            sum into float32 and cast the result once at the end.
        inputs: float32/bfloat16/float16/float64 tensors, one per out, same shape and
            device.  The math runs in the wider of the two dtypes, at least fp32 (fp32
            for a bf16/fp16 input), and is rounded once into ``out[i]``.  A float64
            input into a float32 out is accepted, as by ``ema_update_``: it is added in
            float64 and rounded once (through the foreach path).  Non-contiguous or
            float64 pairs go to the foreach path in the same call.
        weight: any finite real number, negative ones included (it must fit in float32
            for a float32 out).  0 leaves ``out`` untouched, not even read, so an Inf
            input cannot make a NaN.
        backend: ``"auto"`` or one of ``"cuda"``, ``"triton"``, ``"cpu"``, ``"foreach"``.

    Pairs must not share memory with other pairs (the very same tensor as both out and
    input of one pair is fine: it is scaled by ``1 + weight``).  Every check runs, and
    raises naming the index, before anything is written.
    """
    out, inputs = list(out), list(inputs)
    if torch.compiler.is_compiling():
        torch.ops.ema_fused.weighted_sum_(out, inputs, weight, backend)
        return
    weight = _check_weighted_sum(out, inputs, weight)
    _dispatch_weighted_sum(out, inputs, weight, backend)


# ------------------------------------------------------------ multi-shadow update
# K profiles' shadows of the same params in one pass (PostHocEMA's profiles).  The
# registered op takes the shadows flat, profile-major (a schema has no list of lists).

def _dispatch_multi(shadows: list[list[torch.Tensor]], params: list[torch.Tensor],
                    weights: list[float], backend: str,
                    stochastic: Optional[_rounding.MultiStochastic] = None) -> None:
    """Pick a backend per device (all before writing), then update each device's share
    of every profile with it.  Overlaps are refused by each backend before it writes
    (and here for every device first when there are several)."""
    chosen = [(_backend.select(backend, dev), idx) for dev, idx in indices_by_device(params).items()]
    if len(chosen) > 1:
        _multi_checks.check_no_overlap(shadows, params)
    with torch.no_grad():
        for impl, idx in chosen:
            fn = impl.multi_update_ or _fallback.multi_update_
            args = ([[profile[i] for i in idx] for profile in shadows], [params[i] for i in idx],
                    weights)
            if stochastic is None:
                fn(*args)
            else:
                fn(*args, stochastic=stochastic.pick(idx))


@torch.library.custom_op("ema_fused::multi_update_", mutates_args={"shadows"})
def _multi_update_op(shadows: list[torch.Tensor], params: list[torch.Tensor],
                     weights: list[float], backend: str) -> None:
    profiles = _multi_checks.unflatten(shadows, len(params), len(weights))
    weights = _multi_checks.check(profiles, params, weights)
    _dispatch_multi(profiles, list(params), weights, backend)


@_multi_update_op.register_fake
def _multi_update_fake(shadows, params, weights, backend) -> None:
    _multi_checks.check(_multi_checks.unflatten(shadows, len(params), len(weights)), params,
                        weights)


@torch.library.custom_op("ema_fused::multi_update_stochastic_", mutates_args={"shadows"})
def _multi_update_stochastic_op(shadows: list[torch.Tensor], params: list[torch.Tensor],
                                weights: list[float], backend: str, seeds: list[int],
                                offset: int) -> None:
    profiles = _multi_checks.unflatten(shadows, len(params), len(weights))
    weights = _multi_checks.check(profiles, params, weights)
    spec = _rounding.multi_spec("ema_multi_update_", len(params), len(weights), "stochastic",
                                [s % _rounding.U64 for s in seeds], offset % _rounding.U64)
    _dispatch_multi(profiles, list(params), weights, backend, spec)


@_multi_update_stochastic_op.register_fake
def _multi_update_stochastic_fake(shadows, params, weights, backend, seeds, offset) -> None:
    _multi_checks.check(_multi_checks.unflatten(shadows, len(params), len(weights)), params,
                        weights)


def ema_multi_update_(shadows: Sequence[Tensors], params: Tensors, weights: Sequence[float], *,
                      rounding: str = "nearest",
                      seed: Optional[Union[int, Sequence[int]]] = None,
                      offset: Optional[int] = None, backend: str = "auto") -> None:
    """In place, for every profile k and every i:
    ``shadows[k][i] += weights[k] * (params[i] - shadows[k][i])``, reading each param once.

    The result is bit for bit that of ``for k in range(K): ema_update_(shadows[k], params,
    weights[k], backend=backend)`` on the same backend, for every dtype pair (shadows and
    params float32/bfloat16/float16/float64 in any pairing).  Raises before anything is
    written, naming ``weights[k]``, ``shadows[k][i]`` or ``params[i]``, when an input is bad.

    Args:
        shadows: K sequences of tensors; ``shadows[k][i]`` is profile k's shadow of
            ``params[i]`` (same shape and device).  A shadow may share memory with no
            other shadow (of any profile) and with no param, not even its own.
        params: tensors read, once each.
        weights: K Python numbers in [0, 1]; 0 leaves profile k untouched (not read), 1
            copies the params into it exactly.
        rounding, seed, offset: as in :func:`ema_update_`; profile k gets the bits of
            ``ema_update_(shadows[k], params, weights[k], rounding="stochastic",
            seed=seeds[k], offset=offset)``, where ``seed`` is the K ``seeds``, or one
            integer s and then ``seeds[k] = s + k`` (mod 2**64).
        backend: ``"auto"`` or one of ``"cuda"``, ``"triton"``, ``"cpu"``, ``"foreach"``;
            pairs a kernel does not take (float64, non-contiguous) go to ``foreach``
            exactly as in :func:`ema_update_`.
    """
    profiles = _multi_checks.as_profiles(shadows)
    params = list(params)
    spec = _rounding.multi_spec("ema_multi_update_", len(params), len(profiles), rounding,
                                seed, offset)
    if torch.compiler.is_compiling():
        flat = [s for p in profiles for s in p]
        if spec is None:
            torch.ops.ema_fused.multi_update_(flat, params, [float(w) for w in weights], backend)
        else:
            torch.ops.ema_fused.multi_update_stochastic_(
                flat, params, [float(w) for w in weights], backend,
                [_rounding.to_int64(s) for s in spec.seeds], _rounding.to_int64(spec.offset))
        return
    weights = _multi_checks.check(profiles, params, weights)
    _dispatch_multi(profiles, params, weights, backend, spec)
