"""The ``cpu``/``cuda`` backends: the C++ extension's ops, how it loads, and how it is built.

The extension comes from the AOT build when there is one (CI builds it in
scripts/setup_env.sh), else from a just-in-time build.  The CPU kernels themselves are
checked against float64 in test_cpu_kernels.py, the CUDA tile engine in
test_cuda_emulation.py and on a GPU in test_cuda_gpu.py.
"""
from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch

import ema_fused
from ema_fused import EMA, ema_copy_, ema_swap_, ema_update_
from ema_fused.backends import extension as _extension
from ema_fused.backends import selection as _backend
from helpers.numerics import assert_rounded_close, compute_dtype, lerp_reference, rand
from helpers.paths import ROOT

OPS = ("kernel_update_", "kernel_update_graph_safe_", "kernel_copy_", "kernel_swap_")


@pytest.fixture(scope="module")
def ext():
    if not _extension.load(build=True):
        pytest.fail(f"the extension neither loads nor builds here: {_extension.error()}")
    return torch.ops.ema_fused


def _pairs(gen, dtypes, n=37):
    return ([rand(n + i, sd, gen) for i, (sd, _) in enumerate(dtypes)],
            [rand(n + i, pd, gen) for i, (_, pd) in enumerate(dtypes)])


MIXED = [(torch.float32, torch.bfloat16), (torch.bfloat16, torch.float32),
         (torch.float16, torch.float16), (torch.float32, torch.float32)]


@pytest.mark.parametrize("op", OPS)
def test_opcheck(ext, op):
    gen = torch.Generator().manual_seed(0)
    if op == "kernel_swap_":
        a, b = _pairs(gen, [(d, d) for d, _ in MIXED])
        args = (a, b)
    else:
        a, b = _pairs(gen, MIXED)
        scalar = torch.tensor([0.25]) if op == "kernel_update_graph_safe_" else 0.25
        args = (a, b, scalar)
    torch.library.opcheck(getattr(ext, op), args)


def test_cpu_and_cuda_kernels_are_registered_for_every_op(ext):
    for op in OPS:
        assert torch._C._dispatch_has_kernel_for_dispatch_key(f"ema_fused::{op}", "CPU"), op
    possible, why = _extension.cuda_build_possible()
    if not possible:
        if os.environ.get("EMA_FUSED_REQUIRE_CUDA_KERNELS") == "1":
            pytest.fail(f"EMA_FUSED_REQUIRE_CUDA_KERNELS=1 but no CUDA build can be made: {why}")
        pytest.skip(f"no CUDA build can be made here: {why}")
    for op in OPS:
        assert torch._C._dispatch_has_kernel_for_dispatch_key(f"ema_fused::{op}", "CUDA"), (
            f"{op} has no CUDA kernel in the loaded build ({_extension.loaded()}); "
            "a CUDA toolkit is present, so the build should have compiled them")


def test_auto_takes_the_cpu_kernels_once_loaded(ext):
    assert _backend.select("auto", torch.device("cpu")).name == "cpu"
    assert ema_fused.available_backends("cpu")["cpu"][0]


def test_ops_mix_kernel_pairs_and_fallback_pairs(ext):
    """float64 and non-contiguous pairs go to the fallback in the same call."""
    gen = torch.Generator().manual_seed(1)
    shadows = [rand(50, torch.float32, gen), rand(9, torch.float64, gen),
               rand((6, 5), torch.float32, gen), rand(4097, torch.bfloat16, gen)]
    params = [rand(50, torch.bfloat16, gen), rand(9, torch.float64, gen),
              rand((5, 6), torch.float32, gen).t(), rand(4097, torch.float16, gen)]
    exact = [lerp_reference(s, p, 0.125) for s, p in zip(shadows, params)]
    mags = [s.double().abs() + p.double().abs() for s, p in zip(shadows, params)]
    ema_update_(shadows, params, 0.125, backend="cpu")
    for s, p, e, m in zip(shadows, params, exact, mags):
        assert_rounded_close(s, e, m, compute_dtype(s.dtype, p.dtype))
    dst = [torch.empty_like(p) for p in params]
    ema_copy_(dst, shadows, 2.0, backend="cpu")
    for d, s in zip(dst, shadows):
        exact = s.double() * 2
        assert_rounded_close(d, exact, exact.abs(), compute_dtype(d.dtype, s.dtype))
    a = [s.clone() for s in shadows]
    b = [rand(s.shape, s.dtype, gen) for s in shadows]
    a0, b0 = [x.clone() for x in a], [y.clone() for y in b]
    ema_swap_(a, b, backend="cpu")
    assert all(torch.equal(x, y) for x, y in zip(a, b0)) and all(
        torch.equal(y, x) for x, y in zip(a0, b))


def test_ema_end_to_end_matches_float64(ext):
    torch.manual_seed(2)
    model = torch.nn.Sequential(torch.nn.Linear(33, 65), torch.nn.LayerNorm(65),
                                torch.nn.Linear(65, 7)).to(torch.bfloat16)
    ema = EMA(model, decay=0.9, backend="cpu")
    ref = {n: p.detach().double().clone() for n, p in model.named_parameters()}
    for step in range(4):
        with torch.no_grad():
            for p in model.parameters():
                p.add_(torch.randn_like(p) * 0.1)
        ema.update()
        for n, p in model.named_parameters():
            ref[n] += 0.1 * (p.detach().double() - ref[n])
    assert ema.backend == "cpu"
    shadows = dict(ema.named_shadows())
    for n, r in ref.items():
        assert shadows[n].dtype == torch.float32
        # four fp32 steps on values below ~2: a few fp32 ulps of 2 at most
        torch.testing.assert_close(shadows[n].double(), r, rtol=0, atol=2e-6)
    with ema.average_parameters():
        for n, p in model.named_parameters():
            assert torch.equal(p, shadows[n].to(torch.bfloat16))


def test_unloaded_extension_is_reported_and_auto_falls_back(monkeypatch):
    monkeypatch.setattr(_extension, "_how", None)
    monkeypatch.setattr(_extension, "_aot_error", "no AOT build (test)")
    monkeypatch.setattr(_extension, "_jit_error", None)
    monkeypatch.setattr(_extension, "_cached_jit_library", lambda: None)
    usable, why = ema_fused.available_backends("cpu")["cpu"]
    assert not usable and "python -m ema_fused build" in why and "no AOT build (test)" in why
    assert _backend.select("auto", torch.device("cpu")).name != "cpu"

    def failing_build(*args, **kwargs):
        raise RuntimeError("no compiler here (test)")

    monkeypatch.setattr(_extension, "_build_now", failing_build)
    with pytest.raises(_backend.BackendUnavailableError, match="no compiler here"):
        _backend.select("cpu", torch.device("cpu"))


def test_jit_build_compiles_loads_and_is_found_again(tmp_path):
    """The real CPU sources, built just in time in a fresh interpreter (no AOT loaded)."""
    pytest.importorskip("ninja")
    script = (
        "import torch\n"
        "from ema_fused.backends import extension as e\n"
        "where, mod = e._build_now(with_cuda=False)\n"
        "assert hasattr(mod, 'Snapshot') and hasattr(mod, 'PairSet'), dir(mod)\n"
        "s, p = [torch.zeros(5)], [torch.ones(5, dtype=torch.bfloat16)]\n"
        "torch.ops.ema_fused.kernel_update_(s, p, 0.25)\n"
        "assert torch.equal(s[0], torch.full((5,), 0.25)), s\n"
        "found = e._cached_jit_library()\n"
        "assert found is not None and str(found).startswith(where), (found, where)\n"
        "print('ok', where)\n")
    env = dict(os.environ, TORCH_EXTENSIONS_DIR=str(tmp_path))
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                         env=env, cwd=ROOT, timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]
    assert out.stdout.startswith("ok " + str(tmp_path))
    assert "building the C++ extension just in time" in out.stderr  # said before the wait
    # a fresh interpreter imports the cached build as a module, compiling nothing
    again = ("from ema_fused.backends import extension as e\n"
             "mod = e._import_library(e._cached_jit_library())\n"
             "s = mod.Snapshot([], [], [], [], [], [], [], [])\n"
             "assert s.still_valid()\n"
             "print('ok')\n")
    out = subprocess.run([sys.executable, "-c", again], capture_output=True, text=True,
                         env=env, cwd=ROOT, timeout=120)
    assert out.returncode == 0 and out.stdout.strip() == "ok", out.stderr[-3000:]
    # with no AOT build, load() takes the cached build without importing
    # torch.utils.cpp_extension (its import warns "No CUDA runtime is found")
    cached = ("import sys\n"
              "sys.modules['ema_fused._C'] = None  # as if no AOT build were installed\n"
              "import torch\n"
              "from ema_fused.backends import extension as e\n"
              "assert e.load(build=False) and e.loaded().startswith('jit, cached'), e.error()\n"
              "import ema_fused\n"
              "ema = ema_fused.EMA(torch.nn.Linear(4, 4), backend='cpu')\n"
              "ema.update()\n"
              "print('torch.utils.cpp_extension' in sys.modules)\n")
    out = subprocess.run([sys.executable, "-c", cached], capture_output=True, text=True,
                         env=env, cwd=ROOT, timeout=120)
    assert out.returncode == 0 and out.stdout.strip() == "False", out.stderr[-3000:]
    assert "No CUDA runtime" not in out.stderr


def test_build_command_rejects_unknown_options():
    out = subprocess.run([sys.executable, "-m", "ema_fused", "build", "--bogus"],
                         capture_output=True, text=True, cwd=ROOT, timeout=120)
    assert out.returncode == 2 and "--bogus" in out.stderr


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_cpu_one_16bit_dtype_pairs_give_torchs_bits(ext, dtype):
    """fp16 pairs on the CPU are updated and copied by torch's vectorised lerp / copy
    (faster than the C++ loops there), bf16 pairs updated by the C++ loops (two elements a
    word) and copied by torch; mixed pairs stay in the kernels; the results are torch's to the bit either way, for
    weights on both sides of 0.5, odd sizes and views off the 4-byte grid."""
    from ema_fused.backends import cpp
    gen = torch.Generator().manual_seed(21)
    shadows = [rand(n, dtype, gen) for n in (1, 7, 4097, 100003)]
    params = [rand(n, dtype, gen) for n in (1, 7, 4097, 100003)]
    shadows.append(rand(9001, dtype, gen)[1:])  # off the 4-byte grid, the param on it
    params.append(rand(9000, dtype, gen))
    shadows.append(rand(9001, dtype, gen)[1:])  # both off it: paired after one element
    params.append(rand(9001, dtype, gen)[1:])
    params[3][::97] = float("nan")
    params[3][5::89] = float("inf")
    mixed = (rand(5, torch.float32, gen), rand(5, dtype, gen))
    ks, _, rs, _ = cpp._split("update", shadows + [mixed[0]], params + [mixed[1]])
    if dtype == torch.float16:
        assert ks == [mixed[0]] and len(rs) == len(shadows)
    else:
        assert len(ks) == len(shadows) + 1 and not rs
    ks, _, rs, _ = cpp._split("copy", shadows + [mixed[0]], params + [mixed[1]])
    assert ks == [mixed[0]] and len(rs) == len(shadows)
    for w in (0.001, 0.7):
        ours, theirs = [s.clone() for s in shadows], [s.clone() for s in shadows]
        ema_update_(ours, params, w, backend="cpu")
        torch._foreach_lerp_(theirs, params, w)
        for i, (a, b) in enumerate(zip(ours, theirs)):  # NaN compared by its bits too
            same = (a.view(torch.int16) == b.view(torch.int16)) | (a.isnan() & b.isnan())
            assert bool(same.all()), (i, w, int((~same).sum()))
    ema_copy_(shadows, params, 0.5, backend="cpu")
    for s, p in zip(shadows, params):
        want = (p.float() * 0.5).to(dtype)
        assert bool(((s.view(torch.int16) == want.view(torch.int16)) | (s.isnan() & want.isnan())).all())
