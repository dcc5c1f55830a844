"""A wheel (no extension build: pure Python) carries every module of the package: each
subpackage of ema_fused/, the Triton kernels as ema_fused.triton_kernels and csrc/ as
ema_fused.csrc (for a just-in-time build)."""
from __future__ import annotations

import glob
import os
import shutil
import subprocess
import sys
import zipfile

from helpers.paths import ROOT


def _expected() -> set[str]:
    names = set()
    for base, prefix in (("ema_fused", "ema_fused"), ("triton_kernels", "ema_fused/triton_kernels"),
                         ("csrc", "ema_fused/csrc")):
        for path in glob.glob(os.path.join(ROOT, base, "**", "*"), recursive=True):
            if path.endswith((".py", ".cpp", ".cu", ".h")) and "__pycache__" not in path:
                names.add(prefix + "/" + os.path.relpath(path, os.path.join(ROOT, base)))
    return names


def test_wheel_carries_every_module(tmp_path):
    # built from a copy of the sources: setuptools reuses a checkout's build/lib, which
    # would hide a module the package list leaves out
    src = tmp_path / "src"
    ignore = shutil.ignore_patterns("__pycache__", "*.so", "*.egg-info")
    for folder in ("ema_fused", "triton_kernels", "csrc"):
        shutil.copytree(os.path.join(ROOT, folder), src / folder, ignore=ignore)
    for name in ("setup.py", "pyproject.toml", "README.md"):
        shutil.copy(os.path.join(ROOT, name), src / name)
    env = {k: v for k, v in os.environ.items() if k != "EMA_FUSED_BUILD_EXT"}
    out = subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation",
                          "--no-index", "-q", "-w", str(tmp_path), str(src)],
                         capture_output=True, text=True, env=env, timeout=300)
    assert out.returncode == 0, out.stdout[-2000:] + out.stderr[-2000:]
    (wheel,) = tmp_path.glob("ema_fused-*.whl")
    names = set(zipfile.ZipFile(wheel).namelist())
    expected = _expected()
    assert len(expected) > 60
    missing = sorted(expected - names)
    assert not missing, missing
