"""Packaging.  A pure-Python install by default.

The C++/CUDA extension in csrc/ will be built only when asked for
(EMA_FUSED_BUILD_EXT=1, with --no-build-isolation so the installed torch is used).
The Triton kernels in triton_kernels/ install as the subpackage
``ema_fused.triton_kernels``: a top-level ``triton_kernels`` module already exists
elsewhere (the Triton project ships one).
"""
import os

from setuptools import setup

if os.environ.get("EMA_FUSED_BUILD_EXT", "0") not in ("", "0"):
    raise SystemExit("EMA_FUSED_BUILD_EXT=1: this version of ema_fused has no C++/CUDA "
                     "extension to build yet; install without it")

setup(
    packages=["ema_fused", "ema_fused.triton_kernels"],
    package_dir={"ema_fused": "ema_fused", "ema_fused.triton_kernels": "triton_kernels"},
)
