"""GPU checks of the core and its foreach fallback (skipped without a CUDA device);
the kernel backends' GPU checks (Triton and C++/CUDA) are in tests/kernels/test_kernels_gpu.py and,
for the exact edges shared with the CPU backends, in tests/kernels/test_kernel_edges.py."""
from __future__ import annotations

import itertools

import pytest
import torch
from torch import nn

from ema_fused import EMA, ema_update_

from helpers.numerics import ALL_DTYPES, assert_rounded_close, compute_dtype, lerp_reference, rand

pytestmark = [pytest.mark.gpu,
              pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]


@pytest.mark.parametrize("sd,pd", list(itertools.product(ALL_DTYPES, ALL_DTYPES)))
def test_update_on_cuda_against_float64(sd, pd):
    gen = torch.Generator().manual_seed(0)
    sizes = [0, 1, 7, 4097, 278011, 3_000_001]
    shadows = [rand(n, sd, gen, "cuda") for n in sizes]
    params = [rand(n, pd, gen, "cuda") for n in sizes]
    exact = [lerp_reference(s, p, 0.1) for s, p in zip(shadows, params)]
    before = [s.double().abs() + p.double().abs() for s, p in zip(shadows, params)]
    ema_update_(shadows, params, 0.1, backend="foreach")
    for s, e, mag in zip(shadows, exact, before):
        assert_rounded_close(s, e, mag, compute_dtype(sd, pd))


def _model():
    return nn.Sequential(nn.Linear(64, 256), nn.LayerNorm(256), nn.Linear(256, 64))


def test_shadows_on_cpu_for_a_cuda_model():
    model = _model().cuda().to(torch.bfloat16)
    ema = EMA(model, decay=0.5, device="cpu")
    assert all(s.device.type == "cpu" for _, s in ema.named_shadows())
    start = dict(ema.averaged_weights())
    with torch.no_grad():
        for p in model.parameters():
            p.add_(1.0)
    ema.update()
    for n, s in ema.named_shadows():
        expected = 0.5 * start[n] + 0.5 * model.state_dict()[n].float().cpu()
        torch.testing.assert_close(s, expected, rtol=1e-6, atol=1e-6)
    with ema.average_parameters():
        assert model[0].weight.device.type == "cuda"


def test_shadows_follow_a_model_moved_to_the_gpu():
    model = _model()
    ema = EMA(model, decay=0.5)
    model.cuda()
    ema.update()
    assert all(s.device.type == "cuda" for _, s in ema.named_shadows())
