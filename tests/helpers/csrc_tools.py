"""Building the test-only C++/CUDA sources of tests/kernels/csrc/ (no GPU needed): nvcc for the
PTX/SASS checks, and a host build of the tile-engine emulations."""
from __future__ import annotations

import os
import subprocess
import sys

import pytest

from ema_fused.backends import build_flags

from helpers.paths import ROOT, TESTS


def nvcc() -> str:
    """nvcc's path; skips without it, fails where CI requires the CUDA kernels."""
    path = build_flags.nvcc_path(os.environ.get("CUDA_HOME") or "/usr/local/cuda")
    if path is None:
        if os.environ.get("EMA_FUSED_REQUIRE_CUDA_KERNELS") == "1":
            pytest.fail("EMA_FUSED_REQUIRE_CUDA_KERNELS=1 but nvcc is not found (set CUDA_HOME)")
        pytest.skip("nvcc is not installed here")
    return path


def nvcc_compile(source: str, out: str, *flags: str) -> str:
    """Compile ``source`` for sm_90 into ``out``; returns nvcc's stderr (ptxas reports)."""
    from torch.utils.cpp_extension import include_paths
    cmd = [nvcc(), *flags, "-arch=sm_90", "-O3", "-std=c++17", f"-I{ROOT}/csrc",
           *(f"-I{p}" for p in include_paths()), source, "-o", out]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    if proc.returncode != 0:
        pytest.fail(f"nvcc failed:\n{proc.stderr[-3000:]}")
    return proc.stderr


def load_emulation(name: str, source: str, build_directory: str) -> None:
    """Build and load a host emulation library (it registers its ops with torch)."""
    pytest.importorskip("ninja")
    from torch.utils.cpp_extension import load
    path = os.environ.get("PATH", "")
    os.environ["PATH"] = os.path.dirname(sys.executable) + os.pathsep + path
    try:
        load(name=name, sources=[os.path.join(TESTS, "kernels", "csrc", source)],
             extra_include_paths=[os.path.join(ROOT, "csrc")], extra_cflags=["-O2"],
             build_directory=build_directory, is_python_module=False)
    finally:
        os.environ["PATH"] = path
