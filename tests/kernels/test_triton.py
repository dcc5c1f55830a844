"""The Triton backend against float64, on the CPU through Triton's interpreter.

conftest.py sets TRITON_INTERPRET=1 when no GPU is present, before the kernels are
imported.  The interpreter is slow: sizes stay in the thousands.  The last tests
compile the kernels for sm_90 (no GPU needed) and check the PTX for vector accesses.
"""
from __future__ import annotations

import itertools
import json
import os
import subprocess
import sys

import pytest
import torch

from ema_fused import EMA, available_backends, ema_copy_, ema_update_

from helpers.numerics import assert_rounded_close, compute_dtype, lerp_reference, rand, seeded

triton = pytest.importorskip("triton")
pytestmark = pytest.mark.skipif(not available_backends("cpu")["triton"][0],
                                reason=available_backends("cpu")["triton"][1])

from ema_fused.triton_kernels import launch  # noqa: E402  (after the skip checks)

KERNEL_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
PAIRS = list(itertools.product(KERNEL_DTYPES, KERNEL_DTYPES))
B = launch.BLOCK
SIZES = (0, 1, 7, B - 1, B, B + 1, 3 * B + 5)



def _check_update(shadows, params, weight):
    exact = [lerp_reference(s, p, weight) for s, p in zip(shadows, params)]
    mags = [s.double().abs() + p.double().abs() for s, p in zip(shadows, params)]
    ema_update_(shadows, params, weight, backend="triton")
    for s, p, e, m in zip(shadows, params, exact, mags):
        assert_rounded_close(s, e, m, compute_dtype(s.dtype, p.dtype))


@pytest.mark.parametrize("sd,pd", PAIRS, ids=[f"{a}-{b}".replace("torch.", "") for a, b in PAIRS])
def test_update_every_dtype_pair_and_tile_edge(sd, pd):
    gen = seeded("update", sd, pd)
    _check_update([rand(n, sd, gen) for n in SIZES], [rand(n, pd, gen) for n in SIZES], 0.3)


@pytest.mark.parametrize("count", [1, 63, 64, 65, 111, 200])
def test_many_tensors_one_launch(count, monkeypatch):
    gen = seeded("count", count)
    dts = [PAIRS[i % len(PAIRS)] for i in range(count)]
    sizes = [int(n) for n in torch.randint(0, 40, (count,), generator=gen)]
    shadows = [rand(n, sd, gen) for n, (sd, _) in zip(sizes, dts)]
    params = [rand(n, pd, gen) for n, (_, pd) in zip(sizes, dts)]
    launches = []
    real = launch.run
    monkeypatch.setattr(launch, "run", lambda k, *a, **kw: (launches.append(k), real(k, *a, **kw)))
    _check_update(shadows, params, 0.125)
    assert launches == [launch.update_kernel]  # every dtype mix in one launch


@pytest.mark.parametrize("offset", [1, 3, 4, 8])
def test_offset_views_aligned_and_not(offset):
    gen = seeded("offset", offset)
    base = rand(3 * B + 40, torch.float32, gen)
    pbase = rand(3 * B + 40, torch.bfloat16, gen)
    before = base.clone()
    s, p = base[offset:offset + 2 * B + 3], pbase[offset + 1:offset + 2 * B + 4]
    _check_update([s], [p], 0.5)
    assert torch.equal(base[:offset], before[:offset])
    assert torch.equal(base[offset + 2 * B + 3:], before[offset + 2 * B + 3:])


def test_pairs_the_kernels_do_not_take_go_to_the_fallback_in_the_same_call():
    gen = seeded("mixed")
    shadows = [rand(100, torch.float64, gen), rand((9, 8), torch.float32, gen).t(),
               rand(50, torch.float32, gen)]
    params = [rand(100, torch.float32, gen), rand((8, 9), torch.bfloat16, gen),
              rand(50, torch.float16, gen)]
    _check_update(shadows, params, 0.75)


@pytest.mark.parametrize("dd,sd", PAIRS, ids=[f"{a}-{b}".replace("torch.", "") for a, b in PAIRS])
def test_copy_with_scale(dd, sd):
    gen = seeded("copy", dd, sd)
    src = [rand(n, sd, gen) for n in SIZES]
    dst = [rand(n, dd, gen) for n in SIZES]
    ema_copy_(dst, src, 1.5, backend="triton")
    for d, s in zip(dst, src):
        exact = s.double() * 1.5
        assert_rounded_close(d, exact, exact.abs(), compute_dtype(d.dtype, s.dtype))


@pytest.mark.parametrize("dtype", KERNEL_DTYPES)
def test_swap_is_exact(dtype):
    gen = seeded("swap", dtype)
    a = [rand(n, dtype, gen) for n in SIZES]
    b = [rand(n, dtype, gen) for n in SIZES]
    a0, b0 = [x.clone() for x in a], [x.clone() for x in b]
    launch.swap(list(zip(a, b)))
    assert all(torch.equal(x, y) for x, y in zip(a, b0))
    assert all(torch.equal(x, y) for x, y in zip(b, a0))
    with pytest.raises(TypeError, match="equal dtypes"):
        launch.swap([(torch.zeros(2), torch.zeros(2, dtype=torch.bfloat16))])


def test_tables_are_cached_and_rebuilt_when_storage_changes():
    s, p = torch.zeros(10), torch.ones(10, dtype=torch.bfloat16)
    first = launch.plan_for([(s, p)], s.device)
    assert launch.plan_for([(s, p)], s.device) is first
    p2 = torch.ones(10, dtype=torch.bfloat16)
    second = launch.plan_for([(s, p2)], s.device)
    assert second is not first
    assert int(second.tensors[0, 1]) != int(first.tensors[0, 1])
    for i in range(launch._CACHE_SIZE + 3):  # the cache stays bounded
        launch.plan_for([(torch.zeros(i + 1), torch.zeros(i + 1))], s.device)
    assert len(launch._plans) <= launch._CACHE_SIZE


def test_ema_end_to_end_matches_the_foreach_backend():
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(33, 65), torch.nn.LayerNorm(65),
                                torch.nn.Linear(65, 7)).to(torch.bfloat16)
    ours, ref = EMA(model, decay=0.9, backend="triton"), EMA(model, decay=0.9, backend="foreach")
    gen = seeded("e2e")
    for _ in range(3):
        with torch.no_grad():
            for prm in model.parameters():
                prm.add_(rand(prm.shape, prm.dtype, gen, scale=0.1))
        ours.update()
        ref.update()
    assert ours.backend == "triton" and ref.backend == "foreach"
    a, b = dict(ours.named_shadows()), dict(ref.named_shadows())
    for n in a:
        torch.testing.assert_close(a[n], b[n], rtol=1e-6, atol=1e-6)
    with ours.average_parameters():
        # one bf16 ulp: Triton 3.8's interpreter truncates fp32 -> bf16 whatever rounding
        # is asked for; compiled kernels round to nearest even (the GPU tests check equality)
        torch.testing.assert_close(model[0].weight.detach(), a["0.weight"].to(torch.bfloat16),
                                   rtol=2 ** -7, atol=0)


_PTX_SCRIPT = r"""
import collections, json, re
import triton
from triton.backends.compiler import GPUTarget
from ema_fused.triton_kernels import ema_kernels as k, launch, sum_kernels
TYPES = {"f32": "*fp32", "bf16": "*bf16", "f16": "*fp16", "i32": "*i32", "i16": "*i16"}
out = {}
for name, kernel, flag, arg, views, more in [
        ("update", k.update_kernel, "WEIGHT_FROM_PTR", "weight", ("f32", "bf16", "f16"),
         {"SKIP_NONFINITE": False}),
        ("update_skip", k.update_kernel, "WEIGHT_FROM_PTR", "weight", ("f32", "bf16", "f16"),
         {"SKIP_NONFINITE": True}),
        ("copy", k.copy_kernel, "SCALE_FROM_PTR", "scale", ("f32", "bf16", "f16"), {}),
        ("swap", k.swap_kernel, None, None, ("i32", "i16"), {}),
        ("weighted_sum", sum_kernels.weighted_sum_kernel, None, "weight", ("f32", "bf16", "f16"),
         {})]:
    for from_ptr in ((False, True) if flag else (None,)):
        sig = {"tensors": "*i64", "tiles": "*i64", **{v: TYPES[v] for v in views}}
        cex = {"BLOCK": launch.BLOCK}
        if flag:
            sig.update({arg: "fp32", arg + "_ptr": "*fp32", flag: "constexpr"})
            cex[flag] = from_ptr
        elif arg:
            sig[arg] = "fp32"
        sig["BLOCK"] = "constexpr"
        for key, value in more.items():
            sig[key] = "constexpr"
            cex[key] = value
        ptrs = [i for i, v in enumerate(sig.values()) if v.startswith("*")]
        src = triton.compiler.ASTSource(fn=kernel, signature=sig, constexprs=cex,
                                        attrs={(i,): [["tt.divisibility", 16]] for i in ptrs})
        ptx = triton.compile(src, target=GPUTarget("cuda", 90, 32),
                             options={"num_warps": launch.NUM_WARPS}).asm["ptx"]
        lines = [l.strip() for l in ptx.splitlines()]
        ops = [l.split()[1] if l.startswith("@") else l.split()[0]
               for l in lines if "ld.global" in l or "st.global" in l]
        # what happens before the second global load: the early exit on a zero weight
        loads = [i for i, l in enumerate(lines) if "ld.global" in l]
        head = lines[loads[0]:loads[1]] if len(loads) > 1 else []
        out[name + ("-ptr" if from_ptr else "")] = {
            "ops": collections.Counter(ops),
            "exit_on_zero_before_table": any("setp.eq.f32" in l and "0f00000000" in l for l in head)
                                         and any(re.match(r"@%p\d+ bra", l) for l in head),
            "first_load": ops[0]}
print(json.dumps(out))
"""


@pytest.fixture(scope="module")
def ptx_counts():
    """Compile every kernel for sm_90 in a fresh process (no interpreter; no GPU needed)."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    proc = subprocess.run([sys.executable, "-c", _PTX_SCRIPT], capture_output=True, text=True,
                          env=env, timeout=600)
    if proc.returncode != 0:
        pytest.fail(f"compiling the kernels for sm_90 failed:\n{proc.stderr[-3000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


# Global accesses per thread in each kernel's PTX (BLOCK = 2048, 4 warps: 16 elements a
# thread), path by path.  A kernel has three paths (ema_kernels.py): "vector", a full tile
# with both sides on the 16-byte grid: vectors for both, per operand 4 for fp32 and 2 for
# each 16-bit dtype (8 per operand over its three dtype branches; a swap has two raw
# branches, 6); "vector_a", a full tile of a tensor whose `a` is on the grid (after its
# head) and `b` is not: vectors for `a`, 16 element accesses per dtype branch for `b`;
# "masked", heads and last partial tiles: 16 element accesses per operand and dtype branch.
# Code two paths share is emitted once: the `a` accesses that follow the loads of `b` in
# the two full paths are identical (the update's and the copy's stores, the weighted sum's
# load and store of its out), so "vector_a" lists none of them; had they been element
# accesses, they would differ and be counted apart.  A vector count that
# drops means a path lost its alignment facts (Triton drops them easily, see
# ema_kernels.py); the "+1" b32 load is the weight or scale read from a pointer.
PTX_PATHS = {
    "update": {
        "vector": {"ld.global.v4.b32": 16, "st.global.v4.b32": 8},
        "vector_a": {"ld.global.v4.b32": 8, "ld.global.b32": 16, "ld.global.b16": 32},
        "masked": {"ld.global.b32": 32, "ld.global.b16": 64, "st.global.b32": 16,
                   "st.global.b16": 32}},
    "copy": {
        "vector": {"ld.global.v4.b32": 8, "st.global.v4.b32": 8},
        "vector_a": {"ld.global.b32": 16, "ld.global.b16": 32},
        "masked": {"ld.global.b32": 16, "ld.global.b16": 32, "st.global.b32": 16,
                   "st.global.b16": 32}},
    "swap": {
        "vector": {"ld.global.v4.b32": 12, "st.global.v4.b32": 12},
        "vector_a": {"ld.global.v4.b32": 6, "st.global.v4.b32": 6, "ld.global.b32": 16,
                     "ld.global.b16": 16, "st.global.b32": 16, "st.global.b16": 16},
        "masked": {"ld.global.b32": 32, "ld.global.b16": 32, "st.global.b32": 32,
                   "st.global.b16": 32}},
    # a: the float32 out (read and written), b: the input of any kernel dtype
    "weighted_sum": {
        "vector": {"ld.global.v4.b32": 4 + 8, "st.global.v4.b32": 4},
        "vector_a": {"ld.global.b32": 16, "ld.global.b16": 32},
        "masked": {"ld.global.b32": 32, "ld.global.b16": 32, "st.global.b32": 16}},
}
# skip_nonfinite: the same accesses, the select is in registers (an extra pass or a lost
# vector path would change these counts)
PTX_PATHS["update_skip"] = PTX_PATHS["update"]
ACCESSES = sorted({op for paths in PTX_PATHS.values() for path in paths.values() for op in path})


def _expected(name: str) -> dict:
    total = dict.fromkeys(ACCESSES, 0)
    for path in PTX_PATHS[name.split("-")[0]].values():
        for op, count in path.items():
            total[op] += count
    if name.endswith("-ptr"):
        total["ld.global.b32"] += 1
    return total


@pytest.mark.parametrize("name", ["update", "update-ptr", "update_skip", "update_skip-ptr",
                                  "copy", "copy-ptr", "swap", "weighted_sum"])
def test_each_path_compiles_to_its_accesses_for_sm90(name, ptx_counts):
    ops = ptx_counts[name]["ops"]
    assert {op: ops.get(op, 0) for op in ACCESSES} == _expected(name), ops


@pytest.mark.parametrize("name", ["update", "swap"])
def test_the_unaligned_body_path_uses_vectors_for_its_aligned_side(name, ptx_counts):
    """Issue 20: a tensor off the 16-byte grid runs its full tiles with vector accesses to
    `a`, not element by element (where that path's `a` accesses are its own code; in the
    copy and the weighted sum they are the vector path's, see PTX_PATHS)."""
    ops = ptx_counts[name]["ops"]
    own = PTX_PATHS[name]["vector_a"]["ld.global.v4.b32"]
    assert own > 0 and ops["ld.global.v4.b32"] == PTX_PATHS[name]["vector"]["ld.global.v4.b32"] + own


def test_a_zero_device_weight_exits_before_reading_the_table(ptx_counts):
    """Graph-safe update: the first load is the weight, then a branch on it being 0, then
    the tile table: a skipped step streams nothing."""
    assert ptx_counts["update-ptr"]["first_load"] == "ld.global.b32"
    assert ptx_counts["update-ptr"]["exit_on_zero_before_table"]
    assert ptx_counts["update_skip-ptr"]["exit_on_zero_before_table"]
    assert not ptx_counts["copy-ptr"]["exit_on_zero_before_table"]  # the check can fail


def test_average_parameters_swaps_with_the_triton_kernel(monkeypatch):
    model = torch.nn.Sequential(torch.nn.Linear(40, 70), torch.nn.Linear(70, 3))
    ema = EMA(model, decay=0.5, backend="triton")
    with torch.no_grad():
        for prm in model.parameters():
            prm.mul_(3.0)
    ema.update()
    raw = {n: t.clone() for n, t in model.state_dict().items()}
    shadows = {n: s.clone() for n, s in ema.named_shadows()}
    kernels = []
    real = launch.run
    monkeypatch.setattr(launch, "run", lambda k, *a, **kw: (kernels.append(k), real(k, *a, **kw)))
    with ema.average_parameters():
        assert all(torch.equal(t, shadows[n]) for n, t in model.state_dict().items())
    assert kernels == [launch.swap_kernel, launch.swap_kernel]
    assert all(torch.equal(t, raw[n]) for n, t in model.state_dict().items())


def test_ema_plan_reuse_and_a_transposed_parameter():
    w = torch.nn.Parameter(torch.arange(4096.0).view(64, 64))
    ema = EMA([w], decay=0.5, backend="triton")
    ema.update()
    ema.update()  # reuses the prepared tables
    start = dict(ema.named_shadows())["0"].clone()
    w.data = w.data.t()  # same address, now non-contiguous: must not reuse the tables
    ema.update()
    torch.testing.assert_close(dict(ema.named_shadows())["0"], 0.5 * start + 0.5 * w.detach())


def test_a_kernel_that_cannot_run_makes_auto_fall_back_and_a_named_request_fail(monkeypatch):
    from ema_fused import BackendUnavailableError
    from ema_fused.backends import triton as triton_backend
    monkeypatch.setattr(triton_backend, "_probed", {})

    def broken(*args, **kwargs):
        raise RuntimeError("no kernel image for this device")

    monkeypatch.setattr(launch, "update", broken)
    usable, why = available_backends("cpu")["triton"]
    assert not usable and "no kernel image for this device" in why
    with pytest.raises(BackendUnavailableError, match="no kernel image"):
        ema_update_([torch.zeros(3)], [torch.ones(3)], 0.5, backend="triton")
    s = torch.zeros(3)
    ema_update_([s], [torch.ones(3)], 0.5)  # auto: the fallback, quietly
    assert torch.equal(s, torch.full((3,), 0.5))
