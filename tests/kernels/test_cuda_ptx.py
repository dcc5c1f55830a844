"""The CUDA kernels compiled for sm_90 with nvcc, no GPU needed: every access path's
global loads and stores (counted per path in the PTX), no generic or local-memory
accesses, no register spills, and the zero-weight exit before the tile table.

tests/kernels/csrc/tiles_ptx.cu instantiates every kernel as cuda_kernels.cu launches them,
plus one probe per (kind, dtype pair, path) that runs only a full tile, so a count that
changes points at one branch.
"""
from __future__ import annotations

import collections
import os
import re

import pytest

from helpers.csrc_tools import nvcc_compile
from helpers.paths import ROOT, TESTS

SOURCE = os.path.join(TESTS, "kernels", "csrc", "tiles_ptx.cu")
DTYPES = {"f32": ("f32", 4), "bf16": ("u16", 2), "f16": ("u16", 2)}  # PTX type, bytes
UNROLL, VEC = 4, 4  # kUnroll, kVec in multi_tensor.h: 4 vectors of 4 elements a thread


def _compile(out: str, *flags: str) -> str:
    return nvcc_compile(SOURCE, out, *flags)


@pytest.fixture(scope="module")
def ptx(tmp_path_factory) -> dict[str, str]:
    """Entry name -> its PTX body."""
    path = str(tmp_path_factory.mktemp("ptx") / "tiles.ptx")
    _compile(path, "-ptx")
    with open(path) as f:
        text = f.read()
    entries = re.split(r"\n(?=\.visible \.entry)", text)[1:]
    return {re.search(r"\.entry (\w+)\(", e).group(1): e for e in entries}


def _accesses(body: str) -> collections.Counter:
    return collections.Counter(re.findall(r"\b((?:ld|st)\.global[.\w]*)", body))


def _probe_expectation(kind: str, a: str, b: str, vector_b: bool) -> collections.Counter:
    """Global accesses of one thread's full tile: the first tensor always as UNROLL
    16-byte (fp32) / 8-byte (16-bit) vectors; the second as vectors too when aligned with
    it, else as UNROLL * VEC scalars.  Copy never reads its destination; params are
    read-only (the non-coherent ld.global.nc form); a swap writes both sides.  The
    skip_nonfinite kinds access memory exactly as the update: the select is in registers
    (CopyFinite, its weight-1 end, reads the destination to keep elements)."""
    (ta, _), (tb, _) = DTYPES.get(a, (a, 0)), DTYPES.get(b, (b, 0))
    nc = "" if kind == "Swap" else ".nc"
    want = collections.Counter()
    if kind != "Copy":
        want[f"ld.global.v4.{ta}"] += UNROLL
    want[f"st.global.v4.{ta}"] += UNROLL
    if vector_b:
        want[f"ld.global{nc}.v4.{tb}"] += UNROLL
        if kind == "Swap":
            want[f"st.global.v4.{tb}"] += UNROLL
    else:
        want[f"ld.global{nc}.{tb}"] += UNROLL * VEC
        if kind == "Swap":
            want[f"st.global.{tb}"] += UNROLL * VEC
    return want


PROBES = ([(k, a, b) for k in ("Update", "Copy", "UpdateFinite", "CopyFinite")
           for a in DTYPES for b in DTYPES]
          + [("Swap", "u32", "u32"), ("Swap", "u16", "u16")]
          + [("Accumulate", "f32", b) for b in DTYPES])  # a float32 out, read and written


@pytest.mark.parametrize("vector_b", [True, False], ids=["vector", "scalar_b"])
@pytest.mark.parametrize("kind,a,b", PROBES, ids=["-".join(p) for p in PROBES])
def test_each_full_tile_path_has_exactly_its_vector_accesses(ptx, kind, a, b, vector_b):
    name = f"full_{kind}_{a}_{b}_{'vector' if vector_b else 'scalar_b'}"
    assert _accesses(ptx[name]) == _probe_expectation(kind, a, b, vector_b)


SR_PROBES = [(k, a, b) for k in ("Update", "UpdateFinite") for a in ("bf16", "f16") for b in DTYPES]


@pytest.mark.parametrize("vector_b", [True, False], ids=["vector", "scalar_b"])
@pytest.mark.parametrize("kind,a,b", SR_PROBES, ids=["-".join(p) for p in SR_PROBES])
def test_stochastic_full_tiles_access_memory_as_the_nearest_ones(ptx, kind, a, b, vector_b):
    """The stochastic update draws its random bits in registers (Philox, one draw per
    vector of 4 elements): the same global loads and stores as the nearest update."""
    name = f"stochastic_{kind}_{a}_{b}_{'vector' if vector_b else 'scalar_b'}"
    assert _accesses(ptx[name]) == _probe_expectation(kind, a, b, vector_b)
    assert "mul.hi.u32" in ptx[name]  # the draws are there


def _kinds() -> list[str]:
    """Kind's enumerators in order, read from multi_tensor.h (their values mangle the names)."""
    with open(os.path.join(ROOT, "csrc", "multi_tensor.h")) as f:
        body = re.search(r"enum class Kind\s*\{([^}]*)\}", f.read()).group(1)
    return [k.strip() for k in body.split(",") if k.strip()]


# CopyFinite has no kernel of its own: UpdateFinite runs it for weight 1
KERNELS = {kind: f"_ZN9ema_fused12tiles_kernelILNS_4KindE{value}EEEvPKllfPKf"
           for value, kind in enumerate(_kinds()) if kind != "CopyFinite"}
# the stochastic update's kernels (their copies, weight 1, run in them too)
KERNELS.update({f"Stochastic{kind}": f"_ZN9ema_fused23stochastic_tiles_kernelILNS_4KindE{value}"
                                     "EEEvPKllfNS_9RandomKeyE"
                for value, kind in enumerate(_kinds()) if kind in ("Update", "UpdateFinite")})


@pytest.mark.parametrize("kind", KERNELS)
def test_kernels_access_memory_only_as_global_and_never_locally(ptx, kind):
    """Tensor addresses are table-relative offsets (fill_table), so nvcc knows they are
    global: LDG/STG, not generic LD/ST; and nothing goes to local memory."""
    body = ptx[KERNELS[kind]]
    other = [op for op in re.findall(r"\b((?:ld|st)\.[.\w]*)", body)
             if not op.startswith(("ld.global", "st.global", "ld.param"))]
    assert other == []
    assert any(op.startswith("ld.global.v4") for op in _accesses(body))


def test_no_kernel_spills_registers(tmp_path):
    """At __launch_bounds__(256, 4) each thread has at most 64 registers."""
    report = _compile(str(tmp_path / "tiles.cubin"), "-cubin", "-Xptxas", "-v")
    entries = re.findall(r"Compiling entry function '(\w+)'.*?(\d+) bytes spill stores, "
                         r"(\d+) bytes spill loads", report, re.S)
    kernels = {name: (int(st), int(ld)) for name, st, ld in entries if name in KERNELS.values()}
    assert len(kernels) == len(KERNELS), report[-2000:]
    assert all(spill == (0, 0) for spill in kernels.values()), kernels


@pytest.mark.parametrize("update", ["Update", "UpdateFinite"])
def test_a_zero_device_weight_exits_before_the_table_is_read(ptx, update):
    """The update kernel's first global load is the weight; before its first tile-table
    load (64-bit) there is a comparison of the weight with 0 and a branch on it."""
    lines = [line.strip() for line in ptx[KERNELS[update]].splitlines()]
    first_weight = next(i for i, l in enumerate(lines) if "ld.global" in l)
    first_table = next(i for i, l in enumerate(lines) if "ld.global.u64" in l)
    assert ".f32" in lines[first_weight] and first_weight < first_table
    between = lines[first_weight:first_table]
    assert any("setp.eq.f32" in l and "0f00000000" in l for l in between), between
    assert any(re.match(r"@%p\d+ bra", l) for l in between), between
    copy = [line.strip() for line in ptx[KERNELS["Copy"]].splitlines()]
    start = next(i for i, l in enumerate(copy) if "ld.global" in l)
    assert not any("0f00000000" in l for l in copy[start:next(
        i for i, l in enumerate(copy) if "ld.global.u64" in l)])  # the copy has no such exit


@pytest.mark.parametrize("kernel", ["StochasticUpdate", "StochasticUpdateFinite"])
def test_a_zero_stochastic_weight_exits_before_the_table_is_read(ptx, kernel):
    """Weight 0 changes nothing: a comparison with 0 and a branch on it come before the
    first tile-table load, so no tensor is read."""
    lines = [line.strip() for line in ptx[KERNELS[kernel]].splitlines()]
    first_table = next(i for i, l in enumerate(lines) if "ld.global" in l)
    before = lines[:first_table]
    assert any("setp.eq.f32" in l and "0f00000000" in l for l in before), before
    assert any(re.match(r"@%p\d+ bra", l) for l in before), before


def test_a_zero_weight_sum_exits_before_the_table_is_read(ptx):
    """The weighted sum's weight 0 adds nothing: a comparison with 0 and a branch on it
    come before its first tile-table load, so no tensor is read (an Inf adds no NaN)."""
    lines = [line.strip() for line in ptx[KERNELS["Accumulate"]].splitlines()]
    first_table = next(i for i, l in enumerate(lines) if "ld.global.u64" in l)
    before = lines[:first_table]
    assert any("setp.eq.f32" in l and "0f00000000" in l for l in before), before
    assert any(re.match(r"@%p\d+ bra", l) for l in before), before
