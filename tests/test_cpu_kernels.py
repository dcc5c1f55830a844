"""The C++ CPU kernels in csrc/ (JIT-built here with torch.utils.cpp_extension) against
float64.  They are not wired in as the "cpu" backend yet (see csrc/README.md); this
keeps them compiling and correct meanwhile."""
from __future__ import annotations

import itertools
import os
import sys
import zlib

import pytest
import torch

from conftest import assert_rounded_close, compute_dtype, lerp_reference, rand

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
KERNEL_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
PAIRS = list(itertools.product(KERNEL_DTYPES, KERNEL_DTYPES))
SIZES = (0, 1, 7, 65535, 65536, 65537, 278011)


@pytest.fixture(scope="module")
def ops(tmp_path_factory):
    pytest.importorskip("ninja")
    from torch.utils.cpp_extension import load
    path = os.environ.get("PATH", "")
    # the ninja binary of this environment (pip's ninja) even when it is not activated
    os.environ["PATH"] = os.path.dirname(sys.executable) + os.pathsep + path
    try:
        load(name="ema_fused_cpu_kernels_test",
             sources=[os.path.join(ROOT, "csrc", f) for f in ("ema_ops.cpp", "cpu_kernels.cpp")],
             extra_cflags=["-O3"], build_directory=str(tmp_path_factory.mktemp("build")),
             is_python_module=False)
    finally:
        os.environ["PATH"] = path
    return torch.ops.ema_fused


def _gen(*key):
    return torch.Generator().manual_seed(zlib.crc32(repr(key).encode()))


@pytest.mark.parametrize("sd,pd", PAIRS, ids=[f"{a}-{b}".replace("torch.", "") for a, b in PAIRS])
def test_update_every_pair(ops, sd, pd):
    gen = _gen("u", sd, pd)
    shadows = [rand(n, sd, gen) for n in SIZES]
    params = [rand(n, pd, gen) for n in SIZES]
    exact = [lerp_reference(s, p, 0.3) for s, p in zip(shadows, params)]
    mags = [s.double().abs() + p.double().abs() for s, p in zip(shadows, params)]
    ops.kernel_update_(shadows, params, 0.3)
    for s, e, m in zip(shadows, exact, mags):
        assert_rounded_close(s, e, m, compute_dtype(sd, pd))


@pytest.mark.parametrize("dd,sd", PAIRS, ids=[f"{a}-{b}".replace("torch.", "") for a, b in PAIRS])
def test_copy_every_pair(ops, dd, sd):
    gen = _gen("c", dd, sd)
    src = [rand(n, sd, gen) for n in SIZES]
    dst = [rand(n, dd, gen) for n in SIZES]
    ops.kernel_copy_(dst, src, 1.25)
    for d, s in zip(dst, src):
        exact = s.double() * 1.25
        assert_rounded_close(d, exact, exact.abs(), compute_dtype(dd, sd))


@pytest.mark.parametrize("count", [1, 63, 64, 65, 111, 500])
def test_many_tensors(ops, count):
    gen = _gen("n", count)
    dts = [PAIRS[i % len(PAIRS)] for i in range(count)]
    sizes = [int(n) for n in torch.randint(0, 300, (count,), generator=gen)]
    shadows = [rand(n, sd, gen) for n, (sd, _) in zip(sizes, dts)]
    params = [rand(n, pd, gen) for n, (_, pd) in zip(sizes, dts)]
    exact = [lerp_reference(s, p, 0.01) for s, p in zip(shadows, params)]
    ops.kernel_update_(shadows, params, 0.01)
    for s, p, e in zip(shadows, params, exact):
        assert_rounded_close(s, e, e.abs() + p.double().abs(), compute_dtype(s.dtype, p.dtype))


def test_checks_name_the_index_and_write_nothing(ops):
    shadows = [torch.zeros(4), torch.zeros(3)]
    params = [torch.ones(4), torch.ones(5)]
    with pytest.raises(RuntimeError, match=r"tensors\[1\] have shapes \[3\] and \[5\]"):
        ops.kernel_update_(shadows, params, 0.5)
    assert not shadows[0].any()
    with pytest.raises(RuntimeError, match=r"tensors\[0\] must be contiguous"):
        ops.kernel_update_([torch.zeros(4, 4).t()], [torch.ones(4, 4)], 0.5)
    with pytest.raises(RuntimeError, match=r"tensors\[0\] have dtypes Double and Float"):
        ops.kernel_update_([torch.zeros(2, dtype=torch.float64)], [torch.ones(2)], 0.5)
    with pytest.raises(RuntimeError, match="weight must be in"):
        ops.kernel_update_([torch.zeros(2)], [torch.ones(2)], 1.5)
    with pytest.raises(RuntimeError, match="2 tensors but the second has 1"):
        ops.kernel_copy_(shadows, params[:1], 1.0)
