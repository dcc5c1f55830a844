"""The Triton kernels on views off the 16-byte grid, through Triton's interpreter: a head
tile aligns `a`, then full tiles run with vectors for both sides or for `a` only, and the
last partial tile is masked (``triton_kernels/ema_kernels.py``).  Every kernel (update,
copy, swap, weighted sum), every dtype pair, against float64, with the memory around each
view untouched.  test_triton.py checks in the sm_90 PTX that each path's accesses are
what they should be (vectors on the unaligned body path).
"""
from __future__ import annotations

import itertools

import pytest
import torch

from ema_fused import available_backends, ema_copy_, ema_swap_, ema_update_, ema_weighted_sum_

from helpers.numerics import assert_rounded_close, compute_dtype, lerp_reference, rand, seeded

triton = pytest.importorskip("triton")
pytestmark = pytest.mark.skipif(not available_backends("cpu")["triton"][0],
                                reason=available_backends("cpu")["triton"][1])

from ema_fused.triton_kernels import launch  # noqa: E402  (after the skip checks)

KERNEL_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
PAIRS = list(itertools.product(KERNEL_DTYPES, KERNEL_DTYPES))
IDS = [f"{a}-{b}".replace("torch.", "") for a, b in PAIRS]
B = launch.BLOCK
# (a, b) start offsets in elements from an aligned allocation: a head with b on the grid
# after it or not, b alone off the grid, both off by the same bytes, by different ones
OFFSETS = [(1, 0), (0, 1), (1, 1), (3, 5), (6, 2)]
SIZES = (1, 3, 2 * B + 9)  # shorter than a head, a head only, head + full tiles + tail


def _views(dtype_a, dtype_b, offset_a, offset_b, gen):
    """Views of ``SIZES`` elements at the offsets, into buffers 8 elements longer; the
    buffers are returned too (to check that nothing around a view changed)."""
    bufs, views = [], []
    for n in SIZES:
        ba, bb = rand(n + 8, dtype_a, gen), rand(n + 8, dtype_b, gen)
        bufs.append((ba, bb, ba.clone(), bb.clone()))
        views.append((ba[offset_a:offset_a + n], bb[offset_b:offset_b + n]))
    return views, bufs


def _untouched_outside(bufs, offset_a, offset_b, b_written=False) -> None:
    for (ba, bb, a0, b0), n in zip(bufs, SIZES):
        assert torch.equal(ba[:offset_a], a0[:offset_a])
        assert torch.equal(ba[offset_a + n:], a0[offset_a + n:])
        if b_written:
            assert torch.equal(bb[:offset_b], b0[:offset_b])
            assert torch.equal(bb[offset_b + n:], b0[offset_b + n:])
        else:
            assert torch.equal(bb, b0)


@pytest.mark.parametrize("offsets", OFFSETS, ids=[f"a{a}-b{b}" for a, b in OFFSETS])
@pytest.mark.parametrize("sd,pd", PAIRS, ids=IDS)
def test_update_on_misaligned_views(sd, pd, offsets):
    views, bufs = _views(sd, pd, *offsets, seeded("update-views", sd, pd, offsets))
    shadows, params = [s for s, _ in views], [p for _, p in views]
    exact = [lerp_reference(s, p, 0.3) for s, p in views]
    mags = [s.double().abs() + p.double().abs() for s, p in views]
    ema_update_(shadows, params, 0.3, backend="triton")
    for s, e, m in zip(shadows, exact, mags):
        assert_rounded_close(s, e, m, compute_dtype(sd, pd))
    _untouched_outside(bufs, *offsets)


@pytest.mark.parametrize("offsets", OFFSETS, ids=[f"a{a}-b{b}" for a, b in OFFSETS])
@pytest.mark.parametrize("dd,sd", PAIRS, ids=IDS)
def test_copy_on_misaligned_views(dd, sd, offsets):
    views, bufs = _views(dd, sd, *offsets, seeded("copy-views", dd, sd, offsets))
    ema_copy_([d for d, _ in views], [s for _, s in views], 1.5, backend="triton")
    for d, s in views:
        exact = s.double() * 1.5
        assert_rounded_close(d, exact, exact.abs(), compute_dtype(dd, sd))
    _untouched_outside(bufs, *offsets)


@pytest.mark.parametrize("offsets", OFFSETS, ids=[f"a{a}-b{b}" for a, b in OFFSETS])
@pytest.mark.parametrize("dtype", KERNEL_DTYPES, ids=lambda d: str(d).replace("torch.", ""))
def test_swap_on_misaligned_views(dtype, offsets):
    views, bufs = _views(dtype, dtype, *offsets, seeded("swap-views", dtype, offsets))
    before = [(a.clone(), b.clone()) for a, b in views]
    ema_swap_([a for a, _ in views], [b for _, b in views], backend="triton")
    for (a, b), (a0, b0) in zip(views, before):
        assert torch.equal(a, b0) and torch.equal(b, a0)
    _untouched_outside(bufs, *offsets, b_written=True)


@pytest.mark.parametrize("offsets", OFFSETS, ids=[f"a{a}-b{b}" for a, b in OFFSETS])
@pytest.mark.parametrize("xd", KERNEL_DTYPES, ids=lambda d: str(d).replace("torch.", ""))
def test_weighted_sum_on_misaligned_views(xd, offsets):
    views, bufs = _views(torch.float32, xd, *offsets, seeded("sum-views", xd, offsets))
    exact = [o.double() - 0.75 * x.double() for o, x in views]
    mags = [o.double().abs() + 0.75 * x.double().abs() for o, x in views]
    ema_weighted_sum_([o for o, _ in views], [x for _, x in views], -0.75, backend="triton")
    for (o, _), e, m in zip(views, exact, mags):
        assert_rounded_close(o, e, m, torch.float32)
    _untouched_outside(bufs, *offsets)


@pytest.mark.parametrize("a_dtype,b_dtype,offset_a,offset_b,head,on_grid", [
    (torch.float32, torch.float32, 0, 0, 0, True),
    (torch.float32, torch.float32, 1, 1, 3, True),  # equally misaligned: one head aligns both
    (torch.float32, torch.bfloat16, 1, 1, 3, False),  # b 2 + 6 bytes after the head
    (torch.float32, torch.bfloat16, 1, 5, 3, True),  # b 10 + 6 bytes: on the grid too
    (torch.bfloat16, torch.float32, 5, 0, 3, False),
    (torch.float16, torch.float16, 0, 3, 0, False),  # a aligned, b not: no head
])
def test_the_table_gives_a_head_then_tiles_on_the_grid(a_dtype, b_dtype, offset_a, offset_b,
                                                       head, on_grid):
    n = 2 * B + 9
    a = torch.zeros(n + 8, dtype=a_dtype)[offset_a:offset_a + n]
    b = torch.zeros(n + 8, dtype=b_dtype)[offset_b:offset_b + n]
    pb_after_head = b.data_ptr() + head * b.element_size()
    assert on_grid == (pb_after_head % 16 == 0)  # the cases say what they claim
    plan = launch.Plan([(a, b)], a.device)
    layout = int(plan.tensors[0, 5])
    assert (layout >> 1, bool(layout & 1)) == (head, on_grid)
    starts = plan.tiles[:, 1].tolist()
    body = list(range(head, n, B))
    assert starts == ([0] if head else []) + body
    assert all((a.data_ptr() + s * a.element_size()) % 16 == 0 for s in body)
