"""Triton kernels: every tensor pair of one device in one launch, any dtype mix.

Work layout.  The launcher cuts each tensor into *tiles* of at most ``BLOCK`` elements;
program ``i`` reads row ``i`` of the tile table ``(tensor index, first element)`` and
row ``tensor index`` of the tensor table ``(a offset, b offset, numel, a dtype code,
b dtype code, layout)``.  Offsets are in elements from one 16-byte aligned *anchor*
pointer per dtype (three views of one small tensor), so every address is ``anchor +
offset``: Triton knows the anchor is aligned.  dtype codes: 0 float32, 1 bfloat16,
2 float16; math in fp32, rounded to nearest even when stored (said explicitly: the
interpreter would truncate to bf16).

Alignment, as the CUDA tile engine (``csrc/multi_tensor.h``): a tensor whose ``a``
starts off the 16-byte grid gets a *head* tile of the elements before its first aligned
one (at most 3 for fp32, 7 for 16-bit types; masked), and its other tiles start after
the head, so ``a`` is on the grid in every one of them.  ``layout`` = ``head << 1 |
both``, ``both`` when ``b`` is on the grid there too (both aligned, or both starting
equally misaligned).  A full tile then takes one of two paths: 16-byte vectors for both
sides, or vectors for ``a`` and element accesses for ``b`` (the L1 serves its repeated
lines; ``a`` is 8 of the 10 bytes of a bf16 -> fp32 update).  The head and a tensor's
last partial tile take the masked path.  Lane ``j`` is element ``start + j`` of the
tensor on every path.

Hints.  ``tl.multiple_of`` marks the op that made a value, so the mark holds wherever
the value is used, in every branch: the paths that must not use vectors on a hinted
offset mask those accesses, and a mask not constant over a vector (``start + lanes <
end``, both unknown to the compiler) keeps them element-wise.  That is also why ``b``
is masked on the ``a``-only path although its tile is full: unmasked, that path would
be the vector path's code with another ``b`` offset, and the compiler merges the two
into one (seen with Triton 3.8: the vector path lost its ``b`` vectors).  The masks
cost no memory traffic.  The hints must be applied in the kernel body and passed down:
Triton drops ``tl.multiple_of`` facts computed inside a helper or returned from one
(seen with Triton 3.8 compiling for sm_90), so tile decoding is written out in each
kernel.  The tests count
each path's accesses in the PTX compiled for sm_90.

Ends of the update's weight: 0 returns before any load (nothing changes, even for an
Inf param); 1 gives exactly the params.  Swaps move raw 32/16-bit words.
``SKIP_NONFINITE``: an element whose param is NaN or +-Inf keeps its shadow (a select
in registers; the shadow is loaded anyway).

Bytes per element (the bound on speed): update, bf16 param + fp32 shadow: 2 + 4 + 4
= 10; fp32 + fp32: 12.  copy: read + write (4 + 2 for fp32 -> bf16).  swap: 2 reads +
2 writes.
"""
import triton
import triton.language as tl

ROW = tl.constexpr(6)  # tensor-table columns


@triton.jit
def _load(f32, bf16, f16, off4, off8, code, offs, mask, MASKED: tl.constexpr):
    """Load the tensor at element offset ``off4``/``off8`` (same value, with the hints
    for 4- and 2-byte elements) from the anchor of its dtype, as fp32."""
    if code == 0:
        p32 = f32 + off4 + offs
        if MASKED:
            x = tl.load(p32, mask=mask, other=0.0)
        else:
            x = tl.load(p32)
    elif code == 1:
        pb16 = bf16 + off8 + offs
        if MASKED:
            x = tl.load(pb16, mask=mask, other=0.0).to(tl.float32)
        else:
            x = tl.load(pb16).to(tl.float32)
    else:
        ph16 = f16 + off8 + offs
        if MASKED:
            x = tl.load(ph16, mask=mask, other=0.0).to(tl.float32)
        else:
            x = tl.load(ph16).to(tl.float32)
    return x


@triton.jit
def _store(f32, bf16, f16, off4, off8, code, offs, x, mask, MASKED: tl.constexpr):
    """Round fp32 ``x`` once into the tensor's dtype and store it."""
    if code == 0:
        if MASKED:
            tl.store(f32 + off4 + offs, x, mask=mask)
        else:
            tl.store(f32 + off4 + offs, x)
    elif code == 1:
        if MASKED:
            tl.store(bf16 + off8 + offs, x.to(tl.bfloat16, fp_downcast_rounding="rtne"), mask=mask)
        else:
            tl.store(bf16 + off8 + offs, x.to(tl.bfloat16, fp_downcast_rounding="rtne"))
    else:
        if MASKED:
            tl.store(f16 + off8 + offs, x.to(tl.float16, fp_downcast_rounding="rtne"), mask=mask)
        else:
            tl.store(f16 + off8 + offs, x.to(tl.float16, fp_downcast_rounding="rtne"))


@triton.jit
def _lerp(a, b, w):
    """The two-sided lerp (as torch.lerp and the C++ kernels): for w >= 0.5 the form
    b - (1 - w) * (b - a), where 1 - w is exact; w = 1 gives exactly b."""
    mixed = tl.where(w < 0.5, a + w * (b - a), b - (1.0 - w) * (b - a))
    return tl.where(w == 1.0, b, mixed)


@triton.jit
def _finite_or_keep(new, a, b, SKIP_NONFINITE: tl.constexpr):
    """``new`` where the param ``b`` is finite, else the old shadow ``a`` (which came
    from the shadow's dtype, so storing it back is exact)."""
    if SKIP_NONFINITE:
        new = tl.where(tl.abs(b) <= 3.4028234663852886e38, new, a)
    return new


@triton.jit
def _update_tile(f32, bf16, f16, a4, a8, b4, b8, a_code, b_code, lanes, mask, w,
                 A_MASKED: tl.constexpr, B_MASKED: tl.constexpr, SKIP_NONFINITE: tl.constexpr):
    """One tile of the update: ``a``/``b`` at element offsets ``a4``/``b4`` from the
    anchors (``a8``/``b8``: the same, hinted for 16-bit dtypes); lane ``j`` is element
    ``j`` of the tile."""
    a = _load(f32, bf16, f16, a4, a8, a_code, lanes, mask, A_MASKED)
    b = _load(f32, bf16, f16, b4, b8, b_code, lanes, mask, B_MASKED)
    new = _finite_or_keep(_lerp(a, b, w), a, b, SKIP_NONFINITE)
    _store(f32, bf16, f16, a4, a8, a_code, lanes, new, mask, A_MASKED)


@triton.jit
def update_kernel(tensors, tiles, f32, bf16, f16, weight, weight_ptr,
                  WEIGHT_FROM_PTR: tl.constexpr, BLOCK: tl.constexpr,
                  SKIP_NONFINITE: tl.constexpr = False):
    """a[i] += w * (b[i] - a[i]); a: shadows, b: params.  ``weight_ptr`` for graph capture.

    Weight 0 changes nothing: the program returns before reading its tile entry or any
    tensor (an Inf param must not make its shadow NaN, and a step that capturable mode
    skips must not stream the model).  Weight 1 gives exactly the params."""
    w = weight
    if WEIGHT_FROM_PTR:
        w = tl.load(weight_ptr).to(tl.float32)
    if w != 0.0:
        pid = tl.program_id(0).to(tl.int64)
        t = tl.load(tiles + 2 * pid)
        start = tl.load(tiles + 2 * pid + 1)
        a_at = tl.load(tensors + ROW * t) + start
        b_at = tl.load(tensors + ROW * t + 1) + start
        n = tl.load(tensors + ROW * t + 2)
        a_code = tl.load(tensors + ROW * t + 3)
        b_code = tl.load(tensors + ROW * t + 4)
        layout = tl.load(tensors + ROW * t + 5)
        end = tl.where(start < (layout >> 1), layout >> 1, n)  # the head tile ends at the head
        lanes = tl.arange(0, BLOCK)
        mask = start + lanes < end
        full = start + BLOCK <= end
        if full:
            a4, a8 = tl.multiple_of(a_at, 4), tl.multiple_of(a_at, 8)
            if (layout & 1) != 0:  # both sides on the vector grid
                _update_tile(f32, bf16, f16, a4, a8, tl.multiple_of(b_at, 4),
                             tl.multiple_of(b_at, 8), a_code, b_code, lanes, mask, w, False,
                             False, SKIP_NONFINITE)
            else:  # b off it: element accesses
                _update_tile(f32, bf16, f16, a4, a8, b_at, b_at, a_code, b_code, lanes, mask, w,
                             False, True, SKIP_NONFINITE)
        else:  # a head or a last partial tile
            _update_tile(f32, bf16, f16, a_at, a_at, b_at, b_at, a_code, b_code, lanes, mask,
                         w, True, True, SKIP_NONFINITE)


@triton.jit
def _copy_tile(f32, bf16, f16, a4, a8, b4, b8, a_code, b_code, lanes, mask, s,
               A_MASKED: tl.constexpr, B_MASKED: tl.constexpr):
    """One tile of the copy (``a`` is written, never read)."""
    b = _load(f32, bf16, f16, b4, b8, b_code, lanes, mask, B_MASKED)
    _store(f32, bf16, f16, a4, a8, a_code, lanes, b * s, mask, A_MASKED)


@triton.jit
def copy_kernel(tensors, tiles, f32, bf16, f16, scale, scale_ptr,
                SCALE_FROM_PTR: tl.constexpr, BLOCK: tl.constexpr):
    """a[i] = b[i] * scale; a: destination (e.g. the model), b: source (the shadows)."""
    pid = tl.program_id(0).to(tl.int64)
    t = tl.load(tiles + 2 * pid)
    start = tl.load(tiles + 2 * pid + 1)
    a_at = tl.load(tensors + ROW * t) + start
    b_at = tl.load(tensors + ROW * t + 1) + start
    n = tl.load(tensors + ROW * t + 2)
    a_code = tl.load(tensors + ROW * t + 3)
    b_code = tl.load(tensors + ROW * t + 4)
    layout = tl.load(tensors + ROW * t + 5)
    end = tl.where(start < (layout >> 1), layout >> 1, n)
    lanes = tl.arange(0, BLOCK)
    mask = start + lanes < end
    full = start + BLOCK <= end
    s = scale
    if SCALE_FROM_PTR:
        s = tl.load(scale_ptr).to(tl.float32)
    if full:
        a4, a8 = tl.multiple_of(a_at, 4), tl.multiple_of(a_at, 8)
        if (layout & 1) != 0:
            _copy_tile(f32, bf16, f16, a4, a8, tl.multiple_of(b_at, 4), tl.multiple_of(b_at, 8),
                       a_code, b_code, lanes, mask, s, False, False)
        else:
            _copy_tile(f32, bf16, f16, a4, a8, b_at, b_at, a_code, b_code, lanes, mask, s,
                       False, True)
    else:
        _copy_tile(f32, bf16, f16, a_at, a_at, b_at, b_at, a_code, b_code, lanes, mask, s,
                   True, True)


@triton.jit
def _swap_words(pa, pb, mask, A_MASKED: tl.constexpr, B_MASKED: tl.constexpr):
    """Exchange the raw words at ``pa`` and ``pb`` (bit for bit: NaN payloads, signs)."""
    if A_MASKED:
        x = tl.load(pa, mask=mask)
    else:
        x = tl.load(pa)
    if B_MASKED:
        y = tl.load(pb, mask=mask)
        tl.store(pb, x, mask=mask)
    else:
        y = tl.load(pb)
        tl.store(pb, x)
    if A_MASKED:
        tl.store(pa, y, mask=mask)
    else:
        tl.store(pa, y)


@triton.jit
def swap_kernel(tensors, tiles, i32, i16, BLOCK: tl.constexpr):
    """Exchange a[i] and b[i] (same dtype: the launcher checks) as raw 32- or 16-bit
    words, through int32/int16 views of the anchor."""
    pid = tl.program_id(0).to(tl.int64)
    t = tl.load(tiles + 2 * pid)
    start = tl.load(tiles + 2 * pid + 1)
    a_at = tl.load(tensors + ROW * t) + start
    b_at = tl.load(tensors + ROW * t + 1) + start
    n = tl.load(tensors + ROW * t + 2)
    code = tl.load(tensors + ROW * t + 3)
    layout = tl.load(tensors + ROW * t + 5)
    end = tl.where(start < (layout >> 1), layout >> 1, n)
    lanes = tl.arange(0, BLOCK)
    mask = start + lanes < end
    full = start + BLOCK <= end
    if full & ((layout & 1) != 0):
        if code == 0:
            _swap_words(i32 + tl.multiple_of(a_at, 4) + lanes,
                        i32 + tl.multiple_of(b_at, 4) + lanes, mask, False, False)
        else:
            _swap_words(i16 + tl.multiple_of(a_at, 8) + lanes,
                        i16 + tl.multiple_of(b_at, 8) + lanes, mask, False, False)
    elif full:
        if code == 0:
            _swap_words(i32 + tl.multiple_of(a_at, 4) + lanes, i32 + b_at + lanes, mask, False,
                        True)
        else:
            _swap_words(i16 + tl.multiple_of(a_at, 8) + lanes, i16 + b_at + lanes, mask, False,
                        True)
    else:
        if code == 0:
            _swap_words(i32 + a_at + lanes, i32 + b_at + lanes, mask, True, True)
        else:
            _swap_words(i16 + a_at + lanes, i16 + b_at + lanes, mask, True, True)
