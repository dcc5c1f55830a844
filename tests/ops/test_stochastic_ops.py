"""``ema_update_`` / ``ema_multi_update_`` with ``rounding="stochastic"``: reproducible
(a function of seed, offset, tensor and element), the same bits on every backend that
runs here, unbiased, exact at the weight's ends, and refused with clear messages."""
from __future__ import annotations

import pytest
import torch

from ema_fused import ema_multi_update_, ema_update_

from helpers.numerics import rand, seeded

BACKENDS = ["cpu", "foreach"]
HALF = (torch.bfloat16, torch.float16)


def _bits(tensors):
    return [t.view(torch.int16) if t.element_size() == 2 else t for t in tensors]


def _same(a, b) -> bool:
    return all(torch.equal(x, y) for x, y in zip(_bits(a), _bits(b)))


def _pairs(gen, sd=torch.bfloat16, pd=torch.float32, sizes=(1, 7, 129, 4097, 70001)):
    shadows = [rand(n, torch.float32, gen).to(sd) for n in sizes]
    params = [rand(n, torch.float32, gen, scale=3.0).to(pd) for n in sizes]
    return shadows, params


def _run(shadows, params, weight, backend, **kw):
    out = [s.clone() for s in shadows]
    ema_update_(out, params, weight, rounding="stochastic", backend=backend, **kw)
    return out


@pytest.mark.parametrize("backend", BACKENDS)
def test_same_seed_and_offset_same_bits_other_seed_or_offset_other_bits(backend):
    shadows, params = _pairs(seeded("repro", backend))
    a = _run(shadows, params, 0.1, backend, seed=7, offset=3)
    assert _same(a, _run(shadows, params, 0.1, backend, seed=7, offset=3))
    for other in ({"seed": 8, "offset": 3}, {"seed": 7, "offset": 4}, {"seed": 7 + 2**32, "offset": 3},
                  {"seed": 7, "offset": 3 + 2**32}):
        b = _run(shadows, params, 0.1, backend, **other)
        assert not torch.equal(a[-1], b[-1]), other  # 70001 elements: some differ
        # every result is one of the two neighbours either way
        assert bool(((a[-1].float() - b[-1].float()).abs() <=
                     2 * torch.finfo(torch.bfloat16).eps * a[-1].float().abs() + 1e-30).all())


@pytest.mark.parametrize("sd", HALF, ids=str)
@pytest.mark.parametrize("pd", [torch.float32, torch.bfloat16, torch.float16, torch.float64],
                         ids=str)
def test_cpu_and_foreach_give_the_same_bits(sd, pd):
    """Every backend that runs here gives the same bits (Triton and the CUDA tile engine:
    tests/kernels).  A float64 param goes to the torch code inside the cpu backend too."""
    gen = seeded("backends", sd, pd)
    shadows, params = _pairs(gen, sd, pd)
    shadows.append(rand((9, 13), torch.float32, gen).to(sd).t())  # non-contiguous: torch code
    params.append(rand((13, 9), torch.float32, gen).to(pd))
    for w in (0.01, 0.6):
        runs = [_run(shadows, params, w, b, seed=2**63 + 5, offset=2**40) for b in BACKENDS]
        assert _same(runs[0], runs[1])


@pytest.mark.parametrize("backend", BACKENDS)
def test_the_ends_are_exact_and_wider_shadows_round_as_nearest(backend):
    gen = seeded("ends", backend)
    shadows, params = _pairs(gen, torch.bfloat16, torch.bfloat16)
    assert _same(_run(shadows, params, 0.0, backend, seed=1, offset=1), shadows)
    assert _same(_run(shadows, params, 1.0, backend, seed=1, offset=1), params)
    wide = [rand(n, torch.float32, gen) for n in (5, 300)]
    wide_p = [rand(n, torch.bfloat16, gen) for n in (5, 300)]
    nearest = [s.clone() for s in wide]
    ema_update_(nearest, wide_p, 0.3, backend=backend)
    mixed = _run(wide + shadows, wide_p + params, 0.3, backend, seed=1, offset=1)
    assert _same(mixed[:2], nearest)  # fp32 shadows: nothing to round, the nearest update


@pytest.mark.parametrize("backend", BACKENDS)
def test_a_tensor_draws_by_its_position_in_the_list(backend):
    """shadows[i] draws with position i: the same pair at another index gets other bits,
    and at the same index the same bits whatever else the call holds."""
    shadows, params = _pairs(seeded("position", backend), sizes=(4097, 4097))
    both = _run(shadows, params, 0.05, backend, seed=3, offset=9)
    first = _run(shadows[:1], params[:1], 0.05, backend, seed=3, offset=9)
    assert _same(both[:1], first)
    swapped = _run(shadows[::-1], params[::-1], 0.05, backend, seed=3, offset=9)
    assert not torch.equal(swapped[1], both[0])


@pytest.mark.parametrize("backend", BACKENDS)
def test_skip_nonfinite_keeps_those_shadow_elements(backend):
    gen = seeded("skip", backend)
    shadows, params = _pairs(gen, torch.bfloat16, torch.float32, sizes=(4099,))
    params[0][::7] = float("nan")
    params[0][3::11] = float("inf")
    out = _run(shadows, params, 0.2, backend, seed=4, offset=1, skip_nonfinite=True)
    bad = ~torch.isfinite(params[0])
    assert torch.equal(out[0][bad], shadows[0][bad])
    clean = [torch.where(bad, shadows[0].float(), params[0])]
    assert torch.equal(out[0][~bad], _run(shadows, clean, 0.2, backend, seed=4, offset=1)[0][~bad])


def test_the_mean_over_seeds_is_the_fp32_result():
    """The rounding is unbiased: over 2000 seeds the mean of each element is its fp32
    result to within the standard error of a one-ulp Bernoulli mean, where the nearest
    update does not move the shadow at all (the step is under half an ulp)."""
    gen = seeded("mean")
    shadow = (1.0 + rand(64, torch.float32, gen).abs()).to(torch.bfloat16)
    param = shadow.float() + rand(64, torch.float32, gen, scale=2.0)
    w = 2.0 ** -12
    exact = shadow.float() + (param - shadow.float()) * w
    seeds = 2000
    shadows = [shadow.clone() for _ in range(seeds)]
    ema_multi_update_([[s] for s in shadows], [param], [w] * seeds, rounding="stochastic",
                      seed=11, offset=0, backend="cpu")
    mean = torch.stack([s.double() for s in shadows]).mean(0)
    ulp = torch.finfo(torch.bfloat16).eps * shadow.double().abs()
    assert bool(((mean - exact.double()).abs() <= 5 * ulp / seeds ** 0.5).all())
    assert bool(((exact.double() - shadow.double()).abs() < ulp / 2).all())
    nearest = shadow.clone()
    ema_update_([nearest], [param], w)
    assert torch.equal(nearest, shadow)  # the nearest update is lost at this weight


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("sd", HALF, ids=str)
def test_multi_update_equals_k_single_updates(backend, sd):
    gen = seeded("multi", backend, sd)
    params = [rand(n, torch.float32, gen) for n in (3, 4097, 9000)]
    params.append(rand(50, torch.float64, gen))  # the torch code's pair
    weights = [0.3, 0.0, 1.0, 0.7, 2.0 ** -10]
    profiles = [[rand(p.numel(), torch.float32, gen).to(sd) for p in params] for _ in weights]
    profiles[3][0] = profiles[3][0].float()  # a wider shadow: nearest
    seeds = [5, 2**64 - 1, 17, 0, 99]
    expected = []
    for k, w in enumerate(weights):
        one = [s.clone() for s in profiles[k]]
        ema_update_(one, params, w, rounding="stochastic", seed=seeds[k], offset=42,
                    backend=backend)
        expected.append(one)
    ema_multi_update_(profiles, params, weights, rounding="stochastic", seed=seeds, offset=42,
                      backend=backend)
    for got, want in zip(profiles, expected):
        assert _same(got, want)
    again = [[s.clone() for s in p] for p in expected]
    single = [[s.clone() for s in p] for p in expected]
    ema_multi_update_(again, params, weights, rounding="stochastic", seed=5, offset=43,
                      backend=backend)  # one seed: profile k draws with seed + k
    for k, w in enumerate(weights):
        ema_update_(single[k], params, w, rounding="stochastic", seed=5 + k, offset=43,
                    backend=backend)
        assert _same(again[k], single[k])


def test_errors_are_clear_and_write_nothing():
    gen = seeded("errors")
    shadows, params = _pairs(gen, sizes=(5,))
    before = shadows[0].clone()
    with pytest.raises(TypeError, match="needs seed= .* and offset="):
        ema_update_(shadows, params, 0.5, rounding="stochastic", seed=1)
    with pytest.raises(ValueError, match="rounding must be 'nearest' or 'stochastic'"):
        ema_update_(shadows, params, 0.5, rounding="up", seed=1, offset=1)
    with pytest.raises(ValueError, match="seed= and offset= are for rounding='stochastic'"):
        ema_update_(shadows, params, 0.5, seed=1, offset=1)
    with pytest.raises(ValueError, match=r"seed must be an integer in \[0, 2\*\*64\)"):
        ema_update_(shadows, params, 0.5, rounding="stochastic", seed=-1, offset=1)
    with pytest.raises(TypeError, match="offset must be an integer"):
        ema_update_(shadows, params, 0.5, rounding="stochastic", seed=1, offset=1.5)
    with pytest.raises(TypeError, match="graph-safe tensor weight is not supported"):
        ema_update_(shadows, params, torch.tensor([0.5]), rounding="stochastic", seed=1, offset=1)
    with pytest.raises(ValueError, match="2 seeds for 3 profiles"):
        ema_multi_update_([shadows] * 3, params, [0.1] * 3, rounding="stochastic", seed=[1, 2],
                          offset=0)
    with pytest.raises(ValueError, match=r"weight must be in \[0.0, 1.0\]"):
        ema_update_(shadows, params, 1.5, rounding="stochastic", seed=1, offset=1)
    assert torch.equal(shadows[0], before)


def test_kernel_op_refuses_float32_shadows_and_bad_counters():
    pytest.importorskip("ema_fused._C")
    op = torch.ops.ema_fused.kernel_update_stochastic_
    s, p = [torch.zeros(4)], [torch.ones(4)]
    with pytest.raises(RuntimeError, match=r"shadows\[0\] is float32; stochastic rounding"):
        op(s, p, 0.5, False, 1, 1, [0], [0])
    s = [torch.zeros(4, dtype=torch.bfloat16)]
    with pytest.raises(ValueError, match=r"1 tensors but 2 positions"):
        op(s, p, 0.5, False, 1, 1, [0, 1], [0])
    with pytest.raises(ValueError, match=r"positions\[0\] = 4294967296 is not in \[0, 2\^32\)"):
        op(s, p, 0.5, False, 1, 1, [2**32], [0])
    with pytest.raises(ValueError, match=r"reach past element 2\^35"):
        op(s, p, 0.5, False, 1, 1, [0], [2**35 - 2])
    assert not s[0].any()
