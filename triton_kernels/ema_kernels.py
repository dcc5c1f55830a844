"""Triton kernels: every tensor pair of one device in one launch, any dtype mix.

Work layout.  The launcher flattens the tensors into *tiles* of ``BLOCK`` elements;
program ``i`` reads row ``i`` of the tile table ``(tensor index, first element)`` and
row ``tensor index`` of the tensor table ``(a offset, b offset, numel, a dtype code,
b dtype code, aligned)``.  Offsets are in elements from one 16-byte aligned *anchor*
pointer per dtype (three views of one small tensor), so every address is ``anchor +
offset``: Triton knows the anchor is aligned, and ``tl.multiple_of`` on the offset of
a tensor whose addresses are 16-byte aligned lets full tiles use vector loads and
stores (checked in the compiled PTX by the tests).  Tails and unaligned tensors take a
masked path.  dtype codes: 0 float32, 1 bfloat16, 2 float16; math in fp32, rounded
to nearest even when stored (said explicitly: the interpreter would truncate to bf16).

The hints must be applied in the kernel body and passed down: Triton drops
``tl.multiple_of`` facts computed inside a helper or returned from one (seen with
Triton 3.8 compiling for sm_90), so tile decoding is written out in each kernel.

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
        start = tl.multiple_of(tl.load(tiles + 2 * pid + 1), BLOCK)
        a_off = tl.load(tensors + ROW * t)
        b_off = tl.load(tensors + ROW * t + 1)
        n = tl.load(tensors + ROW * t + 2)
        a_code = tl.load(tensors + ROW * t + 3)
        b_code = tl.load(tensors + ROW * t + 4)
        aligned = tl.load(tensors + ROW * t + 5)
        offs = tl.max_contiguous(tl.multiple_of(start + tl.arange(0, BLOCK), BLOCK), BLOCK)
        mask = offs < n
        if (start + BLOCK <= n) & (aligned != 0):
            a4, a8 = tl.multiple_of(a_off, 4), tl.multiple_of(a_off, 8)
            b4, b8 = tl.multiple_of(b_off, 4), tl.multiple_of(b_off, 8)
            a = _load(f32, bf16, f16, a4, a8, a_code, offs, mask, False)
            b = _load(f32, bf16, f16, b4, b8, b_code, offs, mask, False)
            new = _finite_or_keep(_lerp(a, b, w), a, b, SKIP_NONFINITE)
            _store(f32, bf16, f16, a4, a8, a_code, offs, new, mask, False)
        else:
            a = _load(f32, bf16, f16, a_off, a_off, a_code, offs, mask, True)
            b = _load(f32, bf16, f16, b_off, b_off, b_code, offs, mask, True)
            new = _finite_or_keep(_lerp(a, b, w), a, b, SKIP_NONFINITE)
            _store(f32, bf16, f16, a_off, a_off, a_code, offs, new, mask, True)


@triton.jit
def copy_kernel(tensors, tiles, f32, bf16, f16, scale, scale_ptr,
                SCALE_FROM_PTR: tl.constexpr, BLOCK: tl.constexpr):
    """a[i] = b[i] * scale; a: destination (e.g. the model), b: source (the shadows)."""
    pid = tl.program_id(0).to(tl.int64)
    t = tl.load(tiles + 2 * pid)
    start = tl.multiple_of(tl.load(tiles + 2 * pid + 1), BLOCK)
    a_off = tl.load(tensors + ROW * t)
    b_off = tl.load(tensors + ROW * t + 1)
    n = tl.load(tensors + ROW * t + 2)
    a_code = tl.load(tensors + ROW * t + 3)
    b_code = tl.load(tensors + ROW * t + 4)
    aligned = tl.load(tensors + ROW * t + 5)
    offs = tl.max_contiguous(tl.multiple_of(start + tl.arange(0, BLOCK), BLOCK), BLOCK)
    mask = offs < n
    s = scale
    if SCALE_FROM_PTR:
        s = tl.load(scale_ptr).to(tl.float32)
    if (start + BLOCK <= n) & (aligned != 0):
        a4, a8 = tl.multiple_of(a_off, 4), tl.multiple_of(a_off, 8)
        b4, b8 = tl.multiple_of(b_off, 4), tl.multiple_of(b_off, 8)
        b = _load(f32, bf16, f16, b4, b8, b_code, offs, mask, False)
        _store(f32, bf16, f16, a4, a8, a_code, offs, b * s, mask, False)
    else:
        b = _load(f32, bf16, f16, b_off, b_off, b_code, offs, mask, True)
        _store(f32, bf16, f16, a_off, a_off, a_code, offs, b * s, mask, True)


@triton.jit
def _swap_words(pa, pb, mask, MASKED: tl.constexpr):
    """Exchange the raw words at ``pa`` and ``pb`` (bit for bit: NaN payloads, signs)."""
    if MASKED:
        x = tl.load(pa, mask=mask)
        y = tl.load(pb, mask=mask)
        tl.store(pa, y, mask=mask)
        tl.store(pb, x, mask=mask)
    else:
        x = tl.load(pa)
        y = tl.load(pb)
        tl.store(pa, y)
        tl.store(pb, x)


@triton.jit
def swap_kernel(tensors, tiles, i32, i16, BLOCK: tl.constexpr):
    """Exchange a[i] and b[i] (same dtype: the launcher checks) as raw 32- or 16-bit
    words, through int32/int16 views of the anchor."""
    pid = tl.program_id(0).to(tl.int64)
    t = tl.load(tiles + 2 * pid)
    start = tl.multiple_of(tl.load(tiles + 2 * pid + 1), BLOCK)
    a_off = tl.load(tensors + ROW * t)
    b_off = tl.load(tensors + ROW * t + 1)
    n = tl.load(tensors + ROW * t + 2)
    code = tl.load(tensors + ROW * t + 3)
    aligned = tl.load(tensors + ROW * t + 5)
    offs = tl.max_contiguous(tl.multiple_of(start + tl.arange(0, BLOCK), BLOCK), BLOCK)
    mask = offs < n
    if (start + BLOCK <= n) & (aligned != 0):
        if code == 0:
            _swap_words(i32 + tl.multiple_of(a_off, 4) + offs,
                        i32 + tl.multiple_of(b_off, 4) + offs, mask, False)
        else:
            _swap_words(i16 + tl.multiple_of(a_off, 8) + offs,
                        i16 + tl.multiple_of(b_off, 8) + offs, mask, False)
    else:
        if code == 0:
            _swap_words(i32 + a_off + offs, i32 + b_off + offs, mask, True)
        else:
            _swap_words(i16 + a_off + offs, i16 + b_off + offs, mask, True)
