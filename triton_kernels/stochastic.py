"""Triton: the update of bf16/fp16 shadows rounded stochastically, bit for bit what the C++
kernels compute (``csrc/stochastic.h``): the same Philox4x32-10 draws (``tl.philox``:
Random123's round constants and key schedule, the 64-bit seed split into the key (low,
high)), the same counter per element ((element // 8, position, offset low, offset high)),
16 bits per element, the fp32 update without FMA (launched with ``enable_fp_fusion=False``)
and the same rounding, as integer ops on the fp32 bits.

Tiles and paths are the nearest update's (``ema_kernels.update_kernel``: head tiles,
vector paths, masked tails; the same tables).  A tile whose first element is on the
8-element grid of the draws (every tile of a tensor whose shadow starts 16-byte aligned,
with a start that is a multiple of 8) makes one draw per 8 elements and spreads its words
over them with joins and a reshape; any other tile draws once per element (8 times the
Philox work, for misaligned views only).  The counter words of each tensor sit in a small
table of their own, ``counters`` [n, 2] = (position, start).
"""
import triton
import triton.language as tl

from .ema_kernels import ROW, _finite_or_keep, _load


@triton.jit
def _random16(seed, first, position, off_lo, off_hi, BLOCK: tl.constexpr):
    """The 16 random bits (uint32) of elements ``first .. first + BLOCK - 1`` of the tensor
    at ``position``."""
    # (each branch names its own values: compiled Triton wants a name's type to be the same
    # in both branches, and only `r` is)
    if (first & 7) == 0:  # one draw per 8 elements
        zg = tl.full((BLOCK // 8,), 0, tl.uint32)  # (z + x).to(uint32): x a scalar or constexpr
        groups = ((first >> 3) + tl.arange(0, BLOCK // 8)).to(tl.uint32)
        g0, g1, g2, g3 = tl.philox(seed, groups, (zg + position).to(tl.uint32),
                                   (zg + off_lo).to(tl.uint32), (zg + off_hi).to(tl.uint32))
        words = tl.join(tl.join(g0, g2), tl.join(g1, g3))  # [g, i, j] = word 2i + j
        halves = tl.join(words & 0xFFFF, words >> 16)       # [g, i, j, h]: lane 2(2i + j) + h
        r = tl.reshape(halves, (BLOCK,))
    else:  # one draw per element
        e = first + tl.arange(0, BLOCK)
        ze = tl.full((BLOCK,), 0, tl.uint32)
        e0, e1, e2, e3 = tl.philox(seed, (e >> 3).to(tl.uint32), (ze + position).to(tl.uint32),
                                   (ze + off_lo).to(tl.uint32), (ze + off_hi).to(tl.uint32))
        lane = (e & 7).to(tl.uint32)
        word = tl.where(lane < 4, tl.where(lane < 2, e0, e1), tl.where(lane < 6, e2, e3))
        r = (word >> ((lane & 1) * 16)) & 0xFFFF
    return r


@triton.jit
def _round_bf16(x, r):
    """``stochastic.h``'s round_bf16 of fp32 ``x`` with the 16-bit numbers ``r``."""
    u = x.to(tl.uint32, bitcast=True)
    a = u & 0x7FFFFFFF
    out = (u + tl.where(a > 0x7F7F0000, 0x8000, r)) >> 16  # beyond the largest bf16: nearest
    out = tl.where(a > 0x7F800000, 0x7FC0, out)  # NaN
    return out.to(tl.uint16).to(tl.bfloat16, bitcast=True)


@triton.jit
def _round_f16(x, r):
    """``stochastic.h``'s round_f16 of fp32 ``x`` with the 16-bit numbers ``r``."""
    u = x.to(tl.uint32, bitcast=True)
    a = u & 0x7FFFFFFF
    normal = (a - 0x38000000 + (r >> 3)) >> 13
    e = a >> 23
    m = (a & 0x7FFFFF) | tl.where(e != 0, 0x800000, 0).to(tl.uint32)
    count = 118 - tl.where(e != 0, e, 1).to(tl.uint32)  # wraps above e = 118
    q = tl.where(count < 32, (m << 8) >> (count & 31), 0)
    out = tl.where(a < 0x38800000, (q + r) >> 16, normal)
    out = tl.where(a > 0x477FE000, tl.where(a >= 0x477FF000, 0x7C00, 0x7BFF), out)
    out = tl.where(a > 0x7F800000, 0x7E00, out) | ((u >> 16) & 0x8000)  # NaN, then the sign
    return out.to(tl.uint16).to(tl.float16, bitcast=True)


@triton.jit
def _store_rounded(bf16, f16, off8, code, offs, x, r, mask, MASKED: tl.constexpr):
    """Round ``x`` stochastically into the 16-bit tensor (code 1: bf16, 2: fp16) and store."""
    if code == 1:
        if MASKED:
            tl.store(bf16 + off8 + offs, _round_bf16(x, r), mask=mask)
        else:
            tl.store(bf16 + off8 + offs, _round_bf16(x, r))
    else:
        if MASKED:
            tl.store(f16 + off8 + offs, _round_f16(x, r), mask=mask)
        else:
            tl.store(f16 + off8 + offs, _round_f16(x, r))


@triton.jit
def _lerp_unfused(a, b, w):
    """The two-sided lerp for 0 < w < 1, each product and sum rounded (the launch turns
    FMA fusion off; the interpreter computes them apart anyway)."""
    d = b - a
    return tl.where(w < 0.5, a + w * d, b - (1.0 - w) * d)


@triton.jit
def _stochastic_tile(f32, bf16, f16, a8, b4, b8, a_code, b_code, lanes, mask, w, r,
                     A_MASKED: tl.constexpr, B_MASKED: tl.constexpr,
                     SKIP_NONFINITE: tl.constexpr):
    """One tile, as ``ema_kernels._update_tile`` (``a``: a 16-bit shadow)."""
    a = _load(f32, bf16, f16, a8, a8, a_code, lanes, mask, A_MASKED)
    b = _load(f32, bf16, f16, b4, b8, b_code, lanes, mask, B_MASKED)
    # skip_nonfinite keeps the old shadow, which rounds back to itself whatever r holds
    new = _finite_or_keep(_lerp_unfused(a, b, w), a, b, SKIP_NONFINITE)
    _store_rounded(bf16, f16, a8, a_code, lanes, new, r, mask, A_MASKED)


@triton.jit
def update_stochastic_kernel(tensors, tiles, counters, f32, bf16, f16, weight, seed, off_lo,
                             off_hi, BLOCK: tl.constexpr, SKIP_NONFINITE: tl.constexpr = False):
    """a[i] += w * (b[i] - a[i]) rounded stochastically into a (bf16/fp16); 0 < w < 1 (the
    launcher takes the ends).  Tiles and paths as ``ema_kernels.update_kernel``."""
    pid = tl.program_id(0).to(tl.int64)
    t = tl.load(tiles + 2 * pid)
    start = tl.load(tiles + 2 * pid + 1)
    a_at = tl.load(tensors + ROW * t) + start
    b_at = tl.load(tensors + ROW * t + 1) + start
    n = tl.load(tensors + ROW * t + 2)
    a_code = tl.load(tensors + ROW * t + 3)
    b_code = tl.load(tensors + ROW * t + 4)
    layout = tl.load(tensors + ROW * t + 5)
    r = _random16(seed, tl.load(counters + 2 * t + 1) + start, tl.load(counters + 2 * t),
                  off_lo, off_hi, BLOCK)
    end = tl.where(start < (layout >> 1), layout >> 1, n)  # the head tile ends at the head
    lanes = tl.arange(0, BLOCK)
    mask = start + lanes < end
    full = start + BLOCK <= end
    if full:
        a8 = tl.multiple_of(a_at, 8)
        if (layout & 1) != 0:  # both sides on the vector grid
            _stochastic_tile(f32, bf16, f16, a8, tl.multiple_of(b_at, 4), tl.multiple_of(b_at, 8),
                             a_code, b_code, lanes, mask, weight, r, False, False, SKIP_NONFINITE)
        else:  # b off it: element accesses
            _stochastic_tile(f32, bf16, f16, a8, b_at, b_at, a_code, b_code, lanes, mask, weight,
                             r, False, True, SKIP_NONFINITE)
    else:  # a head or a last partial tile
        _stochastic_tile(f32, bf16, f16, a_at, b_at, b_at, a_code, b_code, lanes, mask, weight,
                         r, True, True, SKIP_NONFINITE)


# ------------------------------------------------------------------ launching
# (imported here, below the kernels: the launcher module imports nothing from this one)
import torch  # noqa: E402

from . import launch  # noqa: E402

_COUNTER_SETS = 4  # counter tables kept per plan (an EMA has one: its positions)


def _counters(plan, positions, starts) -> torch.Tensor:
    """The plan's counter table for these positions and starts ([n, 2] int64 on its
    device), made once; a miss during a CUDA-graph capture is refused (its copy would
    break the capture), and the tables of a plan a graph launched are never dropped."""
    key = (tuple(positions), tuple(starts))
    cache = plan.__dict__.setdefault("counters", {})
    table = cache.get(key)
    if table is None:
        if launch._capturing(plan.device):
            raise RuntimeError("ema_fused (triton): " + launch.CAPTURE_MISS.format(
                n=len(positions)))
        table = torch.tensor(list(zip(positions, starts)), dtype=torch.int64).view(-1, 2)
        table = table.to(plan.device)
        if len(cache) >= _COUNTER_SETS and id(plan) not in launch._graph_tables:
            cache.pop(next(iter(cache)))
        cache[key] = table
        plan.__dict__.setdefault("counter_streams", {})[key] = set()
    if plan.device.type == "cuda":  # the allocator must know every stream that reads it
        stream = torch.cuda.current_stream(plan.device)
        seen = plan.counter_streams[key]
        if stream.cuda_stream not in seen:
            table.record_stream(stream)
            seen.add(stream.cuda_stream)
    return table


def run(plan, weight: float, spec, skip_nonfinite: bool = False) -> None:
    """One launch of the stochastic update over every tile of ``plan`` (16-bit shadows;
    0 < weight < 1); ``spec``: the pairs' counter words (``checks.rounding.Stochastic``)."""
    seed, _ = spec.signed()
    # the weight as the kernel's fp32 (the interpreter keeps a Python float as it is, and
    # 1 - w would then differ from the fp32 1 - w of the GPU and the C++ kernels)
    w32 = torch.tensor(weight, dtype=torch.float32).item()
    launch.run(update_stochastic_kernel, plan, _counters(plan, spec.positions, spec.starts),
               *plan.views, w32, seed, spec.offset & 0xFFFFFFFF, spec.offset >> 32,
               SKIP_NONFINITE=bool(skip_nonfinite), enable_fp_fusion=False)


def update(pairs, weight: float, spec, skip_nonfinite: bool = False) -> None:
    """The stochastic update of ``pairs`` (16-bit shadows the kernels take), one launch;
    empty pairs are left out with their counter words."""
    keep = [i for i, (a, _) in enumerate(pairs) if a.numel()]
    if keep:
        pairs = [pairs[i] for i in keep]
        run(launch.plan_for(pairs, pairs[0][0].device), weight, spec.pick(keep), skip_nonfinite)
