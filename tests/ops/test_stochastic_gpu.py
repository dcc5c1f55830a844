"""Stochastic rounding on a GPU (skipped without one): the ``cuda`` tile engine and the
Triton kernel give, for the same inputs, seed and offset, exactly the bits of the ``cpu``
backend (every 16-bit shadow dtype with every param dtype, odd sizes, empty tensors, many
tensors, misaligned views, the skip_nonfinite path); a multi update equals K single
updates; an EMA trained on the GPU equals the same EMA trained on the CPU, bit for bit,
and resumes bit for bit.  On the CPU the same contract is checked through the Triton
interpreter and the tile code's emulation (tests/kernels)."""
from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from ema_fused import EMA, ema_multi_update_, ema_update_

from helpers.gpu import gpu_backend
from helpers.numerics import rand, requires_gpu, seeded

GPU_BACKENDS = ("cuda", "triton")
HALF = (torch.bfloat16, torch.float16)
PARAM_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
SIZES = (0, 1, 7, 129, 4097, 70001, 1 << 20 | 3)

pytestmark = [pytest.mark.gpu, requires_gpu()]


def _bits(tensors):
    return [t.cpu().view(torch.int16) if t.element_size() == 2 else t.cpu() for t in tensors]


def _assert_same(got, want, what: str) -> None:
    for i, (g, w) in enumerate(zip(_bits(got), _bits(want))):
        if not torch.equal(g, w):
            bad = int((g != w).sum())
            raise AssertionError(f"{what}: tensor {i} ({g.numel()} elements) differs in "
                                 f"{bad} elements from the cpu backend")


def _pairs(gen, sd, pd, sizes=SIZES):
    shadows = [rand(n, torch.float32, gen).to(sd) for n in sizes]
    params = [rand(n, torch.float32, gen, scale=3.0).to(pd) for n in sizes]
    return shadows, params


def _on_cpu_and_gpu(shadows, params, weight, backend, **kw):
    """(the cpu backend's result on CPU copies, ``backend``'s result on the GPU)."""
    want = [s.clone() for s in shadows]
    ema_update_(want, params, weight, rounding="stochastic", backend="cpu", **kw)
    got = [s.cuda() for s in shadows]
    ema_update_(got, [p.cuda() for p in params], weight, rounding="stochastic",
                backend=backend, **kw)
    return want, got


@pytest.mark.parametrize("backend", GPU_BACKENDS)
@pytest.mark.parametrize("pd", PARAM_DTYPES, ids=str)
@pytest.mark.parametrize("sd", HALF, ids=str)
def test_gpu_bits_equal_the_cpu_backend(backend, sd, pd):
    gpu_backend(backend)
    gen = seeded("sr-gpu", backend, sd, pd)
    shadows, params = _pairs(gen, sd, pd)
    for weight, seed, offset in ((0.01, 7, 1), (0.6, 2**63 + 5, 2**40), (2.0 ** -14, 0, 3)):
        want, got = _on_cpu_and_gpu(shadows, params, weight, backend, seed=seed, offset=offset)
        _assert_same(got, want, f"{backend} {sd}<-{pd} weight {weight}")
    # the ends: weight 0 writes nothing, weight 1 copies
    for weight, expected in ((0.0, shadows), (1.0, [p.to(sd) for p in params])):
        _, got = _on_cpu_and_gpu(shadows, params, weight, backend, seed=1, offset=1)
        _assert_same(got, expected, f"{backend} weight {weight}")


@pytest.mark.parametrize("backend", GPU_BACKENDS)
def test_many_tensors_and_misaligned_views(backend):
    """300 tensors in one call (several launches' worth of table), and views that start
    one element past an aligned address: position and element index as on the CPU."""
    gpu_backend(backend)
    gen = seeded("sr-gpu-many", backend)
    sizes = [int(n) for n in torch.randint(0, 5000, (300,), generator=gen)]
    shadows, params = _pairs(gen, torch.bfloat16, torch.float32, sizes)
    want, got = _on_cpu_and_gpu(shadows, params, 0.05, backend, seed=3, offset=9)
    _assert_same(got, want, f"{backend} 300 tensors")
    base_s = rand(40000, torch.float32, gen).to(torch.bfloat16)
    base_p = rand(40000, torch.float32, gen)
    views_s = [base_s[1:20001], base_s[20003:]]
    views_p = [base_p[5:20005], base_p[20001:39998]]
    want = [v.clone() for v in views_s]
    ema_update_(want, views_p, 0.2, rounding="stochastic", seed=11, offset=2, backend="cpu")
    gs, gp = base_s.cuda(), base_p.cuda()
    got = [gs[1:20001], gs[20003:]]
    ema_update_(got, [gp[5:20005], gp[20001:39998]], 0.2, rounding="stochastic", seed=11,
                offset=2, backend=backend)
    _assert_same(got, want, f"{backend} misaligned views")
    assert torch.equal(gs[20001:20003].cpu().view(torch.int16),
                       base_s[20001:20003].view(torch.int16))  # the gap is untouched


@pytest.mark.parametrize("backend", GPU_BACKENDS)
def test_skip_nonfinite_on_the_gpu(backend):
    gpu_backend(backend)
    gen = seeded("sr-gpu-skip", backend)
    shadows, params = _pairs(gen, torch.bfloat16, torch.float32, sizes=(4099, 70001))
    for p in params:
        p[::7] = float("nan")
        p[3::11] = float("inf")
    want, got = _on_cpu_and_gpu(shadows, params, 0.2, backend, seed=4, offset=1,
                                skip_nonfinite=True)
    _assert_same(got, want, f"{backend} skip_nonfinite")
    bad = ~torch.isfinite(params[0])
    assert torch.equal(got[0].cpu()[bad].view(torch.int16), shadows[0][bad].view(torch.int16))


@pytest.mark.parametrize("backend", GPU_BACKENDS)
@pytest.mark.parametrize("sd", HALF, ids=str)
def test_gpu_multi_update_equals_k_single_cpu_updates(backend, sd):
    gpu_backend(backend)
    gen = seeded("sr-gpu-multi", backend, sd)
    params = [rand(n, torch.float32, gen) for n in (0, 3, 4097, 70001)]
    weights = [0.3, 0.0, 1.0, 0.7, 2.0 ** -10]
    profiles = [[rand(p.numel(), torch.float32, gen).to(sd) for p in params] for _ in weights]
    seeds = [5, 2**64 - 1, 17, 0, 99]
    expected = []
    for k, w in enumerate(weights):
        one = [s.clone() for s in profiles[k]]
        ema_update_(one, params, w, rounding="stochastic", seed=seeds[k], offset=42,
                    backend="cpu")
        expected.append(one)
    on_gpu = [[s.cuda() for s in prof] for prof in profiles]
    ema_multi_update_(on_gpu, [p.cuda() for p in params], weights, rounding="stochastic",
                      seed=seeds, offset=42, backend=backend)
    for k, (got, want) in enumerate(zip(on_gpu, expected)):
        _assert_same(got, want, f"{backend} profile {k}")


def _model(device) -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(64, 129), nn.LayerNorm(129), nn.Linear(129, 7)).to(
        device=device, dtype=torch.bfloat16)


def _train(model, ema, steps, start=0):
    gen = torch.Generator().manual_seed(1234 + start)
    for _ in range(steps):
        with torch.no_grad():
            for p in model.parameters():
                p.add_(torch.randn(p.shape, generator=gen).to(p), alpha=1e-2)
        ema.update()


def _shadows(ema):
    return [t for _, t in ema.named_shadows()]


@pytest.mark.parametrize("backend", GPU_BACKENDS)
def test_gpu_ema_equals_the_cpu_ema_and_resumes_bit_for_bit(backend):
    gpu_backend(backend)
    kw = dict(decay=0.999, dtype=torch.bfloat16, rounding="stochastic", seed=2024)
    cpu_model, gpu_model = _model("cpu"), _model("cuda")
    cpu_ema = EMA(cpu_model, backend="cpu", **kw)
    gpu_ema = EMA(gpu_model, backend=backend, **kw)
    _train(cpu_model, cpu_ema, 30)
    _train(gpu_model, gpu_ema, 30)
    _assert_same(_shadows(gpu_ema), _shadows(cpu_ema), f"{backend} EMA after 30 steps")
    state = copy.deepcopy(gpu_ema.state_dict())
    params_at_30 = [p.detach().clone() for p in gpu_model.parameters()]
    _train(cpu_model, cpu_ema, 20, start=30)
    _train(gpu_model, gpu_ema, 20, start=30)
    _assert_same(_shadows(gpu_ema), _shadows(cpu_ema), f"{backend} EMA after 50 steps")
    with torch.no_grad():
        for p, v in zip(gpu_model.parameters(), params_at_30):
            p.copy_(v)
    resumed = EMA(gpu_model, backend=backend, **{**kw, "seed": 1})
    resumed.load_state_dict(state)  # takes the checkpoint's seed and step
    _train(gpu_model, resumed, 20, start=30)
    _assert_same(_shadows(resumed), _shadows(cpu_ema), f"{backend} resumed at 30, after 50")
