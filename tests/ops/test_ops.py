"""The functional ops ``ema_update_`` / ``ema_copy_`` against float64 references."""
from __future__ import annotations

import itertools
import zlib

import pytest
import torch

from ema_fused import ema_copy_, ema_update_
from ema_fused.backends import foreach as fallback

from helpers.numerics import ALL_DTYPES, assert_rounded_close, compute_dtype, lerp_reference, rand

PAIRS = list(itertools.product(ALL_DTYPES, ALL_DTYPES))
SIZES = (0, 1, 7, 4097, 278011)


def _check_update(shadows, params, weight, backend="auto"):
    before = [s.clone() for s in shadows]
    exact = [lerp_reference(s, p, weight) for s, p in zip(shadows, params)]
    ema_update_(shadows, params, weight, backend=backend)
    for s, b, p, e in zip(shadows, before, params, exact):
        mag = b.double().abs() + p.double().abs()
        assert_rounded_close(s, e, mag, compute_dtype(s.dtype, p.dtype))


@pytest.mark.parametrize("sd,pd", PAIRS, ids=[f"{a}-{b}".replace("torch.", "") for a, b in PAIRS])
@pytest.mark.parametrize("weight", [0.3, 1e-4, 0.9999])
def test_update_every_dtype_pair_and_size(sd, pd, weight):
    gen = torch.Generator().manual_seed(zlib.crc32(f"{sd}{pd}{weight}".encode()))
    shadows = [rand(n, sd, gen) for n in SIZES]
    params = [rand(n, pd, gen) for n in SIZES]
    _check_update(shadows, params, weight, backend="foreach")


@pytest.mark.parametrize("count", [1, 63, 64, 65, 111, 500])
def test_update_many_tensors_of_mixed_dtypes(count):
    gen = torch.Generator().manual_seed(count)
    shapes = [tuple(torch.randint(1, 9, (int(torch.randint(1, 4, (1,), generator=gen)),),
                                  generator=gen).tolist()) for _ in range(count)]
    dts = [PAIRS[int(i)] for i in torch.randint(0, len(PAIRS), (count,), generator=gen)]
    shadows = [rand(sh, sd, gen) for sh, (sd, _) in zip(shapes, dts)]
    params = [rand(sh, pd, gen) for sh, (_, pd) in zip(shapes, dts)]
    _check_update(shadows, params, 0.25)


def test_update_in_pieces_smaller_than_the_tensors(monkeypatch):
    monkeypatch.setattr(fallback, "CPU_PIECE", 64)  # many pieces, rows cut, oversized rows
    gen = torch.Generator().manual_seed(1)
    shapes = [(100,), (10, 33), (3000,), (1,), (0,), (2, 500), (17,), (), (7, 9, 11)]
    for sd, pd in [(torch.float32, torch.bfloat16), (torch.bfloat16, torch.float32),
                   (torch.float16, torch.bfloat16)]:
        _check_update([rand(n, sd, gen) for n in shapes], [rand(n, pd, gen) for n in shapes], 0.1)
        dst = [rand(n, sd, gen) for n in shapes]
        src = [rand(n, pd, gen) for n in shapes]
        ema_copy_(dst, src, 0.5)
        for d, s in zip(dst, src):
            exact = s.double() * 0.5
            assert_rounded_close(d, exact, exact.abs(), compute_dtype(d.dtype, s.dtype))


def test_pieces_cover_every_element_once():
    a = torch.arange(5 * 7 * 3).view(5, 7, 3).transpose(0, 1)  # non-contiguous
    pairs = [(a, a.clone()), (torch.zeros(4), torch.zeros(4)), (torch.zeros(()), torch.zeros(()))]
    seen = torch.zeros(a.numel(), dtype=torch.int64)
    for budget in (1, 10, 20, 1000):
        seen.zero_()
        for piece in fallback.pieces(pairs, budget):
            assert sum(x.numel() for x, _ in piece) <= max(budget, 15)
            for x, y in piece:
                assert x.shape == y.shape
                if x.numel() and x.dim() == 3:
                    seen[x.reshape(-1)] += 1
        assert bool((seen == 1).all())


VIEWS = {
    "offset-2d": lambda t: t[1:, 3:],
    "transposed": lambda t: t.t()[5:9],
    "strided": lambda t: t[::3, ::2],
    "misaligned-1d": lambda t: t.view(-1)[1:500],
}


@pytest.mark.parametrize("view", VIEWS)
@pytest.mark.parametrize("contiguous_param", [True, False])
def test_update_views_write_only_their_elements(view, contiguous_param):
    gen = torch.Generator().manual_seed(2)
    base = rand((37, 41), torch.float32, gen)
    before = base.clone()
    shadow = VIEWS[view](base)
    if contiguous_param:
        param = rand(shadow.shape, torch.bfloat16, gen)
    else:  # a strided view of a bigger tensor
        param = rand(tuple(2 * n for n in shadow.shape), torch.bfloat16, gen)[
            tuple(slice(None, None, 2) for _ in shadow.shape)]
        assert not param.is_contiguous()
    _check_update([shadow], [param], 0.5)
    outside = torch.ones_like(base, dtype=torch.bool)
    VIEWS[view](outside).fill_(False)
    assert torch.equal(base[outside], before[outside]), "wrote outside the view"
    assert not torch.equal(base, before)


def test_weight_zero_and_one():
    gen = torch.Generator().manual_seed(3)
    s = rand(33, torch.float32, gen)
    p = rand(33, torch.bfloat16, gen)
    keep = s.clone()
    ema_update_([s], [p], 0.0)
    assert torch.equal(s, keep)
    ema_update_([s], [p], 1.0)
    assert torch.equal(s, p.float())


def test_empty_lists_and_empty_tensors():
    ema_update_([], [], 0.5)
    ema_copy_([], [], 2.0)
    s = torch.empty(0, 3)
    ema_update_([s], [torch.empty(0, 3, dtype=torch.bfloat16)], 0.5)
    assert s.shape == (0, 3)


@pytest.mark.parametrize("dd,sd", PAIRS, ids=[f"{a}-{b}".replace("torch.", "") for a, b in PAIRS])
@pytest.mark.parametrize("scale", [1.0, 1.7])
def test_copy_every_dtype_pair(dd, sd, scale):
    gen = torch.Generator().manual_seed(zlib.crc32(f"{dd}{sd}{scale}".encode()))
    src = [rand(n, sd, gen) for n in SIZES]
    dst = [rand(n, dd, gen) for n in SIZES]
    ema_copy_(dst, src, scale)
    for d, s in zip(dst, src):
        exact = s.double() * scale
        assert_rounded_close(d, exact, exact.abs(), compute_dtype(d.dtype, s.dtype))


def test_copy_into_non_contiguous_destination():
    gen = torch.Generator().manual_seed(4)
    base = torch.zeros(20, 30, dtype=torch.bfloat16)
    src = rand((30, 10), torch.float32, gen)
    ema_copy_([base[:10].t()], [src], 0.5)
    assert torch.equal(base[:10].t(), (src * 0.5).bfloat16())
    assert not bool(base[10:].any())
