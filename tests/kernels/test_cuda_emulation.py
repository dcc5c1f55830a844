"""The CUDA kernels' tile engine (csrc/multi_tensor.h), run on the CPU.

``tests/kernels/csrc/cuda_emulation.cpp`` builds the same table words and runs the same
per-thread tile code as ``csrc/cuda_kernels.cu``, block by block and thread by
thread, so the table layout, tile decoding, dtype dispatch, vector path and tails
are checked against float64 on machines without a GPU.  (The launch, the table cache
and the streams are checked by the GPU tests.)
"""
from __future__ import annotations

import itertools

import pytest
import torch

from helpers.csrc_tools import load_emulation
from helpers.numerics import assert_rounded_close, compute_dtype, lerp_reference, rand, seeded

DTYPES = (torch.float32, torch.bfloat16, torch.float16)
PAIRS = list(itertools.product(DTYPES, DTYPES))
IDS = [f"{a}-{b}".replace("torch.", "") for a, b in PAIRS]
TILE = 4096  # kTile in multi_tensor.h
SIZES = (0, 1, 7, TILE - 1, TILE, TILE + 1, 3 * TILE, 278011)


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    load_emulation("ema_fused_cuda_emulation", "cuda_emulation.cpp",
                   str(tmp_path_factory.mktemp("emulation")))
    return torch.ops.ema_fused_emulation.run_



def expected_trace(shadows, params, same_tensor_skipped=True) -> list[int]:
    """The per-thread path counts the kernels' layout gives (multi_tensor.h): a head of
    up to 3 elements aligns the first tensor; full tiles use vector accesses for it, and
    for the second tensor only when both start equally misaligned; a partial tile is
    guarded.  [tile entries read, full vector, full scalar-b, guarded, head elements].
    One tensor on both sides of a pair has no row, except in a weighted sum
    (``same_tensor_skipped=False``: a += w * a changes a)."""
    out = [0] * 5
    for a, b in zip(shadows, params):
        n = a.numel()
        same = a.data_ptr() == b.data_ptr() and a.dtype == b.dtype
        if n == 0 or (same and same_tensor_skipped):
            continue  # no row: empty, or one tensor on both sides
        head = (-(a.data_ptr() // a.element_size())) % 4
        vector_b = (b.data_ptr() + head * b.element_size()) % (4 * b.element_size()) == 0
        rest = n - head
        full, partial = (rest // TILE, int(rest % TILE != 0)) if rest > 0 else (0, 0)
        out[0] += max(1, full + partial) * 256
        out[1 if vector_b else 2] += full * 256
        out[3] += partial * 256
        out[4] += min(head, n)
    return out


@pytest.mark.parametrize("sd,pd", PAIRS, ids=IDS)
def test_update_every_pair(run, sd, pd):
    gen = seeded("u", sd, pd)
    shadows = [rand(n, sd, gen) for n in SIZES]
    params = [rand(n, pd, gen) for n in SIZES]
    exact = [lerp_reference(s, p, 0.3) for s, p in zip(shadows, params)]
    mags = [s.double().abs() + p.double().abs() for s, p in zip(shadows, params)]
    expected = expected_trace(shadows, params)
    assert run(shadows, params, "update", 0.3) == expected
    assert expected[1] >= (1 + 1 + 3 + 67) * 256  # the aligned full tiles took the vector path
    for s, e, m in zip(shadows, exact, mags):
        assert_rounded_close(s, e, m, compute_dtype(sd, pd))


@pytest.mark.parametrize("weight", [0.7, 0.5, 1 - 2 ** -24])
def test_update_upper_half_of_the_weight_against_float64(run, weight):
    """w >= 0.5 takes the other side of the two-sided lerp, b - (1 - w) * (b - a)."""
    gen = seeded("upper", weight)
    shadows = [rand(n, torch.float32, gen) for n in SIZES]
    params = [rand(n, torch.bfloat16, gen) for n in SIZES]
    exact = [lerp_reference(s, p, weight) for s, p in zip(shadows, params)]
    mags = [s.double().abs() + p.double().abs() for s, p in zip(shadows, params)]
    run(shadows, params, "update", weight)
    for s, e, m in zip(shadows, exact, mags):
        assert_rounded_close(s, e, m, torch.float32)


@pytest.mark.parametrize("from_ptr", [False, True], ids=["scalar", "pointer"])
@pytest.mark.parametrize("sd,pd", PAIRS, ids=IDS)
def test_weight_one_copies_the_params_exactly(run, sd, pd, from_ptr):
    """w = 1 is a copy, whatever the shadow held (x + w*(b - x) would give 0 for shadow
    1e8 and param 1 in fp32, and keep an Inf or NaN shadow NaN)."""
    gen = seeded("one", sd, pd)
    n = 2 * TILE + 3
    params = [rand(n, pd, gen), rand(n + 1, pd, gen)[1:]]
    shadows = [torch.full((n,), 1e4 if sd == torch.float16 else 1e8, dtype=sd),
               torch.full((n,), float("inf"), dtype=sd)]
    shadows[1][::2] = float("nan")
    params[0][:5] = 1.0
    run(shadows, params, "update", 1.0, from_ptr)
    for s, p in zip(shadows, params):
        assert torch.equal(s, p.to(sd))  # exact: one rounding of the param into the shadow


@pytest.mark.parametrize("from_ptr", [False, True], ids=["scalar", "pointer"])
def test_weight_zero_reads_nothing_and_changes_nothing(run, from_ptr):
    """w = 0 returns before the tile table is read: no element is loaded or stored, so an
    Inf param cannot make its shadow NaN (inf * 0)."""
    gen = seeded("zero")
    shadows = [rand(n, torch.float32, gen) for n in SIZES]
    params = [torch.full((n,), float("inf"), dtype=torch.bfloat16) for n in SIZES]
    before = [s.clone() for s in shadows]
    assert run(shadows, params, "update", 0.0, from_ptr) == [0, 0, 0, 0, 0]
    assert all(torch.equal(s, b) for s, b in zip(shadows, before))
    assert run(shadows, params, "update", 0.25, from_ptr)[0] > 0  # the counter does count


@pytest.mark.parametrize("dd,sd", PAIRS, ids=IDS)
def test_copy_every_pair_never_reads_dst(run, dd, sd):
    gen = seeded("c", dd, sd)
    src = [rand(n, sd, gen) for n in SIZES]
    dst = [torch.full((n,), float("nan"), dtype=dd) for n in SIZES]  # must not leak in
    run(dst, src, "copy", 1.25)
    for d, s in zip(dst, src):
        exact = s.double() * 1.25
        assert_rounded_close(d, exact, exact.abs(), compute_dtype(dd, sd))


@pytest.mark.parametrize("dtype", DTYPES, ids=[str(d) for d in DTYPES])
def test_swap_exchanges_exactly(run, dtype):
    gen = seeded("s", dtype)
    a = [rand(n, dtype, gen) for n in SIZES]
    b = [rand(n, dtype, gen) for n in SIZES]
    a0, b0 = [x.clone() for x in a], [y.clone() for y in b]
    run(a, b, "swap", 0.0)
    for x, y, x0, y0 in zip(a, b, a0, b0):
        assert torch.equal(x, y0) and torch.equal(y, x0)


@pytest.mark.parametrize("count", [1, 63, 64, 65, 111, 500])
def test_many_tensors_mixed_dtypes(run, count):
    gen = seeded("n", count)
    sizes = [int(n) for n in torch.randint(0, 3 * TILE, (count,), generator=gen)]
    dts = [PAIRS[i % len(PAIRS)] for i in range(count)]
    shadows = [rand(n, sd, gen) for n, (sd, _) in zip(sizes, dts)]
    params = [rand(n, pd, gen) for n, (_, pd) in zip(sizes, dts)]
    exact = [lerp_reference(s, p, 0.01) for s, p in zip(shadows, params)]
    run(shadows, params, "update", 0.01)
    for s, p, e in zip(shadows, params, exact):
        assert_rounded_close(s, e, e.abs() + p.double().abs(), compute_dtype(s.dtype, p.dtype))


@pytest.mark.parametrize("sd,pd", [(torch.float32, torch.bfloat16), (torch.bfloat16, torch.float32),
                                   (torch.float16, torch.float16)], ids=str)
@pytest.mark.parametrize("offset_a,offset_b", [(1, 0), (0, 3), (2, 2), (3, 1), (1, 1)])
def test_misaligned_views_keep_the_vector_path_after_a_short_head(run, sd, pd, offset_a, offset_b):
    """A view that starts off the 16-byte grid runs at most 3 head elements one per
    thread; its full tiles still take vector accesses for the shadow side, and for the
    param side too when both start equally misaligned."""
    gen = seeded("m", sd, pd, offset_a, offset_b)
    n = 3 * TILE + 5
    shadows = [rand(n + offset_a, sd, gen)[offset_a:], rand(7, sd, gen)[1:3]]
    params = [rand(n + offset_b, pd, gen)[offset_b:], rand(9, pd, gen)[offset_b:offset_b + 2]]
    before = [s.clone() for s in shadows]
    exact = [lerp_reference(s, p, 0.3) for s, p in zip(shadows, params)]
    trace = run(shadows, params, "update", 0.3)
    assert trace == expected_trace(shadows, params)
    full = (n - (-offset_a) % 4) // TILE
    assert trace[1 if offset_a == offset_b else 2] == full * 256  # the full tiles, not scalar loops
    for s, e, b, p in zip(shadows, exact, before, params):
        assert_rounded_close(s, e, b.double().abs() + p.double().abs(), compute_dtype(sd, pd))


def test_swap_moves_raw_bits(run):
    """NaN payloads, signed zeros and infinities come back bit for bit (raw 16/32-bit words)."""
    for dtype, bits in ((torch.bfloat16, torch.int16), (torch.float16, torch.int16),
                        (torch.float32, torch.int32)):
        special = torch.tensor([0x7FC1, -1, 0x7F81 if dtype == torch.bfloat16 else 0x7C01,
                                -32768, 0x7F80, 0], dtype=torch.int32)
        raw_a = special.repeat(TILE // 2 + 7).to(bits)
        raw_b = torch.arange(raw_a.numel(), dtype=torch.int32).to(bits)
        if dtype == torch.float32:
            raw_a = raw_a | (raw_a << 16)  # wider payloads
        a, b = raw_a.clone().view(dtype), raw_b.clone().view(dtype)
        run([a[1:]], [b[1:]], "swap", 0.0)
        assert torch.equal(a[1:].view(bits), raw_b[1:]) and torch.equal(b[1:].view(bits), raw_a[1:])


def test_checks_name_the_index_and_write_nothing(run):
    buf = torch.zeros(2 * TILE)
    first = torch.zeros(TILE)
    with pytest.raises(ValueError, match=r"tensors\[1\] partially overlap"):
        run([first, buf[:TILE]], [torch.ones(TILE), buf[8:TILE + 8]], "update", 0.5)
    assert not first.any() and not buf.any()
    shadows = [torch.zeros(TILE), torch.zeros(3)]
    with pytest.raises(RuntimeError, match=r"tensors\[1\] have shapes \[3\] and \[5\]"):
        run(shadows, [torch.ones(TILE), torch.ones(5)], "update", 0.5)
    assert not shadows[0].any()
    with pytest.raises(RuntimeError, match=r"tensors\[1\] have dtypes Float and BFloat16; swapping"):
        run(shadows, [torch.ones(TILE), torch.ones(3, dtype=torch.bfloat16)], "swap", 0.0)
    assert not shadows[0].any()
    with pytest.raises(RuntimeError, match=r"tensors\[0\] must be contiguous"):
        run([torch.zeros(4, 4).t()], [torch.ones(4, 4)], "update", 0.5)
    with pytest.raises(RuntimeError, match=r"tensors\[0\] have dtypes Double and Float"):
        run([torch.zeros(2, dtype=torch.float64)], [torch.ones(2)], "update", 0.5)


def test_pairs_that_share_memory_are_refused_before_anything_is_written(run):
    """One launch writes every pair at once: a destination given twice, destinations that
    overlap, or a destination that another pair reads would race."""
    buf = torch.zeros(3 * TILE)
    other = torch.zeros(TILE)
    src = [torch.ones(TILE), torch.ones(TILE)]
    with pytest.raises(ValueError, match=r"shadows\[0\] and shadows\[2\] overlap in memory"):
        run([buf[:TILE], other, buf[:TILE]], src + [torch.ones(TILE)], "update", 0.5)
    with pytest.raises(ValueError, match=r"shadows\[0\] and shadows\[1\] overlap.*both are written"):
        run([buf[:TILE], buf[TILE - 1:2 * TILE - 1]], src, "update", 0.5)
    with pytest.raises(ValueError, match=r"shadows\[0\] and params\[1\] overlap.*one is written"):
        run([buf[:TILE], other], [torch.ones(TILE), buf[5:TILE + 5]], "update", 0.5)
    with pytest.raises(ValueError, match=r"a\[0\] and b\[1\] overlap"):  # a swap writes both lists
        run([buf[:TILE], other], [torch.ones(TILE), buf[3:TILE + 3]], "swap", 0.0)
    assert not buf.any() and not other.any()
    # adjacent views of one buffer do not overlap; a param read by two pairs is fine
    shared = torch.ones(TILE)
    run([buf[:TILE], buf[TILE:2 * TILE]], [shared, shared], "update", 0.5)
    assert bool((buf[:2 * TILE] == 0.5).all()) and not buf[2 * TILE:].any()


def _poisoned(n, dtype, gen, offset=0):
    x = rand(n + offset, dtype, gen)[offset:]
    pick = torch.randint(0, 12, (n,), generator=gen)
    x[pick == 0] = float("nan")
    x[pick == 1] = float("inf")
    x[pick == 2] = float("-inf")
    return x


@pytest.mark.parametrize("from_ptr", [False, True], ids=["scalar", "pointer"])
@pytest.mark.parametrize("weight", [0.3, 0.75, 1.0])
@pytest.mark.parametrize("sd,pd", PAIRS, ids=IDS)
def test_skip_nonfinite_keeps_those_shadows_and_updates_the_rest(run, sd, pd, weight, from_ptr):
    """Kind::UpdateFinite (and CopyFinite at weight 1): every path (vector, scalar-b,
    guarded tail, head) keeps the shadow where the param is NaN/Inf and matches the plain
    update bit for bit elsewhere; the same paths as the plain update are taken."""
    gen = seeded("finite", sd, pd, weight)
    sizes = [n for n in SIZES if n] + [TILE + 5]
    shadows = [rand(n, sd, gen) for n in sizes] + [rand(TILE + 3, sd, gen)[1:]]
    params = [_poisoned(n, pd, gen) for n in sizes] + [_poisoned(TILE + 2, pd, gen, 2)]
    before = [s.clone() for s in shadows]
    # the plain update of the params with each bad element replaced by its shadow (in
    # fp32, which the kernel computes in anyway): lerp(s, s, w) == s, the rest identical
    plain = [s.clone() for s in shadows]
    clean = [torch.where(torch.isfinite(p), p.float(), s.float()) for s, p in zip(shadows, params)]
    run(plain, clean, "update", weight, from_ptr)
    expected = expected_trace(shadows, params)
    assert run(shadows, params, "update_finite", weight, from_ptr) == expected
    for s, b, p, pl in zip(shadows, before, params, plain):
        bad = ~torch.isfinite(p)
        assert torch.equal(s[bad], b[bad])
        assert torch.equal(s, pl)
        exact = torch.where(bad, b.double(), lerp_reference(b, p.masked_fill(bad, 0), weight))
        mags = b.double().abs() + p.double().masked_fill(bad, 0).abs()
        assert_rounded_close(s, exact, mags, compute_dtype(sd, pd))


def test_skip_nonfinite_weight_zero_reads_nothing(run):
    gen = seeded("finite-zero")
    shadows = [rand(TILE + 7, torch.float32, gen)]
    before = shadows[0].clone()
    counts = run(shadows, [_poisoned(TILE + 7, torch.bfloat16, gen)], "update_finite", 0.0)
    assert counts == [0, 0, 0, 0, 0] and torch.equal(shadows[0], before)


# --- Kind::Accumulate, the weighted sum: a += w * b, a float32 ---------------------------

def _sum_reference(out, inputs, weight):
    exact = [o.double() + weight * x.double() for o, x in zip(out, inputs)]
    mags = [o.double().abs() + abs(weight) * x.double().abs() for o, x in zip(out, inputs)]
    return exact, mags


@pytest.mark.parametrize("weight", [0.3, -1.75, 1.0])
@pytest.mark.parametrize("xd", DTYPES, ids=[str(d) for d in DTYPES])
def test_weighted_sum_every_input_dtype_and_path(run, xd, weight):
    gen = seeded("sum", xd, weight)
    out = [rand(n, torch.float32, gen) for n in SIZES]
    inputs = [rand(n, xd, gen) for n in SIZES]
    exact, mags = _sum_reference(out, inputs, weight)
    expected = expected_trace(out, inputs)
    assert run(out, inputs, "weighted_sum", weight) == expected
    assert expected[1] >= (1 + 1 + 3 + 67) * 256  # the aligned full tiles took the vector path
    for o, e, m in zip(out, exact, mags):
        assert_rounded_close(o, e, m, torch.float32)


@pytest.mark.parametrize("offset_a,offset_b", [(1, 0), (0, 3), (2, 2), (3, 1)])
def test_weighted_sum_misaligned_views(run, offset_a, offset_b):
    gen = seeded("sum-m", offset_a, offset_b)
    n = 3 * TILE + 5
    base = rand(n + offset_a + 3, torch.float32, gen)
    before = base.clone()
    out = [base[offset_a:offset_a + n]]
    inputs = [rand(n + offset_b, torch.bfloat16, gen)[offset_b:]]
    exact, mags = _sum_reference(out, inputs, -0.4)
    trace = run(out, inputs, "weighted_sum", -0.4)
    assert trace == expected_trace(out, inputs)
    assert trace[1 if offset_a == offset_b else 2] == ((n - (-offset_a) % 4) // TILE) * 256
    assert_rounded_close(out[0], exact[0], mags[0], torch.float32)
    assert torch.equal(base[:offset_a], before[:offset_a])  # nothing outside the view
    assert torch.equal(base[offset_a + n:], before[offset_a + n:])


@pytest.mark.parametrize("count", [1, 7, 111, 500])
def test_weighted_sum_many_tensors(run, count):
    gen = seeded("sum-n", count)
    sizes = [int(n) for n in torch.randint(0, 3 * TILE, (count,), generator=gen)]
    out = [rand(n, torch.float32, gen) for n in sizes]
    inputs = [rand(n, DTYPES[i % 3], gen) for i, n in enumerate(sizes)]
    exact, mags = _sum_reference(out, inputs, -0.01)
    assert run(out, inputs, "weighted_sum", -0.01) == expected_trace(out, inputs)
    for o, e, m in zip(out, exact, mags):
        assert_rounded_close(o, e, m, torch.float32)


@pytest.mark.parametrize("from_ptr", [False, True], ids=["scalar", "pointer"])
def test_weighted_sum_zero_weight_reads_nothing(run, from_ptr):
    out = [torch.randn(n) for n in SIZES]
    inputs = [torch.full((n,), float("inf"), dtype=torch.bfloat16) for n in SIZES]
    before = [o.clone() for o in out]
    assert run(out, inputs, "weighted_sum", 0.0, from_ptr) == [0, 0, 0, 0, 0]
    assert all(torch.equal(o, b) for o, b in zip(out, before))


def test_weighted_sum_keeps_a_pair_of_one_tensor(run):
    """a += w * a changes a (an update or a swap of one tensor with itself does nothing,
    so those pairs get no row): the pair is kept and scaled by 1 + w."""
    gen = seeded("sum-self")
    t = rand(2 * TILE + 9, torch.float32, gen)
    exact = t.double() * 1.5
    assert run([t], [t], "weighted_sum", 0.5) == expected_trace([t], [t], False)
    assert_rounded_close(t, exact, exact.abs(), torch.float32)


def test_weighted_sum_refuses_a_non_float32_out_naming_it_before_writing(run):
    out = [torch.zeros(TILE), torch.zeros(3, dtype=torch.bfloat16)]
    with pytest.raises(RuntimeError, match=r"out\[1\] has dtype BFloat16; a weighted sum"):
        run(out, [torch.ones(TILE), torch.ones(3)], "weighted_sum", 0.5)
    assert not out[0].any()
    buf = torch.zeros(2 * TILE)
    with pytest.raises(ValueError, match=r"out\[0\] and inputs\[1\] overlap.*one is written"):
        run([buf[:TILE], torch.zeros(TILE)], [torch.ones(TILE), buf[4:TILE + 4]],
            "weighted_sum", 0.5)
    assert not buf.any()


# --- the stochastic update (stochastic.h): the tile engine's bits are the CPU kernel's ----

HALF = (torch.bfloat16, torch.float16)
SR_PAIRS = [(sd, pd) for sd in HALF for pd in DTYPES]
SR_IDS = [f"{a}-{b}".replace("torch.", "") for a, b in SR_PAIRS]
KAT = ((0x243F6A88, 0x85A308D3, 0x13198A2E, 0x03707344), 0x299F31D0A4093822,
       [0xD16CFE09, 0x94FDCCEB, 0x5001E420, 0x24126EA1])  # Random123's kat_vectors


def test_the_engine_philox_gives_the_known_answers(run):
    from ema_fused.backends.stochastic import philox
    from ema_fused.checks.rounding import to_int64
    counter, key, out = KAT
    assert torch.ops.ema_fused_emulation.philox(*counter, to_int64(key)) == out
    for c in [(0, 1, 2, 3), (2**32 - 1, 7, 0, 2**31), (123456, 0, 99, 1)]:
        words = philox(*[torch.tensor([x]) for x in c], 0xFEDCBA9876543210)[0].tolist()
        assert torch.ops.ema_fused_emulation.philox(*c, to_int64(0xFEDCBA9876543210)) == words


def _stochastic_reference(shadows, params, weight, skip, seed, offset, positions, starts):
    """The foreach backend's torch code (tests/kernels/test_stochastic_rounding.py checks
    the CPU kernel against it too)."""
    from ema_fused.backends import stochastic
    from ema_fused.checks.rounding import Stochastic
    out = [s.clone() for s in shadows]
    if weight == 1.0:
        for o, p in zip(out, params):
            o.copy_(torch.where(torch.isfinite(p), p.to(o.dtype), o) if skip else p)
    elif weight != 0.0:
        stochastic.update_(out, params, weight, skip, Stochastic(seed, offset, tuple(positions),
                                                                 tuple(starts)), 1 << 20)
    return out


@pytest.mark.parametrize("skip", [False, True], ids=["plain", "skip_nonfinite"])
@pytest.mark.parametrize("sd,pd", SR_PAIRS, ids=SR_IDS)
def test_stochastic_engine_gives_the_cpu_kernels_bits_on_every_path(run, sd, pd, skip):
    """Vector and scalar-b full tiles, guarded tails and heads (misaligned views), starts
    that are not multiples of 8 (a vector straddling two draws): bit for bit the torch
    code's, and the same paths (same accesses) as the nearest engine takes."""
    gen = seeded("sr-engine", sd, pd, skip)
    shadows = [rand(n, sd, gen) for n in SIZES] + [rand(2 * TILE + 9, sd, gen)[1:]]
    params = [rand(n, pd, gen, scale=3.0) for n in SIZES] + [rand(2 * TILE + 9, pd, gen)[1:]]
    params[-2][::97] = float("nan")
    params[-2][5::89] = float("inf")
    positions = [int(x) for x in torch.randint(0, 2**32, (len(shadows),), generator=gen)]
    starts = [int(x) for x in torch.randint(0, 2**30, (len(shadows),), generator=gen)]
    seed, offset = 2**64 - 3, 77
    for w in (0.3, 0.75, 0.0, 1.0):
        want = _stochastic_reference(shadows, params, w, skip, seed, offset, positions, starts)
        got = [s.clone() for s in shadows]
        trace = torch.ops.ema_fused_emulation.run_stochastic_(
            got, params, w, skip, seed - (1 << 64), offset, positions, starts)
        assert trace == ([0] * 5 if w == 0.0 else expected_trace(got, params))
        for i, (g, e) in enumerate(zip(got, want)):
            nan = e.isnan()  # a copied NaN: torch's conversion and c10's differ in payload
            assert torch.equal(g.isnan(), nan), (w, i)
            assert torch.equal(g.view(torch.int16)[~nan], e.view(torch.int16)[~nan]), (w, i)


def test_stochastic_engine_refuses_float32_shadows(run):
    with pytest.raises(RuntimeError, match=r"shadows\[1\] is float32; stochastic rounding"):
        torch.ops.ema_fused_emulation.run_stochastic_(
            [torch.zeros(3, dtype=torch.bfloat16), torch.zeros(3)], [torch.ones(3)] * 2, 0.5,
            False, 1, 1, [0, 1], [0, 0])
