"""The offload's C++ helpers (csrc/cpu_offload.cpp): ``capture_`` copies bit for bit
(streaming stores for large copies, plain ones for small), names the bad pair, and
``set_cpu_threads`` is one thread's setting alone."""
from __future__ import annotations

import threading

import pytest
import torch

from ema_fused.backends import extension as _extension

from helpers.numerics import seeded


@pytest.fixture(scope="module")
def ext():
    if not _extension.load(build=True):
        pytest.fail(f"the extension neither loads nor builds here: {_extension.error()}")
    return _extension.module()


def _bits(n: int, dtype: torch.dtype, gen: torch.Generator) -> torch.Tensor:
    """Random bit patterns of ``dtype`` (NaNs with payloads, infinities, subnormals)."""
    size = torch.empty(0, dtype=dtype).element_size()
    raw = torch.randint(0, 256, (n * size,), dtype=torch.uint8, generator=gen)
    return raw.view(dtype)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32,
                                   torch.float64, torch.int64, torch.uint8])
@pytest.mark.parametrize("offset", [0, 1, 3])
def test_capture_copies_every_bit(ext, dtype, offset):
    gen = seeded("capture", dtype, offset)
    sizes = [0, 1, 7, 65537, 5_000_011]  # the last one crosses the streaming threshold
    src = [_bits(n + offset, dtype, gen)[offset:] for n in sizes]
    dst = [torch.empty(n + 2 * offset, dtype=dtype)[2 * offset:] for n in sizes]
    ext.capture_(dst, src)
    for d, s in zip(dst, src):
        assert torch.equal(d.view(torch.uint8), s.view(torch.uint8))


def test_capture_names_the_bad_pair(ext):
    ok = torch.zeros(4)
    with pytest.raises(RuntimeError, match=r"dst\[1\] is Float \[4\] but src\[1\] is Float \[5\]"):
        ext.capture_([ok, torch.zeros(4)], [ok.clone(), torch.zeros(5)])
    with pytest.raises(RuntimeError, match=r"dst\[0\] is Float .* but src\[0\] is BFloat16"):
        ext.capture_([ok], [ok.bfloat16()])
    with pytest.raises(RuntimeError, match=r"dst\[0\] and src\[0\] must be contiguous"):
        ext.capture_([torch.zeros(3, 4).t()], [torch.zeros(4, 3)])
    with pytest.raises(RuntimeError, match="dst has 1 tensors but src has 2"):
        ext.capture_([ok], [ok, ok])


def test_cpu_threads_is_this_threads_setting(ext):
    seen = {}

    def other():
        ext.set_cpu_threads(1)
        seen["other"] = ext.cpu_threads()

    before = ext.cpu_threads()
    thread = threading.Thread(target=other)
    thread.start()
    thread.join()
    assert seen["other"] == 1
    assert ext.cpu_threads() == before == 0
    with pytest.raises(RuntimeError, match="n must be >= 0"):
        ext.set_cpu_threads(-1)
