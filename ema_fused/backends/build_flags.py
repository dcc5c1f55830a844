"""What the C++/CUDA extension is built from and with: one place for setup.py (AOT)
and :mod:`ema_fused.backends.extension` (JIT).  Imports nothing from ema_fused, so setup.py
can load this file alone."""
from __future__ import annotations

import os
import re
import shutil
import subprocess
from typing import Optional

#: Sources in csrc/; CUDA ones only when the build has CUDA.  python_module.cpp is the
#: Python module (``ema_fused._C``, or the JIT build's name) with host_path.cpp's and
#: cpu_offload.cpp's helpers.
CPU_SOURCES = ("ema_ops.cpp", "cpu_kernels.cpp", "host_path.cpp", "python_module.cpp",
               "cpu_multi_shadow.cpp", "cpu_offload.cpp", "cpu_stochastic.cpp",
               "cpu_stochastic_loops.cpp", "cpu_stochastic_avx2.cpp", "cpu_stochastic_avx512.cpp")
CUDA_SOURCES = ("cuda_kernels.cu", "cuda_multi_shadow.cu")

#: Always-built arches: A100 and H100 class GPUs.
BASE_ARCHES = ("8.0", "9.0")


def cxx_flags() -> list[str]:
    return ["-O3"]


def nvcc_flags() -> list[str]:
    """``-O3``, plus ``--threads`` from ``NVCC_THREADS`` (nvcc compiles arches in parallel)."""
    flags = ["-O3"]
    threads = os.environ.get("NVCC_THREADS", "").strip()
    if threads:
        if not threads.isdigit():
            raise ValueError(f"NVCC_THREADS must be a whole number, got {threads!r}")
        flags.append(f"--threads={threads}")
    return flags


def nvcc_path(cuda_home: Optional[str]) -> Optional[str]:
    if cuda_home:
        candidate = os.path.join(cuda_home, "bin", "nvcc")
        if os.path.exists(candidate):
            return candidate
    return shutil.which("nvcc")


def cuda_problem(torch_cuda: Optional[str], torch_version: str,
                 cuda_home: Optional[str]) -> Optional[str]:
    """Why the CUDA kernels cannot be built here, or None if they can."""
    if torch_cuda is None:
        return f"torch {torch_version} is not a CUDA build"
    if nvcc_path(cuda_home) is None:
        return "no CUDA toolkit (nvcc) found; set CUDA_HOME"
    if not cuda_home or not os.path.exists(os.path.join(cuda_home, "include", "cuda_runtime.h")):
        return (f"torch takes {cuda_home!r} for the CUDA toolkit, but it has no "
                "include/cuda_runtime.h; set CUDA_HOME to the toolkit's root "
                "(e.g. /usr/local/cuda)")
    return None


def newest_toolkit_arch(nvcc: str) -> Optional[str]:
    """The newest ``compute_XY`` that ``nvcc --list-gpu-arch`` names, as ``"X.Y"``."""
    try:
        out = subprocess.run([nvcc, "--list-gpu-arch"], capture_output=True, text=True,
                             timeout=60, check=True).stdout
    except (OSError, subprocess.SubprocessError):
        return None
    found = [int(m) for m in re.findall(r"compute_(\d+)", out)]
    if not found:
        return None
    newest = max(found)
    return f"{newest // 10}.{newest % 10}"


def default_arch_list(nvcc: Optional[str]) -> str:
    """``TORCH_CUDA_ARCH_LIST`` when the user gave none: 8.0, 9.0 and the newest arch the
    toolkit supports (with PTX, so newer GPUs can still JIT it)."""
    arches = list(BASE_ARCHES)
    newest = newest_toolkit_arch(nvcc) if nvcc else None
    if newest in arches:
        arches[arches.index(newest)] = newest + "+PTX"
    elif newest:
        arches.append(newest + "+PTX")
    return ";".join(arches)
