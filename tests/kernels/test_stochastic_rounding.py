"""Stochastic rounding (csrc/stochastic.h): the Philox draws, the rounding rule, and the
C++ CPU kernel's three loops (scalar, AVX2, AVX-512) bit for bit against the torch
version (ema_fused/backends/stochastic.py) that the foreach fallback runs.

The rule is checked exhaustively over the 2**16 random numbers an element can draw: the
result is always one of the two 16-bit neighbours of the fp32 value, and its mean over
all draws is the value itself (exactly for bf16 and normal fp16 results; fp16
subnormals within 2**-16 ulp), which is what makes the rounding unbiased.
"""
from __future__ import annotations

import os

import pytest
import torch

from ema_fused.backends import stochastic as sr

from helpers.numerics import rand, seeded

# Random123's known-answer vectors for Philox4x32-10 (kat_vectors): counter, key, output
KAT = [((0, 0, 0, 0), (0, 0), (0x6627E8D5, 0xE169C58D, 0xBC57AC4C, 0x9B00DBD8)),
       ((0xFFFFFFFF,) * 4, (0xFFFFFFFF,) * 2, (0x408F276D, 0x41C83B0E, 0xA20BC7C6, 0x6D5451FD)),
       ((0x243F6A88, 0x85A308D3, 0x13198A2E, 0x03707344), (0xA4093822, 0x299F31D0),
        (0xD16CFE09, 0x94FDCCEB, 0x5001E420, 0x24126EA1))]
R = torch.arange(1 << 16, dtype=torch.int64)  # every 16-bit random number


@pytest.mark.parametrize("counter,key,out", KAT)
def test_philox_known_answers(counter, key, out):
    words = sr.philox(*[torch.tensor([c]) for c in counter], key[0] | key[1] << 32)
    assert [int(w) for w in words[0]] == list(out)


def test_random16_layout_eight_elements_per_draw():
    """Element e takes 16 bits of the draw of counter (e // 8, position, offset): bits
    16 * (e % 8) of the 128-bit output, low word first; any slice gives the same bits."""
    seed, offset, position = 0x0123456789ABCDEF, 2**40 + 5, 9
    whole = sr.random16(seed, offset, [(position, 0, 64)], torch.device("cpu"))
    for g in range(8):
        words = sr.philox(torch.tensor([g]), torch.tensor([position]),
                          torch.tensor([offset & 0xFFFFFFFF]), torch.tensor([offset >> 32]), seed)[0]
        want = [(int(words[j // 2]) >> (16 * (j % 2))) & 0xFFFF for j in range(8)]
        assert whole[8 * g:8 * g + 8].tolist() == want
    parts = sr.random16(seed, offset, [(position, 3, 20), (position, 23, 41)], torch.device("cpu"))
    assert torch.equal(parts, whole[3:])


def _neighbours(x: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """(toward zero, away from zero): the two 16-bit values around fp32 ``x``, as float64."""
    down = x.to(dtype)
    down = torch.where(down.double().abs() > x.double().abs(),
                       torch.nextafter(down, torch.zeros_like(down)), down)
    up = torch.where(down.double() == x.double(), down,
                     torch.nextafter(down, torch.where(x < 0, -float("inf"), float("inf")).to(dtype)))
    return down.double(), up.double()


def _samples(dtype: torch.dtype) -> torch.Tensor:
    gen = seeded("sr-samples", dtype)
    tiny = 2.0 ** -24 if dtype == torch.float16 else 2.0 ** -133
    vals = [rand(40, torch.float32, gen, scale=s) for s in (1e-3, 1.0, 300.0)]
    vals.append(rand(24, torch.float32, gen) * (2.0 ** -14 if dtype == torch.float16 else 2.0 ** -126))
    vals.append(rand(8, torch.float32, gen) * tiny * 3)  # deep subnormal results
    vals.append(torch.tensor([0.0, -0.0, 1.0, -2.5, 2.0 ** -14, 65504.0, 1.0 + 2.0 ** -20]))
    return torch.cat(vals)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
def test_every_draw_gives_a_neighbour_and_their_mean_is_the_value(dtype):
    x = _samples(dtype)
    finite_range = x.abs() <= torch.finfo(dtype).max
    x = x[finite_range]
    out = sr._ROUND[dtype](x[:, None].expand(-1, R.numel()).reshape(-1),
                           R.repeat(x.numel())).view(x.numel(), -1).double()
    down, up = _neighbours(x, dtype)
    assert bool(((out == down[:, None]) | (out == up[:, None])).all())
    mean = out.mean(1)
    ulp = (up - down).abs()
    if dtype == torch.bfloat16:
        assert torch.equal(mean, x.double())  # 16 dropped bits, 16 random ones: exact
    else:
        normal = x.abs() >= 2.0 ** -14
        assert torch.equal(mean[normal], x.double()[normal])
        err = (mean - x.double()).abs()[~normal]
        assert bool((err <= ulp[~normal] * 2.0 ** -16).all())  # remainder cut to 16 bits
    exact = down == up
    assert bool((out[exact] == x.double()[exact, None]).all())  # representable: unchanged
    assert bool((torch.signbit(out) == torch.signbit(x)[:, None]).all())  # -0 stays -0


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
def test_specials_round_as_nearest_never_at_random(dtype):
    """NaN gives the canonical NaN (as the nearest path: bf16 0x7FC0, fp16 0x7E00 with
    the sign), +-Inf stays, and a finite value beyond the largest finite 16-bit value
    rounds as nearest does (to that value, or to Inf from the halfway point on)."""
    big = torch.finfo(dtype).max
    half_ulp = 16.0 if dtype == torch.float16 else 2.0 ** 119
    x = torch.tensor([float("inf"), -float("inf"), big * 1.0000001, -big * 1.0000001,
                      big + half_ulp, -(big + half_ulp), 3.4028234663852886e38], dtype=torch.float32)
    out = sr._ROUND[dtype](x[:, None].expand(-1, 4096).reshape(-1),
                           R[::16].repeat(x.numel())).view(x.numel(), -1)
    assert torch.equal(out, x.to(dtype)[:, None].expand_as(out))
    nans = torch.tensor([float("nan"), -float("nan")], dtype=torch.float32)
    bits = sr._ROUND[dtype](nans, torch.tensor([0, 65535])).view(torch.int16).tolist()
    nan16 = 0x7FC0 if dtype == torch.bfloat16 else 0x7E00
    assert bits == [nan16, nan16 if dtype == torch.bfloat16 else (nan16 | 0x8000) - 0x10000]


def _isas() -> list[str]:
    """The CPU loops this machine can run (EMA_FUSED_SR_ISA picks one)."""
    import ema_fused.backends.extension as ext
    if not ext.load(build=False):
        return []
    flags = open("/proc/cpuinfo").read() if os.path.exists("/proc/cpuinfo") else ""
    return ["scalar"] + (["avx2"] if " avx2" in flags else []) + \
        (["avx512"] if " avx512f" in flags else [])


def _inputs(sd: torch.dtype, pd: torch.dtype, gen: torch.Generator):
    """Odd sizes, misaligned views, specials and values beyond the 16-bit range."""
    sizes = [1, 7, 8, 63, 64, 65, 129, 1000, 70001]
    shadows = [rand(n, torch.float32, gen).to(sd) for n in sizes]
    shadows.append(rand(300, torch.float32, gen).to(sd)[3:])
    params = [rand(n, torch.float32, gen, scale=4.0).to(pd) for n in sizes]
    params.append(rand(301, torch.float32, gen).to(pd)[4:])
    special = torch.tensor([float("nan"), float("inf"), -float("inf"), 0.0, -0.0, 1e-6,
                            -3e-8, 7e4, -1e5, 3e38]).to(pd)
    params[5][:special.numel()] = special
    return shadows, params


@pytest.mark.parametrize("skip", [False, True], ids=["plain", "skip_nonfinite"])
@pytest.mark.parametrize("pd", [torch.float32, torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("sd", [torch.bfloat16, torch.float16], ids=str)
def test_cpu_loops_give_the_torch_bits(monkeypatch, sd, pd, skip):
    """kernel_update_stochastic_ with each instruction set equals the torch version bit for
    bit, with nonzero starts (pieces of a tensor) and both sides of the two-sided lerp."""
    isas = _isas()
    if not isas:
        pytest.skip("the C++ extension is not built")
    gen = seeded("cpu-loops", sd, pd, skip)
    shadows, params = _inputs(sd, pd, gen)
    positions = list(range(3, 3 + len(shadows)))
    starts = [int(s) for s in torch.randint(0, 1 << 34, (len(shadows),), generator=gen)]
    seed, offset = 0xFEDCBA9876543210, 123456789012
    for w in (0.3, 0.75, 2.0 ** -12):
        spec = sr.rounding.Stochastic(seed, offset, tuple(positions), tuple(starts))
        want = [s.clone() for s in shadows]
        sr.update_(want, params, w, skip, spec, 1 << 20)
        for isa in isas:
            monkeypatch.setenv("EMA_FUSED_SR_ISA", isa)
            got = [s.clone() for s in shadows]
            torch.ops.ema_fused.kernel_update_stochastic_(got, params, w, skip, *spec.signed(),
                                                          positions, starts)
            for i, (g, e) in enumerate(zip(got, want)):
                assert torch.equal(g.view(torch.int16), e.view(torch.int16)), (isa, w, i)
