"""The Triton stochastic update (triton_kernels/stochastic.py): through Triton's
interpreter, bit for bit the torch code's (ema_fused/backends/stochastic.py), which the
C++ CPU loops (test_stochastic_rounding.py) and the CUDA tile engine's emulation
(test_cuda_emulation.py) equal too; and compiled for sm_90 (no GPU needed): the nearest
update's global loads, its 16-bit stores, no local memory, no FMA, no spills."""
from __future__ import annotations

import collections
import json
import os
import shutil
import subprocess
import sys

import pytest
import torch

from ema_fused import EMA, available_backends, ema_update_
from ema_fused.backends import stochastic as ref
from ema_fused.checks.rounding import Stochastic

from helpers.numerics import rand, seeded

triton = pytest.importorskip("triton")
pytestmark = pytest.mark.skipif(not available_backends("cpu")["triton"][0],
                                reason=available_backends("cpu")["triton"][1])

from ema_fused.triton_kernels import launch  # noqa: E402  (after the skip checks)
from ema_fused.triton_kernels import stochastic as tri  # noqa: E402

B = launch.BLOCK
HALF = (torch.bfloat16, torch.float16)
DTYPES = (torch.float32, torch.bfloat16, torch.float16)
SR_PAIRS = [(sd, pd) for sd in HALF for pd in DTYPES]
IDS = [f"{a}-{b}".replace("torch.", "") for a, b in SR_PAIRS]


def _bits(t: torch.Tensor) -> torch.Tensor:
    return t.view(torch.int16)


@pytest.mark.parametrize("sd,pd", SR_PAIRS, ids=IDS)
def test_kernel_gives_the_torch_codes_bits(sd, pd):
    """Full vector tiles, the a-only vector path (b off the grid), heads of misaligned
    views, masked tails, starts off the 8-element grid of the draws (one draw per element
    then), skip_nonfinite, both sides of the two-sided lerp."""
    gen = seeded("triton-sr", sd, pd)
    sizes = [1, 7, B - 1, B, B + 1]
    shadows = [rand(n, torch.float32, gen).to(sd) for n in sizes]
    shadows.append(rand(B + 40, torch.float32, gen).to(sd)[3:])  # a head, then full tiles
    params = [rand(n, torch.float32, gen, scale=3.0).to(pd) for n in sizes]
    params.append(rand(B + 38, torch.float32, gen).to(pd)[1:])
    params[3][::37] = float("nan")
    params[3][5::41] = float("inf")
    spec = Stochastic(2**64 - 5, 2**33 + 7, tuple(range(10, 16)), (0, 5, 8, 13, 0, 2))
    for skip in (False, True):
        for w in (0.3, 0.8):
            got = [s.clone() for s in shadows]
            want = [s.clone() for s in shadows]
            tri.update(list(zip(got, params)), w, spec, skip)
            ref.update_(want, params, w, skip, spec, 1 << 20)
            for i, (g, e) in enumerate(zip(got, want)):
                assert torch.equal(_bits(g), _bits(e)), (skip, w, i)


def test_the_op_and_ema_give_the_cpu_backends_bits():
    """ema_update_ and EMA on the triton backend: the cpu backend's bits, with a wider
    shadow (nearest) and a float64 param (the torch code) in the same call."""
    if not available_backends("cpu")["cpu"][0]:
        pytest.skip("the C++ extension is not built")
    gen = seeded("triton-op")
    shadows = [rand(n, torch.float32, gen).to(torch.bfloat16) for n in (5, B + 3)]
    shadows += [rand(9, torch.float32, gen), rand(6, torch.float32, gen).to(torch.float16)]
    params = [rand(s.numel(), torch.float32, gen) for s in shadows[:3]]
    params.append(rand(6, torch.float64, gen))
    runs = []
    for backend in ("triton", "cpu"):
        out = [s.clone() for s in shadows]
        ema_update_(out, params, 0.01, rounding="stochastic", seed=3, offset=4, backend=backend)
        runs.append(out)
    assert all(torch.equal(a, b) for a, b in zip(*runs))
    model = [rand(n, torch.float32, gen).to(torch.bfloat16) for n in (3, B + 9)]
    emas = [EMA(model, decay=0.9, dtype=torch.bfloat16, rounding="stochastic", seed=8,
                backend=b) for b in ("triton", "cpu")]
    for step in range(3):
        for p in model:
            p.add_(rand(p.shape, torch.float32, gen).to(p.dtype), alpha=0.1)
        for e in emas:
            e.update()
    a, b = ([s for _, s in e.named_shadows()] for e in emas)
    assert all(torch.equal(x, y) for x, y in zip(a, b))


_PTX_SCRIPT = r"""
import collections, json, subprocess, sys, tempfile
import triton
from triton.backends.compiler import GPUTarget
from ema_fused.triton_kernels import ema_kernels as k, launch, stochastic as s
common = {"tensors": "*i64", "tiles": "*i64"}
views = {"f32": "*fp32", "bf16": "*bf16", "f16": "*fp16"}
kernels = {
    "update": (k.update_kernel, {**common, **views, "weight": "fp32", "weight_ptr": "*fp32",
                                 "WEIGHT_FROM_PTR": "constexpr"}, {"WEIGHT_FROM_PTR": False}, True),
    "stochastic": (s.update_stochastic_kernel, {**common, "counters": "*i64", **views,
                   "weight": "fp32", "seed": "i64", "off_lo": "i64", "off_hi": "i64"}, {}, False)}
out = {}
for name, (kernel, sig, cex, fusion) in kernels.items():
    for skip in (False, True):
        sig = {**sig, "BLOCK": "constexpr", "SKIP_NONFINITE": "constexpr"}
        consts = {**cex, "BLOCK": launch.BLOCK, "SKIP_NONFINITE": skip}
        ptrs = [i for i, v in enumerate(sig.values()) if v.startswith("*")]
        src = triton.compiler.ASTSource(fn=kernel, signature=sig, constexprs=consts,
                                        attrs={(i,): [["tt.divisibility", 16]] for i in ptrs})
        ptx = triton.compile(src, target=GPUTarget("cuda", 90, 32),
                             options={"num_warps": launch.NUM_WARPS,
                                      "enable_fp_fusion": fusion}).asm["ptx"]
        lines = [l.strip() for l in ptx.splitlines()]
        ops = [l.split()[1] if l.startswith("@") else l.split()[0]
               for l in lines if "ld.global" in l or "st.global" in l]
        spills = None
        if len(sys.argv) > 1:  # ptxas: spills of the compiled kernel
            with tempfile.NamedTemporaryFile("w", suffix=".ptx", delete=False) as f:
                f.write(ptx)
            report = subprocess.run([sys.argv[1], "-arch=sm_90a", "-v", f.name, "-o", f.name + ".o"],
                                    capture_output=True, text=True).stderr
            spills = [int(x) for x in __import__("re").findall(r"(\d+) bytes spill", report)]
        out[name + ("_skip" if skip else "")] = {
            "ops": collections.Counter(ops), "local": sum(".local" in l for l in lines),
            "fma": sum(l.startswith("fma.") for l in lines),
            "mulhi": sum("mul.hi.u32" in l for l in lines), "spills": spills}
print(json.dumps(out))
"""


@pytest.fixture(scope="module")
def ptx():
    """Compile the nearest and the stochastic update for sm_90 in a fresh process (no
    interpreter, no GPU); ptxas (where the CUDA toolkit is found) reports spills."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    ptxas = shutil.which("ptxas", path=os.path.join(os.environ.get("CUDA_HOME", "/usr/local/cuda"),
                                                   "bin"))
    proc = subprocess.run([sys.executable, "-c", _PTX_SCRIPT] + ([ptxas] if ptxas else []),
                          capture_output=True, text=True, env=env, timeout=600)
    if proc.returncode != 0:
        pytest.fail(f"compiling the kernels for sm_90 failed:\n{proc.stderr[-3000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


@pytest.mark.parametrize("skip", [False, True], ids=["plain", "skip_nonfinite"])
def test_sm90_the_nearest_loads_its_16bit_stores_no_local_no_fma(ptx, skip):
    """Per path the stochastic kernel loads what the nearest update loads (vector paths
    kept; the random bits come from registers) plus the two counter words of its table,
    and stores what the nearest update stores into 16-bit shadows (fp32 shadows never
    reach it: its fp32 store branch is gone); no local memory; no FMA (the update is
    computed unfused, as every backend computes it); the Philox products are there."""
    near, sr = ptx["update" + ("_skip" if skip else "")], ptx["stochastic" + ("_skip" if skip else "")]
    loads = {op: n for op, n in near["ops"].items() if op.startswith("ld.")}
    loads["ld.global.b64"] += 2  # position and start
    assert {op: n for op, n in sr["ops"].items() if op.startswith("ld.")} == loads
    assert loads["ld.global.v4.b32"] > 0
    # nearest stores: fp32 shadows 4 vector + 16 element stores, each 16-bit dtype 2 + 16
    stores = collections.Counter({op: n for op, n in near["ops"].items() if op.startswith("st.")})
    stores.subtract({"st.global.v4.b32": 4, "st.global.b32": 16})
    assert {op: n for op, n in sr["ops"].items() if op.startswith("st.")} == +stores
    assert sr["local"] == 0 and sr["fma"] == 0 and sr["mulhi"] > 0 and near["fma"] > 0
    if sr["spills"] is not None:
        assert sr["spills"] == [0, 0], sr["spills"]
