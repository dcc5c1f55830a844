"""The weighted-sum kernel, ``out[i] += w * inputs[i]``, and its launcher: every pair of a
device in one launch, through the same tables as the update (:mod:`launch`).

``out`` is float32 (the launcher's :func:`supported` says so; the backend sends float64
outs to the foreach fallback); inputs are float32, bfloat16 or float16, loaded as fp32.
The math is one fp32 multiply-add, rounded once when stored.  Any finite weight, negative
ones included (post-hoc EMA's least-squares solution has them).  The kernel gets the
weight as fp32: one that rounds to 0 there (|w| <= 2^-150) is weight 0, which launches
nothing, so an Inf input adds no NaN (the CUDA kernel returns early too).

Bytes per element: fp32 out read + written, plus the input: 4 + 4 + 2 = 10 for bf16
inputs, 12 for fp32.  The tile decoding (heads, the three paths) is written out here as
in the update kernel (Triton drops ``tl.multiple_of`` facts returned from a helper).
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from .ema_kernels import ROW, _load
from .launch import CODES, plan_for, run

#: The largest magnitude that rounds to 0 in fp32 (half the smallest subnormal, 2^-149; the
#: tie rounds to even, 0): such a weight reaches the kernel as 0.
FP32_ZERO = 2.0 ** -150


@triton.jit
def _sum_tile(f32, bf16, f16, a4, b4, b8, b_code, lanes, mask, weight,
              A_MASKED: tl.constexpr, B_MASKED: tl.constexpr):
    """One tile of ``a += weight * b`` (``a`` float32 at ``a4``)."""
    pa = f32 + a4 + lanes
    b = _load(f32, bf16, f16, b4, b8, b_code, lanes, mask, B_MASKED)
    if A_MASKED:
        tl.store(pa, tl.load(pa, mask=mask, other=0.0) + weight * b, mask=mask)
    else:
        tl.store(pa, tl.load(pa) + weight * b)


@triton.jit
def weighted_sum_kernel(tensors, tiles, f32, bf16, f16, weight, BLOCK: tl.constexpr):
    """a[i] += w * b[i]; a: float32 out (code 0), b: the input of any kernel dtype.
    Tiles, heads and paths as the update's (:mod:`.ema_kernels`)."""
    pid = tl.program_id(0).to(tl.int64)
    t = tl.load(tiles + 2 * pid)
    start = tl.load(tiles + 2 * pid + 1)
    a_at = tl.load(tensors + ROW * t) + start
    b_at = tl.load(tensors + ROW * t + 1) + start
    n = tl.load(tensors + ROW * t + 2)
    b_code = tl.load(tensors + ROW * t + 4)
    layout = tl.load(tensors + ROW * t + 5)
    end = tl.where(start < (layout >> 1), layout >> 1, n)
    lanes = tl.arange(0, BLOCK)
    mask = start + lanes < end
    full = start + BLOCK <= end
    if full:
        a4 = tl.multiple_of(a_at, 4)
        if (layout & 1) != 0:
            _sum_tile(f32, bf16, f16, a4, tl.multiple_of(b_at, 4), tl.multiple_of(b_at, 8),
                      b_code, lanes, mask, weight, False, False)
        else:
            _sum_tile(f32, bf16, f16, a4, b_at, b_at, b_code, lanes, mask, weight, False, True)
    else:
        _sum_tile(f32, bf16, f16, a_at, b_at, b_at, b_code, lanes, mask, weight, True, True)


def supported(out: torch.Tensor, x: torch.Tensor) -> bool:
    """Whether the kernel takes this pair: a float32 out and a kernel-dtype input, both
    contiguous at addresses that are multiples of their element sizes."""
    return (out.dtype == torch.float32 and x.dtype in CODES and out.is_contiguous()
            and x.is_contiguous() and out.data_ptr() % 4 == 0
            and x.data_ptr() % x.element_size() == 0)


def weighted_sum(pairs, weight: float) -> None:
    """``out += weight * x`` for every (out, x) pair the kernel supports, one launch.
    The pairs are checked for overlaps (when their table is built) even for weight 0
    (or one that is 0 in fp32), which then launches nothing."""
    pairs = [(a, b) for a, b in pairs if a.numel()]
    if not pairs:
        return
    plan = plan_for(pairs, pairs[0][0].device, "weighted_sum")
    if abs(weight) > FP32_ZERO:
        run(weighted_sum_kernel, plan, *plan.views, float(weight))
