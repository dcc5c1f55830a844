"""The C++ CPU kernels in csrc/ (JIT-built here with torch.utils.cpp_extension, from
the sources as they are now) against float64, bit patterns and error messages."""
from __future__ import annotations

import itertools
import os
import re
import sys

import pytest
import torch

from helpers.numerics import assert_rounded_close, compute_dtype, lerp_reference, rand, seeded
from helpers.paths import ROOT

KERNEL_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
PAIRS = list(itertools.product(KERNEL_DTYPES, KERNEL_DTYPES))
SIZES = (0, 1, 7, 65535, 65536, 65537, 278011)
# The ops are built into a namespace of their own: ema_fused._C (the real build, maybe
# an older one) can be loaded in the same process, before or after this module, and
# registering the ema_fused ops twice aborts the process.
NAMESPACE = "ema_fused_cpu_kernels_test"


@pytest.fixture(scope="module")
def ops(tmp_path_factory):
    pytest.importorskip("ninja")
    from torch.utils.cpp_extension import load
    build = tmp_path_factory.mktemp("build")
    sources = []
    for name in ("ema_ops.cpp", "cpu_kernels.cpp"):
        with open(os.path.join(ROOT, "csrc", name)) as f:
            text, count = re.subn(r"TORCH_LIBRARY_(FRAGMENT|IMPL)\(ema_fused,",
                                  rf"TORCH_LIBRARY_\1({NAMESPACE},", f.read())
        assert count == 1, f"csrc/{name}: expected one TORCH_LIBRARY_* block for ema_fused"
        sources.append(str(build / name))
        with open(sources[-1], "w") as f:
            f.write(text)
    path = os.environ.get("PATH", "")
    # the ninja binary of this environment (pip's ninja) even when it is not activated
    os.environ["PATH"] = os.path.dirname(sys.executable) + os.pathsep + path
    try:
        load(name=NAMESPACE, sources=sources, extra_cflags=["-O3"],
             extra_include_paths=[os.path.join(ROOT, "csrc")], build_directory=str(build),
             is_python_module=False)
    finally:
        os.environ["PATH"] = path
    return getattr(torch.ops, NAMESPACE)



@pytest.mark.parametrize("sd,pd", PAIRS, ids=[f"{a}-{b}".replace("torch.", "") for a, b in PAIRS])
def test_update_every_pair(ops, sd, pd):
    gen = seeded("u", sd, pd)
    shadows = [rand(n, sd, gen) for n in SIZES]
    params = [rand(n, pd, gen) for n in SIZES]
    exact = [lerp_reference(s, p, 0.3) for s, p in zip(shadows, params)]
    mags = [s.double().abs() + p.double().abs() for s, p in zip(shadows, params)]
    ops.kernel_update_(shadows, params, 0.3)
    for s, e, m in zip(shadows, exact, mags):
        assert_rounded_close(s, e, m, compute_dtype(sd, pd))


@pytest.mark.parametrize("dd,sd", PAIRS, ids=[f"{a}-{b}".replace("torch.", "") for a, b in PAIRS])
def test_copy_every_pair(ops, dd, sd):
    gen = seeded("c", dd, sd)
    src = [rand(n, sd, gen) for n in SIZES]
    dst = [rand(n, dd, gen) for n in SIZES]
    ops.kernel_copy_(dst, src, 1.25)
    for d, s in zip(dst, src):
        exact = s.double() * 1.25
        assert_rounded_close(d, exact, exact.abs(), compute_dtype(dd, sd))


@pytest.mark.parametrize("count", [1, 63, 64, 65, 111, 500])
def test_many_tensors(ops, count):
    gen = seeded("n", count)
    dts = [PAIRS[i % len(PAIRS)] for i in range(count)]
    sizes = [int(n) for n in torch.randint(0, 300, (count,), generator=gen)]
    shadows = [rand(n, sd, gen) for n, (sd, _) in zip(sizes, dts)]
    params = [rand(n, pd, gen) for n, (_, pd) in zip(sizes, dts)]
    exact = [lerp_reference(s, p, 0.01) for s, p in zip(shadows, params)]
    ops.kernel_update_(shadows, params, 0.01)
    for s, p, e in zip(shadows, params, exact):
        assert_rounded_close(s, e, e.abs() + p.double().abs(), compute_dtype(s.dtype, p.dtype))


def test_partial_overlap_is_refused_before_writing(ops):
    buf = torch.zeros(100)
    first = torch.zeros(8)
    for op, args in (("kernel_update_", (0.5,)), ("kernel_copy_", (2.0,))):
        with pytest.raises(ValueError, match=rf"{op}: tensors\[1\] partially overlap"):
            getattr(ops, op)([first, buf[:60]], [torch.ones(8), buf[10:70]], *args)
        assert not first.any() and not buf.any()
    same = torch.arange(5.0)  # the same tensor on both sides is not a partial overlap
    ops.kernel_update_([same], [same], 0.5)
    assert torch.equal(same, torch.arange(5.0))


def test_a_freed_storage_is_refused_not_written(ops):
    freed = torch.zeros(1000)
    freed.untyped_storage().resize_(0)  # what FSDP does to unsharded params between uses
    first = torch.zeros(8)
    with pytest.raises(RuntimeError, match=r"tensors\[1\] reach past the end of their storage"):
        ops.kernel_update_([first, torch.zeros(1000)], [torch.ones(8), freed], 0.5)
    assert not first.any()


def test_checks_name_the_index_and_write_nothing(ops):
    shadows = [torch.zeros(4), torch.zeros(3)]
    params = [torch.ones(4), torch.ones(5)]
    with pytest.raises(RuntimeError, match=r"tensors\[1\] have shapes \[3\] and \[5\]"):
        ops.kernel_update_(shadows, params, 0.5)
    assert not shadows[0].any()
    with pytest.raises(RuntimeError, match=r"tensors\[0\] must be contiguous"):
        ops.kernel_update_([torch.zeros(4, 4).t()], [torch.ones(4, 4)], 0.5)
    with pytest.raises(RuntimeError, match=r"tensors\[0\] have dtypes Double and Float"):
        ops.kernel_update_([torch.zeros(2, dtype=torch.float64)], [torch.ones(2)], 0.5)
    with pytest.raises(RuntimeError, match="weight must be in"):
        ops.kernel_update_([torch.zeros(2)], [torch.ones(2)], 1.5)
    with pytest.raises(RuntimeError, match="2 tensors but the second has 1"):
        ops.kernel_copy_(shadows, params[:1], 1.0)


# --- kernel_update_graph_safe_: the weight comes from a 1-element float32 tensor ---

@pytest.mark.parametrize("sd,pd", PAIRS, ids=[f"{a}-{b}".replace("torch.", "") for a, b in PAIRS])
@pytest.mark.parametrize("w", [0.0, 0.3, 1.0])
def test_update_graph_safe_every_pair(ops, sd, pd, w):
    gen = seeded("g", sd, pd, w)
    shadows = [rand(n, sd, gen) for n in SIZES]
    params = [rand(n, pd, gen) for n in SIZES]
    before = [s.clone() for s in shadows]
    exact = [lerp_reference(s, p, w) for s, p in zip(shadows, params)]
    mags = [s.double().abs() + p.double().abs() for s, p in zip(shadows, params)]
    ops.kernel_update_graph_safe_(shadows, params, torch.tensor([w]))
    for s, e, m in zip(shadows, exact, mags):
        assert_rounded_close(s, e, m, compute_dtype(sd, pd))
    # the ends are exact: 0 keeps the shadow, 1 copies the param (rounded once)
    if w == 0.0:
        assert all(torch.equal(s, b) for s, b in zip(shadows, before))
    if w == 1.0:
        assert all(torch.equal(s, p.to(sd)) for s, p in zip(shadows, params))


def test_update_graph_safe_reads_the_weight_when_it_runs(ops):
    gen = seeded("g-late")
    shadow, param = rand(70000, torch.float32, gen), rand(70000, torch.float32, gen)
    weight = torch.tensor([0.25])
    ops.kernel_update_graph_safe_([shadow], [param], weight)
    weight.fill_(0.75)  # a new value in the same tensor is what the next call uses
    exact = lerp_reference(shadow, param, 0.75)
    ops.kernel_update_graph_safe_([shadow], [param], weight)
    assert_rounded_close(shadow, exact, exact.abs() + param.double().abs(), torch.float32)
    # a 0-d tensor and a [1, 1] tensor hold one element too
    ops.kernel_update_graph_safe_([shadow], [param], torch.tensor(1.0))
    assert torch.equal(shadow, param)
    ops.kernel_update_graph_safe_([shadow], [param.neg()], torch.ones(1, 1))
    assert torch.equal(shadow, param.neg())


def test_update_graph_safe_does_not_range_check_the_value(ops):
    # The CUDA kernel cannot look at the value without a sync, so neither does this one:
    # 1.5 extrapolates and NaN flows into the shadows.
    gen = seeded("g-range")
    shadows = [rand(1000, sd, gen) for sd in KERNEL_DTYPES]
    params = [rand(1000, torch.float32, gen) for _ in KERNEL_DTYPES]
    exact = [lerp_reference(s, p, 1.5) for s, p in zip(shadows, params)]
    ops.kernel_update_graph_safe_(shadows, params, torch.tensor([1.5]))
    for s, p, e in zip(shadows, params, exact):
        assert_rounded_close(s, e, 3 * (e.abs() + p.double().abs()), compute_dtype(s.dtype))
    ops.kernel_update_graph_safe_(shadows, params, torch.tensor([float("nan")]))
    assert all(s.isnan().all() for s in shadows)


@pytest.mark.parametrize("weight", [
    torch.tensor([0.5], dtype=torch.float64), torch.tensor([0.5], dtype=torch.bfloat16),
    torch.tensor([0.5, 0.5]), torch.empty(0), torch.tensor([0.5], device="meta")],
    ids=["float64", "bfloat16", "two-elements", "empty", "meta"])
def test_update_graph_safe_checks_the_weight_tensor(ops, weight):
    shadows, params = [torch.zeros(100_000), torch.zeros(3)], [torch.ones(100_000), torch.ones(3)]
    op = ops.kernel_update_graph_safe_.default
    # sent straight to the CPU kernel: a meta weight would otherwise pick the Meta kernel
    with pytest.raises(RuntimeError, match="weight must be a 1-element float32 tensor on the "
                       r"shadows' device \(cpu\)"):
        op.redispatch(torch._C.DispatchKeySet(torch._C.DispatchKey.CPU), shadows, params, weight)
    assert not any(s.any() for s in shadows)


def test_update_graph_safe_checks_pairs_before_writing(ops):
    shadows = [torch.zeros(100_000), torch.zeros(4, dtype=torch.float64)]
    params = [torch.ones(100_000), torch.ones(4)]
    with pytest.raises(RuntimeError, match=r"kernel_update_graph_safe_: tensors\[1\] have dtypes Double"):
        ops.kernel_update_graph_safe_(shadows, params, torch.tensor([0.5]))
    assert not shadows[0].any()


# --- kernel_swap_: exchanges raw 2- or 4-byte units, so every bit pattern survives ---

def _specials(dtype):
    """Random data plus -0, infinities, subnormals and NaNs with odd payloads, as bits."""
    idt = torch.int32 if dtype == torch.float32 else torch.int16
    special = torch.tensor([-0.0, float("inf"), -float("inf"), torch.finfo(dtype).tiny / 4,
                            float("nan")], dtype=dtype)
    nan_payloads = torch.tensor([0x7F800001, -1] if idt == torch.int32 else [0x7C01, -1], dtype=idt)
    return torch.cat([special.view(idt), nan_payloads])


@pytest.mark.parametrize("dtype", KERNEL_DTYPES, ids=lambda d: str(d).replace("torch.", ""))
def test_swap_every_dtype(ops, dtype):
    gen = seeded("s", dtype)
    idt = torch.int32 if dtype == torch.float32 else torch.int16
    a = [rand(n, dtype, gen) for n in SIZES]
    b = [rand(n, dtype, gen) for n in SIZES]
    for x in a[3:5] + b[4:6]:  # bit patterns that a float copy could change
        x.view(idt)[:7] = _specials(dtype)
    a0, b0 = [x.view(idt).clone() for x in a], [x.view(idt).clone() for x in b]
    ops.kernel_swap_(a, b)
    for x, y, x0, y0 in zip(a, b, a0, b0):
        assert torch.equal(x.view(idt), y0) and torch.equal(y.view(idt), x0)


@pytest.mark.parametrize("count", [1, 2, 63, 65, 500])
def test_swap_many_tensors(ops, count):
    gen = seeded("sn", count)
    sizes = [int(n) for n in torch.randint(0, 3000, (count,), generator=gen)]
    dts = [KERNEL_DTYPES[i % 3] for i in range(count)]
    a = [rand(n, d, gen) for n, d in zip(sizes, dts)]
    b = [rand(n, d, gen) for n, d in zip(sizes, dts)]
    a0, b0 = [x.clone() for x in a], [x.clone() for x in b]
    ops.kernel_swap_(a, b)
    assert all(torch.equal(x, y0) and torch.equal(y, x0) for x, y, x0, y0 in zip(a, b, a0, b0))
    ops.kernel_swap_(a, b)  # and back
    assert all(torch.equal(x, x0) and torch.equal(y, y0) for x, y, x0, y0 in zip(a, b, a0, b0))


def test_swap_checks_before_writing(ops):
    gen = seeded("s-err")
    a = [rand(100_000, torch.float32, gen), rand(5, torch.float16, gen), rand(3, torch.float32, gen)]
    b = [rand(100_000, torch.float32, gen), rand(5, torch.float16, gen), rand(3, torch.bfloat16, gen)]
    a0, b0 = [x.clone() for x in a], [x.clone() for x in b]
    with pytest.raises(RuntimeError, match=r"kernel_swap_: tensors\[2\] have dtypes Float and "
                       r"BFloat16; swapping needs equal dtypes"):
        ops.kernel_swap_(a, b)
    assert all(torch.equal(x, y) for x, y in zip(a + b, a0 + b0))
    with pytest.raises(RuntimeError, match=r"tensors\[0\] have shapes \[100000\] and \[99999\]"):
        ops.kernel_swap_([a[0]], [b[0][1:]])
    with pytest.raises(ValueError, match=r"tensors\[0\] partially overlap"):
        ops.kernel_swap_([a[0][:50_000]], [a[0][10:50_010]])
    with pytest.raises(RuntimeError, match="2 tensors but the second has 1"):
        ops.kernel_swap_(a[:2], b[:1])
    assert all(torch.equal(x, y) for x, y in zip(a + b, a0 + b0))
    ops.kernel_swap_([a[0], a[1]], [a[0], a[1]])  # a tensor with itself: unchanged
    assert torch.equal(a[0], a0[0]) and torch.equal(a[1], a0[1])


# --- misaligned views: contiguous, but not on a vector boundary; the rest untouched ---

def _offset_view(n, dtype, gen, offset=3):
    base = torch.full((n + offset + 2,), 7.0, dtype=dtype)
    view = base[offset:offset + n]
    view.copy_(rand(n, dtype, gen))
    return base, view


def _edges_intact(base, n, offset=3):
    return bool((base[:offset] == 7).all() and (base[offset + n:] == 7).all())


@pytest.mark.parametrize("sd,pd", PAIRS, ids=[f"{a}-{b}".replace("torch.", "") for a, b in PAIRS])
@pytest.mark.parametrize("n", [1, 7, 65537, 278011])
def test_offset_views_every_op(ops, sd, pd, n):
    gen = seeded("o", sd, pd, n)
    (sb, s), (pb, p) = _offset_view(n, sd, gen, 3), _offset_view(n, pd, gen, 1)
    exact = lerp_reference(s, p, 0.3)
    ops.kernel_update_([s], [p], 0.3)
    assert_rounded_close(s, exact, exact.abs() + p.double().abs(), compute_dtype(sd, pd))
    exact = lerp_reference(s, p, 0.6)
    ops.kernel_update_graph_safe_([s], [p], torch.tensor([0.6]))
    assert_rounded_close(s, exact, exact.abs() + p.double().abs(), compute_dtype(sd, pd))
    exact = p.double() * 0.5
    ops.kernel_copy_([s], [p], 0.5)
    assert_rounded_close(s, exact, exact.abs(), compute_dtype(sd, pd))
    assert _edges_intact(sb, n, 3) and _edges_intact(pb, n, 1)
    if sd == pd:
        (qb, q) = _offset_view(n, sd, gen, 5)
        s0, q0 = s.clone(), q.clone()
        ops.kernel_swap_([s], [q])
        assert torch.equal(s, q0) and torch.equal(q, s0)
        assert _edges_intact(sb, n, 3) and _edges_intact(qb, n, 5)


# --- the fp16 and bf16 conversions are exact: bit for bit what torch's .to() gives ---

def test_conversions_match_torch_bit_for_bit(ops):
    # every float16 and bfloat16 bit pattern into float32 (NaNs: stay NaN)
    for dtype in (torch.float16, torch.bfloat16):
        src = torch.arange(-2**15, 2**15, dtype=torch.int32).to(torch.int16).view(dtype)
        dst = torch.empty(src.shape)
        ops.kernel_copy_([dst], [src], 1.0)
        ref = src.float()
        assert torch.equal(dst.isnan(), ref.isnan())
        assert torch.equal(dst.nan_to_num().view(torch.int32), ref.nan_to_num().view(torch.int32))
    # float32 into float16/bfloat16: ties, the overflow edge, subnormals, random bits
    edges = torch.tensor([65504.0, 65519.996, 65520.0, 65536.0, 2.0**-14, 2.0**-24, 2.0**-25,
                          1.5 * 2.0**-25, 2.0**-26, 1 + 2.0**-11, 1 + 3 * 2.0**-11, 1 + 2.0**-8,
                          1 + 3 * 2.0**-8, 3.3895314e38, 3.4028235e38, float("inf"), 0.0])
    gen = seeded("bits")
    bits = torch.randint(-2**31, 2**31, (1 << 20,), generator=gen, dtype=torch.int64)
    src = torch.cat([edges, -edges, bits.to(torch.int32).view(torch.float32)])
    for dtype in (torch.float16, torch.bfloat16):
        dst = torch.empty(src.shape, dtype=dtype)
        ops.kernel_copy_([dst], [src], 1.0)
        ref = src.to(dtype)
        idt = torch.int16
        assert torch.equal(dst.isnan(), ref.isnan())
        ok = dst.isnan() | (dst.view(idt) == ref.view(idt))
        assert bool(ok.all()), f"{dtype}: {src[~ok][:5].tolist()} -> {dst[~ok][:5].tolist()}"
