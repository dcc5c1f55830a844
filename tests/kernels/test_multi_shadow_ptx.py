"""The CUDA multi-shadow kernel compiled for sm_90 with nvcc, no GPU needed: each full-tile
path's global accesses (counted per probe in the PTX), global-only accesses in the
kernel, vector accesses for every dtype, the weight read without local memory, and no
register spills.  tests/kernels/csrc/multi_shadow_ptx.cu holds the kernel and the probes."""
from __future__ import annotations

import collections
import os
import re

import pytest

from helpers.csrc_tools import nvcc_compile
from helpers.paths import TESTS

SOURCE = os.path.join(TESTS, "kernels", "csrc", "multi_shadow_ptx.cu")
PTX_TYPE = {"f32": "f32", "bf16": "u16", "f16": "u16"}
UNROLL, VEC = 4, 4  # kUnroll, kVec: 4 vectors of 4 elements per thread and operand
KERNEL = "_ZN9ema_fused18multi_tiles_kernelEPKlliNS_12MultiWeightsE"
STOCHASTIC = "_ZN9ema_fused29multi_stochastic_tiles_kernelEPKlliNS_12MultiWeightsENS_9MultiKeysE"


def _compile(out: str, *flags: str) -> str:
    return nvcc_compile(SOURCE, out, *flags)


@pytest.fixture(scope="module")
def ptx(tmp_path_factory) -> dict[str, str]:
    path = str(tmp_path_factory.mktemp("ptx") / "multi.ptx")
    _compile(path, "-ptx")
    with open(path) as f:
        entries = re.split(r"\n(?=\.visible \.entry)", f.read())[1:]
    return {re.search(r"\.entry (\w+)\(", e).group(1): e for e in entries}


def _accesses(body: str) -> collections.Counter:
    return collections.Counter(re.findall(r"\b((?:ld|st)\.global[.\w]*)", body))


PROBES = [(kind, s, p, path) for kind in ("Update", "Copy") for s in PTX_TYPE for p in PTX_TYPE
          for path in ("vector", "scalar")]
PROBES += [("stochastic", s, p, path) for s in ("bf16", "f16") for p in PTX_TYPE
           for path in ("vector", "scalar")]


@pytest.mark.parametrize("kind,s,p,path", PROBES, ids=["-".join(x) for x in PROBES])
def test_each_full_tile_path_has_exactly_its_accesses(ptx, kind, s, p, path):
    """Param: UNROLL read-only (.nc) vectors, or UNROLL * VEC elements off its grid; the
    shadow: the same as vectors or elements, read (not for a copy) and written.  The
    stochastic update's accesses are the update's: its random bits come from registers."""
    ts, tp = PTX_TYPE[s], PTX_TYPE[p]
    vec = path == "vector"
    want = collections.Counter()
    want[f"ld.global.nc.v4.{tp}" if vec else f"ld.global.nc.{tp}"] += UNROLL * (1 if vec else VEC)
    shadow = f"global.v4.{ts}" if vec else f"global.{ts}"
    count = UNROLL * (1 if vec else VEC)
    if kind in ("Update", "stochastic"):
        want["ld." + shadow] += count
    want["st." + shadow] += count
    assert _accesses(ptx[f"multi_{kind}_{s}_{p}_{path}"]) == want


@pytest.mark.parametrize("kernel", [KERNEL, STOCHASTIC], ids=["nearest", "stochastic"])
def test_kernel_accesses_only_global_memory_with_vectors_for_every_dtype(ptx, kernel):
    """Tensor addresses are table-relative (fill_multi_table), so every access is global;
    the weights (and a stochastic launch's keys) are read from the parameter space by
    compile-time index (weight_of, stream_of), so nothing goes to local memory; vector
    loads and stores exist for every dtype (a stochastic launch: 16-bit shadows only, so
    fp32 vectors are loaded (params) but not stored)."""
    body = ptx[kernel]
    other = [op for op in re.findall(r"\b((?:ld|st)\.[.\w]*)", body)
             if not op.startswith(("ld.global", "st.global", "ld.param"))]
    assert other == []
    assert "local" not in body
    ops = _accesses(body)
    assert ops["ld.global.v4.f32"] > 0 and ops["ld.global.v4.u16"] > 0, ops
    assert ops["st.global.v4.u16"] > 0, ops
    if kernel == KERNEL:
        assert ops["st.global.v4.f32"] > 0, ops
    assert len(re.findall(r"ld\.param\.f32", body)) == 8  # the 8 weights, each once


@pytest.mark.parametrize("kernel", [KERNEL, STOCHASTIC], ids=["nearest", "stochastic"])
def test_no_register_spills(tmp_path, kernel):
    """At __launch_bounds__(256, 4) each thread has at most 64 registers."""
    report = _compile(str(tmp_path / "multi.cubin"), "-cubin", "-Xptxas", "-v")
    found = re.search(rf"Compiling entry function '{kernel}'.*?(\d+) bytes stack frame, "
                      r"(\d+) bytes spill stores, (\d+) bytes spill loads", report, re.S)
    assert found, report[-2000:]
    assert found.groups() == ("0", "0", "0"), found.group(0)
