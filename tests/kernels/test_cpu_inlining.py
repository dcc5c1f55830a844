"""The CPU kernels' element helpers (csrc/cpu_ranges.h: the dtype loads and stores, the
bit helpers) are inlined into every loop: a helper compiled out of line means calls in
the loop and no vectorisation.  GCC once stopped inlining F16::load/store in
cpu_kernels.cpp (its unit-growth limit): every update with a 16-bit shadow and an fp16 on
either side ran at 6-7.5 ns per element instead of 0.5-1.  This reads the built
extension's symbols (binutils' nm), so a build that lost the inlining fails here."""
from __future__ import annotations

import re
import shutil
import subprocess

import pytest

from ema_fused.backends import extension

HELPERS = re.compile(r"ema_fused::\(anonymous namespace\)::(F32|BF16|F16)::(load|store)|"
                     r"ema_fused::\(anonymous namespace\)::(bits_of|float_of|pick|bf16_high|"
                     r"finite_bits|keep_unless)\(")


def test_element_helpers_have_no_out_of_line_copy():
    if not extension.load(build=True):
        pytest.fail(f"the extension neither loads nor builds here: {extension.error()}")
    nm = shutil.which("nm")
    if nm is None:
        pytest.skip("binutils' nm is not installed")
    path = extension.module().__file__
    out = subprocess.run([nm, "-C", path], capture_output=True, text=True, timeout=120,
                         check=True).stdout
    assert "update_elements" in out  # the loops themselves are there (the check can see)
    copies = sorted({line.split(" ", 2)[-1] for line in out.splitlines() if HELPERS.search(line)})
    assert not copies, f"compiled out of line (calls in the loops): {copies[:5]}"
