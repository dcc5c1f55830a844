"""ema_multi_update_ on a real GPU (skipped without one): the triton and cuda kernels
bit for bit against K separate ema_update_ calls and within rounding of float64, at real
sizes; one launch per update for up to 8 profiles, no host sync once warm, and the
caller's current stream."""
from __future__ import annotations

import itertools

import pytest
import torch

from ema_fused import ema_multi_update_, ema_update_

from helpers.gpu import gpu_backend
from helpers.numerics import assert_rounded_close, compute_dtype, lerp_reference, rand

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU"),
]
DTYPES = (torch.float32, torch.bfloat16, torch.float16)
SIZES = [0, 1, 7, 2047, 2049, 4095, 4096, 4097, 278011, (1 << 22) + 3]
KERNEL_NAMES = {"triton": "multi_update_kernel", "cuda": "multi_tiles_kernel"}


@pytest.fixture(params=["triton", "cuda"])
def backend(request):
    return gpu_backend(request.param)


def _inputs(gen, shadow_dtypes, param_dtype, sizes=SIZES):
    params = [rand(n, param_dtype, gen, "cuda") for n in sizes]
    params.append(rand(5001, param_dtype, gen, "cuda")[1:])  # off the vector grid
    shadows = []
    for sd in shadow_dtypes:
        profile = [rand(n, sd, gen, "cuda") for n in sizes]
        profile.append(rand(5002, sd, gen, "cuda")[2:])
        shadows.append(profile)
    return shadows, params


def _separate(shadows, params, weights, backend):
    out = [[s.clone() for s in profile] for profile in shadows]
    for profile, w in zip(out, weights):
        ema_update_(profile, params, w, backend=backend)
    return out


@pytest.mark.parametrize("sd,pd", list(itertools.product(DTYPES, DTYPES)))
def test_bit_identical_to_separate_updates_and_close_to_float64(backend, sd, pd):
    gen = torch.Generator().manual_seed(0)
    shadows, params = _inputs(gen, [sd, sd, sd], pd)
    weights = [0.1, 0.7, 1.0]
    exact = [[lerp_reference(s, p, w) for s, p in zip(profile, params)]
             for profile, w in zip(shadows, weights)]
    want = _separate(shadows, params, weights, backend)
    ema_multi_update_(shadows, params, weights, backend=backend)
    for got, ref, sep in zip(shadows, exact, want):
        for s, e, w, p in zip(got, ref, sep, params):
            assert torch.equal(s, w)
            assert_rounded_close(s.cpu(), e.cpu(), (e.abs() + p.double().abs()).cpu(),
                                 compute_dtype(sd, pd))


@pytest.mark.parametrize("k", [1, 2, 4, 8, 9])
def test_profile_counts_with_mixed_shadow_dtypes(backend, k):
    gen = torch.Generator().manual_seed(k)
    shadows, params = _inputs(gen, [DTYPES[q % 3] for q in range(k)], torch.bfloat16)
    weights = [(0.25, 0.0, 1.0, 0.9, 0.5, 1 - 2 ** -24, 0.01, 0.6, 0.3)[q] for q in range(k)]
    want = _separate(shadows, params, weights, backend)
    ema_multi_update_(shadows, params, weights, backend=backend)
    for got, sep in zip(shadows, want):
        assert all(torch.equal(s, w) for s, w in zip(got, sep))


def test_one_launch_no_host_sync_and_the_current_stream(backend):
    gen = torch.Generator().manual_seed(1)
    shadows, params = _inputs(gen, [torch.float32] * 4, torch.bfloat16, sizes=[4097] * 20)
    weights = [0.1, 0.2, 0.3, 0.4]
    ema_multi_update_(shadows, params, weights, backend=backend)  # builds the tables
    torch.cuda.synchronize()
    from torch.profiler import ProfilerActivity, profile
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        ema_multi_update_(shadows, params, weights, backend=backend)
        torch.cuda.synchronize()
    names = [e.name for e in prof.events() if e.device_type == torch.autograd.DeviceType.CUDA]
    assert [n for n in names if KERNEL_NAMES[backend] in n] and len(
        [n for n in names if not n.startswith(("Memcpy", "Memset"))]) == 1, names
    torch.cuda.set_sync_debug_mode("error")
    try:
        ema_multi_update_(shadows, params, weights, backend=backend)
    finally:
        torch.cuda.set_sync_debug_mode(0)
    side = torch.cuda.Stream()
    want = _separate(shadows, params, weights, backend)
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        ema_multi_update_(shadows, params, weights, backend=backend)
    torch.cuda.current_stream().wait_stream(side)
    for got, sep in zip(shadows, want):
        assert all(torch.equal(s, w) for s, w in zip(got, sep))
