"""The CUDA kernels' tile engine (csrc/multi_tensor.h), run on the CPU.

``tests/csrc/cuda_emulation.cpp`` builds the same table words and runs the same
per-thread tile code as ``csrc/cuda_kernels.cu``, block by block and thread by
thread, so the table layout, tile decoding, dtype dispatch, vector path and tails
are checked against float64 on machines without a GPU.  (The launch, the table cache
and the streams are checked by the GPU tests.)
"""
from __future__ import annotations

import itertools
import os
import sys

import pytest
import torch

from conftest import assert_rounded_close, compute_dtype, lerp_reference, rand, seeded

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DTYPES = (torch.float32, torch.bfloat16, torch.float16)
PAIRS = list(itertools.product(DTYPES, DTYPES))
IDS = [f"{a}-{b}".replace("torch.", "") for a, b in PAIRS]
TILE = 4096  # kTile in multi_tensor.h
SIZES = (0, 1, 7, TILE - 1, TILE, TILE + 1, 3 * TILE, 278011)


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    pytest.importorskip("ninja")
    from torch.utils.cpp_extension import load
    path = os.environ.get("PATH", "")
    os.environ["PATH"] = os.path.dirname(sys.executable) + os.pathsep + path
    try:
        load(name="ema_fused_cuda_emulation",
             sources=[os.path.join(ROOT, "tests", "csrc", "cuda_emulation.cpp")],
             extra_include_paths=[os.path.join(ROOT, "csrc")], extra_cflags=["-O2"],
             build_directory=str(tmp_path_factory.mktemp("emulation")), is_python_module=False)
    finally:
        os.environ["PATH"] = path
    return torch.ops.ema_fused_emulation.run_



@pytest.mark.parametrize("sd,pd", PAIRS, ids=IDS)
def test_update_every_pair(run, sd, pd):
    gen = seeded("u", sd, pd)
    shadows = [rand(n, sd, gen) for n in SIZES]
    params = [rand(n, pd, gen) for n in SIZES]
    exact = [lerp_reference(s, p, 0.3) for s, p in zip(shadows, params)]
    mags = [s.double().abs() + p.double().abs() for s, p in zip(shadows, params)]
    vector_tiles = run(shadows, params, "update", 0.3)
    assert vector_tiles >= 1 + 1 + 3 + 67  # the aligned full tiles took the vector path
    for s, e, m in zip(shadows, exact, mags):
        assert_rounded_close(s, e, m, compute_dtype(sd, pd))


@pytest.mark.parametrize("dd,sd", PAIRS, ids=IDS)
def test_copy_every_pair_never_reads_dst(run, dd, sd):
    gen = seeded("c", dd, sd)
    src = [rand(n, sd, gen) for n in SIZES]
    dst = [torch.full((n,), float("nan"), dtype=dd) for n in SIZES]  # must not leak in
    run(dst, src, "copy", 1.25)
    for d, s in zip(dst, src):
        exact = s.double() * 1.25
        assert_rounded_close(d, exact, exact.abs(), compute_dtype(dd, sd))


@pytest.mark.parametrize("dtype", DTYPES, ids=[str(d) for d in DTYPES])
def test_swap_exchanges_exactly(run, dtype):
    gen = seeded("s", dtype)
    a = [rand(n, dtype, gen) for n in SIZES]
    b = [rand(n, dtype, gen) for n in SIZES]
    a0, b0 = [x.clone() for x in a], [y.clone() for y in b]
    run(a, b, "swap", 0.0)
    for x, y, x0, y0 in zip(a, b, a0, b0):
        assert torch.equal(x, y0) and torch.equal(y, x0)


@pytest.mark.parametrize("count", [1, 63, 64, 65, 111, 500])
def test_many_tensors_mixed_dtypes(run, count):
    gen = seeded("n", count)
    sizes = [int(n) for n in torch.randint(0, 3 * TILE, (count,), generator=gen)]
    dts = [PAIRS[i % len(PAIRS)] for i in range(count)]
    shadows = [rand(n, sd, gen) for n, (sd, _) in zip(sizes, dts)]
    params = [rand(n, pd, gen) for n, (_, pd) in zip(sizes, dts)]
    exact = [lerp_reference(s, p, 0.01) for s, p in zip(shadows, params)]
    run(shadows, params, "update", 0.01)
    for s, p, e in zip(shadows, params, exact):
        assert_rounded_close(s, e, e.abs() + p.double().abs(), compute_dtype(s.dtype, p.dtype))


@pytest.mark.parametrize("sd,pd", [(torch.float32, torch.bfloat16), (torch.bfloat16, torch.float32),
                                   (torch.float16, torch.float16)], ids=str)
def test_misaligned_views_take_the_guarded_path(run, sd, pd):
    gen = seeded("m", sd, pd)
    n = 2 * TILE + 3
    shadows = [rand(n + 1, sd, gen)[1:], rand(n, sd, gen)]
    params = [rand(n, pd, gen), rand(n + 3, pd, gen)[3:]]
    before = [s.clone() for s in shadows]
    exact = [lerp_reference(s, p, 0.5) for s, p in zip(shadows, params)]
    assert run(shadows, params, "update", 0.5) == 0  # no pair is vector-aligned
    for s, e, b, p in zip(shadows, exact, before, params):
        assert_rounded_close(s, e, b.double().abs() + p.double().abs(), compute_dtype(sd, pd))


def test_checks_name_the_index_and_write_nothing(run):
    buf = torch.zeros(2 * TILE)
    first = torch.zeros(TILE)
    with pytest.raises(RuntimeError, match=r"tensors\[1\] partially overlap"):
        run([first, buf[:TILE]], [torch.ones(TILE), buf[8:TILE + 8]], "update", 0.5)
    assert not first.any() and not buf.any()
    shadows = [torch.zeros(TILE), torch.zeros(3)]
    with pytest.raises(RuntimeError, match=r"tensors\[1\] have shapes \[3\] and \[5\]"):
        run(shadows, [torch.ones(TILE), torch.ones(5)], "update", 0.5)
    assert not shadows[0].any()
    with pytest.raises(RuntimeError, match=r"tensors\[1\] have dtypes Float and BFloat16; swapping"):
        run(shadows, [torch.ones(TILE), torch.ones(3, dtype=torch.bfloat16)], "swap", 0.0)
    assert not shadows[0].any()
    with pytest.raises(RuntimeError, match=r"tensors\[0\] must be contiguous"):
        run([torch.zeros(4, 4).t()], [torch.ones(4, 4)], "update", 0.5)
    with pytest.raises(RuntimeError, match=r"tensors\[0\] have dtypes Double and Float"):
        run([torch.zeros(2, dtype=torch.float64)], [torch.ones(2)], "update", 0.5)
