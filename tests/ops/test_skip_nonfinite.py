"""skip_nonfinite (issue 13, item 12): a NaN or +-Inf element of a param leaves its shadow
element as it was, decided inside the kernels, on every backend that can run here.

Each result is checked twice: against float64 (``where(isfinite(p), lerp, s)``), and
bit for bit against the same backend's plain update of the params with every
non-finite element replaced by its shadow's value (``lerp(s, s, w) == s`` exactly),
which pins the finite elements to exactly what the plain kernels compute.
"""
from __future__ import annotations

import itertools

import pytest
import torch
from torch import nn

from ema_fused import EMA, available_backends, ema_update_

from helpers.numerics import (assert_rounded_close, compute_dtype, lerp_reference, rand, requires_gpu,
                      seeded)

DTYPES = (torch.float32, torch.bfloat16, torch.float16)
PAIRS = list(itertools.product(DTYPES, DTYPES))
IDS = [f"{a}-{b}".replace("torch.", "") for a, b in PAIRS]
BACKENDS = ("foreach", "cpu", "triton")
SIZES = (0, 1, 7, 4097)


def usable(backend: str, device: str = "cpu") -> str:
    ok, why = available_backends(device)[backend]
    if not ok:
        pytest.skip(f"{backend} not usable on {device}: {why}")
    return backend


def poisoned(shape, dtype, gen, device="cpu") -> torch.Tensor:
    """Random values with NaN, +Inf and -Inf at about 1 in 5 places each."""
    x = rand(shape, dtype, gen, device)
    if x.numel():
        pick = torch.randint(0, 15, x.shape, generator=gen).to(device)
        x[pick == 0] = float("nan")
        x[pick == 1] = float("inf")
        x[pick == 2] = float("-inf")
    return x


def check(shadows, params, weight, backend):
    before = [s.clone() for s in shadows]
    clean = [torch.where(torch.isfinite(p), p.to(torch.promote_types(s.dtype, p.dtype)),
                         s.to(torch.promote_types(s.dtype, p.dtype)))
             for s, p in zip(shadows, params)]
    plain = [s.clone() for s in shadows]
    ema_update_(plain, clean, weight, backend=backend)
    ema_update_(shadows, params, weight, skip_nonfinite=True, backend=backend)
    for i, (s, b, p, pl) in enumerate(zip(shadows, before, params, plain)):
        bad = ~torch.isfinite(p)
        assert torch.equal(s[bad], b[bad]), f"tensor {i}: a non-finite param changed its shadow"
        assert bool(torch.isfinite(s).all()), f"tensor {i}: a non-finite shadow"
        assert torch.equal(s, pl), f"tensor {i}: differs from the plain update of clean params"
        exact = torch.where(bad, b.double(), lerp_reference(b, p.masked_fill(bad, 0), weight))
        mags = b.double().abs() + p.double().masked_fill(bad, 0).abs()
        assert_rounded_close(s, exact, mags, compute_dtype(s.dtype, p.dtype))


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("sd,pd", PAIRS, ids=IDS)
@pytest.mark.parametrize("weight", [0.3, 0.75, 1.0])
def test_every_pair_and_size(backend, sd, pd, weight):
    usable(backend)
    gen = seeded("skip", backend, sd, pd, weight)
    shadows = [rand((n,), sd, gen) for n in SIZES]
    params = [poisoned((n,), pd, gen) for n in SIZES]
    check(shadows, params, weight, backend)


@pytest.mark.parametrize("backend", BACKENDS)
def test_weight_zero_changes_nothing(backend):
    usable(backend)
    gen = seeded("skip-zero", backend)
    shadows = [rand((300,), torch.float32, gen)]
    before = shadows[0].clone()
    ema_update_(shadows, [poisoned((300,), torch.bfloat16, gen)], 0.0, skip_nonfinite=True,
                backend=backend)
    assert torch.equal(shadows[0], before)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("count", [1, 65, 111])
def test_many_tensors_misaligned_and_strided(backend, count):
    """Many tensors, misaligned views (storage offset 1: the kernels' head path) and a
    non-contiguous param (the fallback inside the same call)."""
    usable(backend)
    gen = seeded("skip-many", backend, count)
    shadows, params = [], []
    for i in range(count):
        n = 1 + (i * 37) % 300
        s = rand((n + 1,), torch.float32, gen)[1:]
        p = poisoned((n + 1,), torch.bfloat16, gen)[1:]
        shadows.append(s)
        params.append(p)
    shadows.append(rand((9, 6), torch.float32, gen))
    params.append(poisoned((6, 9), torch.float16, gen).t())
    check(shadows, params, 0.6, backend)


@pytest.mark.parametrize("backend", ("foreach", "cpu"))
def test_graph_safe_weight_tensor(backend):
    usable(backend)
    gen = seeded("skip-tensor-weight", backend)
    shadows = [rand((513,), torch.float32, gen), rand((7,), torch.bfloat16, gen)]
    params = [poisoned((513,), torch.bfloat16, gen), poisoned((7,), torch.float32, gen)]
    for w in (0.25, 1.0, 0.0):
        before = [s.clone() for s in shadows]
        expect = [s.clone() for s in shadows]
        ema_update_(expect, params, w, skip_nonfinite=True, backend=backend)
        ema_update_(shadows, params, torch.tensor([w]), skip_nonfinite=True, backend=backend)
        for s, e, b in zip(shadows, expect, before):
            assert torch.equal(s, e)
        del before


def test_skip_flag_must_be_a_bool():
    with pytest.raises(TypeError, match="skip_nonfinite must be a bool"):
        ema_update_([torch.zeros(2)], [torch.ones(2)], 0.5, skip_nonfinite="yes")


@pytest.mark.gpu
@requires_gpu()
@pytest.mark.parametrize("backend", ("cuda", "triton"))
@pytest.mark.parametrize("sd,pd", PAIRS, ids=IDS)
def test_gpu_every_pair(backend, sd, pd):
    usable(backend, "cuda")
    gen = seeded("skip-gpu", backend, sd, pd)
    for weight in (0.3, 0.75, 1.0):
        shadows = [rand((n,), sd, gen).cuda() for n in (0, 1, 7, 4097, 278011)]
        params = [poisoned((n,), pd, gen).cuda() for n in (0, 1, 7, 4097, 278011)]
        check(shadows, params, weight, backend)


# ---------------------------------------------------------------- EMA
def _model():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(8, 16), nn.Linear(16, 3))


@pytest.mark.parametrize("backend", ("foreach", "cpu", "triton"))
def test_one_nan_does_not_poison_the_average(backend):
    """The issue's case: one NaN in a param, then 500 clean updates.  Without the option
    the shadow stays NaN; with it, it equals the EMA that skipped that element once."""
    usable(backend)
    model = _model()
    plain = EMA(model, decay=0.99, backend=backend)
    ema = EMA(model, decay=0.99, backend=backend, skip_nonfinite=True)
    w = model[0].weight
    ref = w.detach().double().clone()
    gen = torch.Generator().manual_seed(1)
    for step in range(1, 502):
        with torch.no_grad():
            w.copy_(torch.randn(w.shape, generator=gen))
            if step == 10:
                w[3, 4] = float("nan")
        value = w.detach().double()
        ref = torch.where(torch.isfinite(value), ref + 0.01 * (value - ref), ref)
        plain.update()
        ema.update()
    shadow = dict(ema.named_shadows())["0.weight"]
    assert bool(torch.isnan(dict(plain.named_shadows())["0.weight"][3, 4]))
    assert bool(torch.isfinite(shadow).all())
    torch.testing.assert_close(shadow.double(), ref, rtol=0, atol=1e-5)


@pytest.mark.parametrize("backend", ("foreach", "cpu"))
def test_copying_steps_keep_the_shadow_of_non_finite_elements(backend):
    """Steps <= update_after_step copy the model: with skip_nonfinite an Inf element
    keeps the shadow it had (the initial copy of the weights) and the rest is copied
    exactly."""
    usable(backend)
    model = _model()
    start = model[1].bias.detach().clone()
    ema = EMA(model, decay=0.9, update_after_step=5, backend=backend, skip_nonfinite=True)
    with torch.no_grad():
        model[1].bias.copy_(torch.tensor([1.0, float("inf"), -2.0]))
    ema.update()
    shadow = dict(ema.named_shadows())["1.bias"]
    assert torch.equal(shadow, torch.tensor([1.0, start[1].item(), -2.0]))


def test_explicit_device_and_float8_copies():
    """An explicit shadow device, and a float8 buffer that is copied (never averaged):
    non-finite elements keep their shadows in both."""
    if not hasattr(torch, "float8_e4m3fn"):
        pytest.skip("no float8 in this torch")
    model = _model()
    model.register_buffer("scale8", torch.tensor([1.0, 2.0, 3.0]).to(torch.float8_e5m2))
    ema = EMA(model, decay=0.5, device="cpu", skip_nonfinite=True)
    with torch.no_grad():
        model.scale8.copy_(torch.tensor([4.0, float("nan"), 8.0]).to(torch.float8_e5m2))
        model[0].bias[0] = float("-inf")
    ema.update()
    shadows = dict(ema.named_shadows())
    assert shadows["scale8"].float().tolist() == [4.0, 2.0, 8.0]
    assert bool(torch.isfinite(shadows["0.bias"]).all())


def test_option_is_checked():
    with pytest.raises(TypeError, match="skip_nonfinite"):
        EMA(_model(), skip_nonfinite="no")


def test_bias_correction_is_refused_with_the_reason():
    """skip_nonfinite with bias_correction (issue 20, item 3): the correction divides by
    one global product of decays, so an element that skipped steps would be
    over-corrected (a constant 1.0 read back as 0.53 after one NaN).  The combination
    is refused at construction, and a checkpoint cannot bring it in."""
    with pytest.raises(ValueError, match=r"skip_nonfinite=True with bias_correction=True.*"
                                         r"over-correct"):
        EMA(_model(), skip_nonfinite=True, bias_correction=True)
    corrected = EMA(_model(), decay=0.9, bias_correction=True)
    corrected.update()
    ema = EMA(_model(), decay=0.9, skip_nonfinite=True)
    before = {n: s.clone() for n, s in ema.named_shadows()}
    with pytest.raises(ValueError, match="bias_correction"):
        ema.load_state_dict(corrected.state_dict())
    assert not ema.bias_correction and ema.num_updates == 0
    for name, s in ema.named_shadows():
        assert torch.equal(s, before[name]), name
