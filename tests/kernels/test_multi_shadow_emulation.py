"""The CUDA multi-shadow kernel's tile engine (csrc/multi_shadow.h), run on the CPU.

``tests/kernels/csrc/multi_shadow_emulation.cpp`` builds the same table words and runs the same
per-thread code as ``csrc/cuda_multi_shadow.cu``, block by block and thread by thread,
and runs the single update's engine (csrc/multi_tensor.h) the same way for reference:
every profile's shadows must equal K single updates bit for bit, lie within rounding of
float64, and every thread must load its param elements once per tile whatever K is
(counted per path).  The launch, table cache and streams are checked by the GPU tests.
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
TILE, THREADS, MAX_PROFILES = 4096, 256, 8  # kTile, kThreads, kMaxProfiles
SIZES = (0, 1, 7, TILE - 1, TILE, TILE + 1, 3 * TILE, 278011)
# MultiTrace: table, param vector/scalar/guarded, shadow vector/scalar/guarded, copy
TABLE, P_VEC, P_SCALAR, P_GUARDED, S_VEC, S_SCALAR, S_GUARDED, S_COPY = range(8)


@pytest.fixture(scope="module")
def emu(tmp_path_factory):
    load_emulation("ema_fused_multi_emulation", "multi_shadow_emulation.cpp",
                   str(tmp_path_factory.mktemp("multi_emulation")))
    return torch.ops.ema_fused_multi_emulation


def _grid(t: torch.Tensor) -> bool:
    return t.data_ptr() % (4 * t.element_size()) == 0


def expected_trace(shadows, params, weights) -> list[int]:
    """Per-thread path counts the layout gives: per group of up to 8 moving profiles, each
    tile's param elements once (vectors when the param is on its 4-element grid, else
    elements; a partial tile guarded), and each moving profile's shadow elements once."""
    out = [0] * 8
    active = [k for k, w in enumerate(weights) if w != 0.0]
    for g in range(0, len(active), MAX_PROFILES):
        group = active[g:g + MAX_PROFILES]
        for i, p in enumerate(params):
            n = p.numel()
            if n == 0:
                continue
            full, partial = n // TILE, int(n % TILE != 0)
            out[TABLE] += (full + partial) * THREADS
            out[P_VEC if _grid(p) else P_SCALAR] += full * THREADS
            out[P_GUARDED] += partial * THREADS
            for k in group:
                s = shadows[k][i]
                out[S_VEC if _grid(s) else S_SCALAR] += full * THREADS
                out[S_GUARDED] += partial * THREADS
                out[S_COPY] += (full + partial) * THREADS * (weights[k] == 1.0)
    return out


def _check(emu, shadows, params, weights):
    """Run both engines; compare bit for bit and with float64; return the multi trace."""
    separate = [[s.clone() for s in profile] for profile in shadows]
    for profile, w in zip(separate, weights):
        emu.single_(profile, params, w)
    exact = [[s.double() if w == 0 else lerp_reference(s, p, w) for s, p in zip(profile, params)]
             for profile, w in zip(shadows, weights)]  # weight 0: unchanged, even by an Inf
    mags = [[(s.double().abs() + p.double().abs()).nan_to_num(posinf=0)
             for s, p in zip(profile, params)] for profile in shadows]
    trace = emu.multi_([s for profile in shadows for s in profile], params, weights)
    for k, (got, want, ref, mag) in enumerate(zip(shadows, separate, exact, mags)):
        for i, (g, w, e, m, p) in enumerate(zip(got, want, ref, mag, params)):
            assert torch.equal(g, w), f"shadows[{k}][{i}] differs from the single update"
            assert_rounded_close(g, e, m, compute_dtype(g.dtype, p.dtype))
    assert trace == expected_trace(shadows, params, weights)
    return trace


@pytest.mark.parametrize("sd,pd", PAIRS, ids=IDS)
def test_every_dtype_pair_reads_each_param_tile_once(emu, sd, pd):
    gen = seeded("pairs", sd, pd)
    params = [rand(n, pd, gen) for n in SIZES]
    shadows = [[rand(n, sd, gen) for n in SIZES] for _ in range(4)]
    trace = _check(emu, shadows, params, [0.3, 0.7, 0.01, 0.5])
    assert trace[P_VEC] == (1 + 1 + 3 + 67) * THREADS  # the full tiles, once, not 4 times
    assert trace[S_VEC] == 4 * trace[P_VEC]


@pytest.mark.parametrize("k", [1, 2, 3, 8, 9, 12])
def test_profile_counts_mixed_dtypes_and_the_weights_ends(emu, k):
    """Shadows of several dtypes within one row; weight 0 profiles leave the table (not
    read), weight 1 copies without reading the shadow; past 8, a second group."""
    gen = seeded("k", k)
    params = [rand(n, DTYPES[j % 3], gen) for j, n in enumerate(SIZES)]
    shadows = [[rand(n, DTYPES[(q + j) % 3], gen) for j, n in enumerate(SIZES)] for q in range(k)]
    weights = [(0.25, 0.0, 1.0, 0.9, 2 ** -20, 0.5, 1 - 2 ** -24, 0.01, 0.6, 1.0, 0.0, 0.3)[q]
               for q in range(k)]
    before = [[s.clone() for s in profile] for profile in shadows]
    _check(emu, shadows, params, weights)
    for profile, old, w in zip(shadows, before, weights):
        if w == 0.0:
            assert all(torch.equal(s, o) for s, o in zip(profile, old))


def test_all_zero_weights_read_nothing(emu):
    gen = seeded("zero")
    params = [torch.full((n,), float("inf"), dtype=torch.bfloat16) for n in SIZES]
    shadows = [[rand(n, torch.float32, gen) for n in SIZES] for _ in range(2)]
    assert _check(emu, shadows, params, [0.0, 0.0]) == [0] * 8


def test_weight_one_copies_whatever_the_shadow_held(emu):
    n = 2 * TILE + 3
    params = [rand(n, torch.bfloat16, seeded("one"))]
    shadows = [[torch.full((n,), float("nan"))], [torch.full((n,), 1e8)]]
    trace = emu.multi_([shadows[0][0], shadows[1][0]], params, [1.0, 1.0])
    assert all(torch.equal(p[0], params[0].float()) for p in shadows)
    assert trace[S_COPY] == 2 * 3 * THREADS


@pytest.mark.parametrize("offsets", [(1, 0, 0), (0, 1, 2), (2, 2, 2), (3, 1, 0)])
def test_misaligned_views_take_element_accesses_for_that_operand_only(emu, offsets):
    """A tensor off its vector grid is read and written element by element on full tiles
    (still within the same layout); the others keep their vector accesses."""
    gen = seeded("views", offsets)
    n = 3 * TILE + 5
    po, *so = offsets
    params = [rand(n + po, torch.bfloat16, gen)[po:], rand(9, torch.float16, gen)[po:po + 2]]
    shadows = [[rand(n + o, torch.float32, gen)[o:], rand(7, torch.float32, gen)[1:3]] for o in so]
    trace = _check(emu, shadows, params, [0.3, 0.8])
    assert trace[P_VEC if po == 0 else P_SCALAR] == 3 * THREADS
    assert trace[S_VEC] == 3 * THREADS * sum(o == 0 for o in so)


@pytest.mark.parametrize("count", [1, 63, 64, 65, 111, 500])
def test_many_tensors_mixed_dtypes(emu, count):
    gen = seeded("n", count)
    sizes = [int(n) for n in torch.randint(0, 3 * TILE, (count,), generator=gen)]
    dts = [PAIRS[i % len(PAIRS)] for i in range(count)]
    params = [rand(n, pd, gen) for n, (_, pd) in zip(sizes, dts)]
    shadows = [[rand(n, sd, gen) for n, (sd, _) in zip(sizes, dts)] for _ in range(3)]
    _check(emu, shadows, params, [0.01, 0.5, 0.999])


def test_checks_name_profile_and_index_and_write_nothing(emu):
    gen = seeded("checks")
    params = [rand(TILE, torch.bfloat16, gen) for _ in range(2)]
    flat = [rand(TILE, torch.float32, gen) for _ in range(4)]
    before = [s.clone() for s in flat]
    with pytest.raises(ValueError, match=r"shadows\[0\]\[1\] and shadows\[1\]\[1\] overlap"):
        emu.multi_(flat[:3] + [flat[1]], params, [0.5, 0.5])
    with pytest.raises(RuntimeError, match=r"profile 1: tensors\[0\] have shapes \[5\]"):
        emu.multi_(flat[:2] + [torch.zeros(5), flat[3]], params, [0.5, 0.5])
    with pytest.raises(RuntimeError, match=r"profile 0: tensors\[1\] must be contiguous"):
        emu.multi_([flat[0], torch.zeros(64, 64).t()], [params[0], torch.zeros(64, 64)], [0.5])
    assert all(torch.equal(s, b) for s, b in zip(flat, before))


# --- the stochastic multi update: profile k draws with its own seed --------------------

@pytest.mark.parametrize("k", [1, 3, 9])
def test_stochastic_profiles_equal_k_single_stochastic_updates(emu, k):
    """Each profile's bits are the single stochastic update's (the torch code of the
    foreach backend, which the CPU and tile kernels match: tests/kernels), on every path,
    with the weights' ends exact; past 8 profiles, a second group."""
    from ema_fused.backends import stochastic
    from ema_fused.checks.rounding import Stochastic
    gen = seeded("sr-k", k)
    sizes = list(SIZES) + [TILE + 3]
    params = [rand(n, DTYPES[j % 3], gen, scale=3.0) for j, n in enumerate(sizes)]
    params[-1] = rand(TILE + 5, torch.bfloat16, gen)[2:]  # off its vector grid
    shadows = [[rand(n, (torch.bfloat16, torch.float16)[(q + j) % 2], gen)
                for j, n in enumerate(sizes)] for q in range(k)]
    weights = [(0.25, 0.0, 1.0, 0.9, 2 ** -20, 0.5, 0.01, 0.6, 0.3)[q] for q in range(k)]
    seeds = [int(x) for x in torch.randint(0, 2**62, (k,), generator=gen)]
    positions = list(range(100, 100 + len(params)))
    starts = [8 * j + j % 5 for j in range(len(params))]
    want = [[s.clone() for s in profile] for profile in shadows]
    for q, w in enumerate(weights):
        if w == 1.0:
            for o, p in zip(want[q], params):
                o.copy_(p)
        elif w != 0.0:
            stochastic.update_(want[q], params, w, False,
                               Stochastic(seeds[q], 5, tuple(positions), tuple(starts)), 1 << 20)
    trace = emu.multi_stochastic_([s for profile in shadows for s in profile], params, weights,
                                  seeds, 5, positions, starts)
    assert trace == expected_trace(shadows, params, weights)
    for q in range(k):
        for i, (g, e) in enumerate(zip(shadows[q], want[q])):
            assert torch.equal(g.view(torch.int16), e.view(torch.int16)), (q, i)
