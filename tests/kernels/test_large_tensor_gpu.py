"""One tensor of more than 2^31 elements through both GPU kernel backends (skipped without
a GPU): element indices and tile numbers past int32 must reach the end of the tensor,
write every element once, and touch nothing twice.

Cheap on purpose: the smallest float pair, a bf16 param with a bf16 shadow (2 + 2 bytes
an element), N = 2^31 + 4099 elements: 8 GiB for the update, 12 GiB for the two-profile
multi-update (each test frees its tensors; an H100 has 80 GB).  Constant inputs make the
exact result known everywhere without a float64 copy: shadow 0, param 1, weight 1/2 give
0.5 in every element updated once (0 if missed, 0.75 if updated twice); the first and
last elements and those around 2^31 are checked one by one, and every element by a count.
"""
from __future__ import annotations

import pytest
import torch

from ema_fused import ema_multi_update_, ema_update_

from helpers.gpu import gpu_backend

pytestmark = [pytest.mark.gpu,
              pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]

N = (1 << 31) + 4099  # past int32, with a partial last tile for both backends' tile sizes
CHECKED = (0, 1, (1 << 31) - 1, 1 << 31, (1 << 31) + 1, N - 2, N - 1)
GIB = 1 << 30


@pytest.fixture(params=["triton", "cuda"])
def backend(request):
    return gpu_backend(request.param)


def _room(n_tensors: int) -> None:
    free, _ = torch.cuda.mem_get_info()
    need = n_tensors * N * 2 + GIB  # 2 bytes an element, and room for the checks
    if free < need:
        pytest.skip(f"needs {need / GIB:.1f} GiB of free GPU memory, {free / GIB:.1f} GiB free")


def _assert_all(t: torch.Tensor, value: float, what: str) -> None:
    got = {i: float(t[i]) for i in CHECKED}
    assert got == dict.fromkeys(CHECKED, value), f"{what}: {got}"
    wrong = int(torch.count_nonzero(t != value))
    assert wrong == 0, f"{what}: {wrong} of {N} elements are not {value}"


def test_update_of_a_tensor_past_2_31_elements(backend):
    _room(2)
    shadow = torch.zeros(N, dtype=torch.bfloat16, device="cuda")
    param = torch.ones(N, dtype=torch.bfloat16, device="cuda")
    ema_update_([shadow], [param], 0.5, backend=backend)
    torch.cuda.synchronize()
    _assert_all(shadow, 0.5, f"{backend} update")
    _assert_all(param, 1.0, f"{backend} update's param")


def test_multi_update_of_a_tensor_past_2_31_elements(backend):
    _room(3)
    param = torch.ones(N, dtype=torch.bfloat16, device="cuda")
    shadows = [[torch.zeros(N, dtype=torch.bfloat16, device="cuda")] for _ in range(2)]
    ema_multi_update_(shadows, [param], [0.5, 0.25], backend=backend)
    torch.cuda.synchronize()
    _assert_all(shadows[0][0], 0.5, f"{backend} multi-update, profile 0")
    _assert_all(shadows[1][0], 0.25, f"{backend} multi-update, profile 1")
