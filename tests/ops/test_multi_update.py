"""ema_multi_update_ (K profiles in one pass) is bit for bit K separate ema_update_ calls
on the same backend, and within rounding of float64, on every backend that runs here:
foreach, cpu (the C++ kernel; the extension is built if needed) and triton (through its
interpreter, small sizes).  The CUDA kernel's tile engine is checked on the CPU in
test_multi_shadow_emulation.py and on a GPU in test_multi_update_gpu.py."""
from __future__ import annotations

import itertools

import pytest
import torch

from ema_fused import available_backends, ema_multi_update_, ema_update_
from ema_fused.backends import extension as _extension

from helpers.numerics import ALL_DTYPES, assert_rounded_close, compute_dtype, lerp_reference, rand, seeded

PAIRS = list(itertools.product(ALL_DTYPES, ALL_DTYPES))
IDS = [f"{a}-{b}".replace("torch.", "") for a, b in PAIRS]
SIZES = {"foreach": (0, 1, 7, 4097, 278011), "cpu": (0, 1, 7, 4097, 65537, 278011),
         "triton": (0, 1, 7, 2049, 4097)}


@pytest.fixture(params=["foreach", "cpu", "triton"])
def backend(request):
    name = request.param
    if name == "cpu" and not _extension.load(build=True):
        pytest.fail(f"the extension neither loads nor builds here: {_extension.error()}")
    usable, why = available_backends("cpu")[name]
    if not usable:
        pytest.fail(f"backend {name!r} cannot run here: {why}")
    return name


def _run_both(shadows, params, weights, backend):
    """Run the one-pass op on ``shadows`` and K single updates on clones; return the clones."""
    separate = [[s.clone() for s in profile] for profile in shadows]
    for profile, w in zip(separate, weights):
        ema_update_(profile, params, w, backend=backend)
    ema_multi_update_(shadows, params, weights, backend=backend)
    return separate


def _assert_identical(shadows, separate):
    for k, (got, want) in enumerate(zip(shadows, separate)):
        for i, (g, w) in enumerate(zip(got, want)):
            assert g.dtype == w.dtype and torch.equal(g, w), f"shadows[{k}][{i}] differs"


@pytest.mark.parametrize("sd,pd", PAIRS, ids=IDS)
def test_bit_identical_to_separate_updates_every_dtype_pair(backend, sd, pd):
    gen = seeded("pairs", backend, sd, pd)
    sizes = SIZES[backend]
    params = [rand(n, pd, gen) for n in sizes]
    shadows = [[rand(n, sd, gen) for n in sizes] for _ in range(2)]
    weights = [0.3, 0.7]  # both sides of the two-sided lerp
    exact = [[lerp_reference(s, p, w) for s, p in zip(profile, params)]
             for profile, w in zip(shadows, weights)]
    mags = [[s.double().abs() + p.double().abs() for s, p in zip(profile, params)]
            for profile in shadows]
    separate = _run_both(shadows, params, weights, backend)
    _assert_identical(shadows, separate)
    for profile, ref, mag in zip(shadows, exact, mags):
        for s, e, m in zip(profile, ref, mag):
            assert_rounded_close(s, e, m, compute_dtype(sd, pd))


@pytest.mark.parametrize("k", [1, 2, 4, 8, 9])
def test_profile_counts_mixed_shadow_dtypes_and_the_weights_ends(backend, k):
    """Each profile its own shadow dtype; weights 0 (untouched), 1 (exact copy) and in
    between; K = 9 crosses the 8 profiles of one pass."""
    gen = seeded("k", backend, k)
    sizes = SIZES[backend][:4]
    params = [rand(n, (torch.bfloat16, torch.float32, torch.float16)[j % 3], gen)
              for j, n in enumerate(sizes)]
    shadows = [[rand(n, ALL_DTYPES[(q + j) % 4], gen) for j, n in enumerate(sizes)]
               for q in range(k)]
    weights = [(0.25, 0.0, 1.0, 0.9, 2 ** -20, 0.5, 1 - 2 ** -24, 0.01, 0.6)[q] for q in range(k)]
    before = [[s.clone() for s in profile] for profile in shadows]
    separate = _run_both(shadows, params, weights, backend)
    _assert_identical(shadows, separate)
    for profile, old, w in zip(shadows, before, weights):
        for s, o, p in zip(profile, old, params):
            if w == 0.0:
                assert torch.equal(s, o)
            elif w == 1.0:
                assert torch.equal(s, p.to(s.dtype))


def test_one_profile_is_ema_update(backend):
    gen = seeded("one", backend)
    params = [rand(n, torch.bfloat16, gen) for n in SIZES[backend]]
    shadows = [rand(n, torch.float32, gen) for n in SIZES[backend]]
    single = [s.clone() for s in shadows]
    ema_update_(single, params, 0.125, backend=backend)
    ema_multi_update_([shadows], params, [0.125], backend=backend)
    assert all(torch.equal(a, b) for a, b in zip(shadows, single))


@pytest.mark.parametrize("count", [1, 63, 65, 500])
def test_many_tensors(backend, count):
    gen = seeded("count", backend, count)
    sizes = [int(n) for n in torch.randint(0, 40, (count,), generator=gen)]
    dts = [PAIRS[i % len(PAIRS)] for i in range(count)]
    params = [rand(n, pd, gen) for n, (_, pd) in zip(sizes, dts)]
    shadows = [[rand(n, sd, gen) for n, (sd, _) in zip(sizes, dts)] for _ in range(3)]
    _assert_identical(shadows, _run_both(shadows, params, [0.1, 0.5, 0.99], backend))


def test_zero_weight_reads_nothing_and_one_ignores_the_shadow(backend):
    """Weight 0 leaves a profile as it was even for an Inf param (Inf * 0 would be NaN);
    weight 1 gives the param exactly even for an Inf/NaN shadow."""
    n = SIZES[backend][-1]
    params = [torch.full((n,), float("inf"), dtype=torch.bfloat16)]
    keep = [rand(n, torch.float32, seeded("z", backend))]
    nan = [torch.full((n,), float("nan"))]
    before = keep[0].clone()
    ema_multi_update_([keep, nan], params, [0.0, 1.0], backend=backend)
    assert torch.equal(keep[0], before) and bool(torch.isinf(nan[0]).all())


def test_misaligned_views_and_layouts_the_kernels_do_not_take(backend):
    """Views one element off (storage offset 1) and non-contiguous params go where a
    single update would send them (non-contiguous: foreach), still bit for bit."""
    gen = seeded("views", backend)
    n = SIZES[backend][-2]
    params = [rand(n + 1, torch.bfloat16, gen)[1:], rand((9, 13), torch.float32, gen).t(),
              rand(n, torch.float16, gen), rand(n + 3, torch.float32, gen)[3:]]
    shadows = []
    for q in range(3):
        shadows.append([rand(n + 1, torch.float32, gen)[1:], rand((13, 9), torch.float32, gen),
                        rand(n + 2, (torch.float32, torch.float64, torch.bfloat16)[q], gen)[2:],
                        rand(n, torch.float16, gen)])
    exact = [[lerp_reference(s, p, 0.2) for s, p in zip(profile, params)] for profile in shadows]
    mags = [[s.double().abs() + p.double().abs() for s, p in zip(profile, params)]
            for profile in shadows]
    _assert_identical(shadows, _run_both(shadows, params, [0.2] * 3, backend))
    for profile, ref, mag in zip(shadows, exact, mags):
        for s, e, m, p in zip(profile, ref, mag, params):
            assert_rounded_close(s, e, m, compute_dtype(s.dtype, p.dtype))


def test_params_may_repeat_and_share_memory(backend):
    """Params are only read: the same param twice, or two overlapping views, are fine."""
    gen = seeded("shared", backend)
    flat = rand(40, torch.float32, gen)
    params = [flat[:30], flat[10:], flat[:30]]
    shadows = [[rand(30, torch.float32, gen) for _ in range(3)] for _ in range(2)]
    _assert_identical(shadows, _run_both(shadows, params, [0.3, 0.6], backend))


def test_auto_matches_its_chosen_backend():
    gen = seeded("auto")
    params = [rand(1000, torch.bfloat16, gen)]
    shadows = [[rand(1000, torch.float32, gen)] for _ in range(2)]
    _assert_identical(shadows, _run_both(shadows, params, [0.3, 0.6], "auto"))
