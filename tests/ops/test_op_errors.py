"""Bad input to the ops: a clear error naming the tensor, and nothing written."""
from __future__ import annotations

import math

import pytest
import torch

from ema_fused import ema_copy_, ema_update_

from helpers.numerics import rand


def _inputs():
    gen = torch.Generator().manual_seed(0)
    shadows = [rand((3, 4), torch.float32, gen), rand(5, torch.bfloat16, gen),
               rand(2, torch.float32, gen)]
    params = [rand((3, 4), torch.bfloat16, gen), rand(5, torch.float32, gen),
              rand(2, torch.float16, gen)]
    return shadows, params


def _assert_untouched(shadows, before):
    for s, b in zip(shadows, before):
        assert torch.equal(s, b)


@pytest.mark.parametrize("weight", [-0.1, 1.5, math.nan, math.inf, -math.inf])
def test_weight_out_of_range(weight):
    shadows, params = _inputs()
    before = [s.clone() for s in shadows]
    with pytest.raises(ValueError, match=r"weight must be in \[0.0, 1.0\]"):
        ema_update_(shadows, params, weight)
    _assert_untouched(shadows, before)


@pytest.mark.parametrize("weight", [torch.tensor([0.5, 0.5]), torch.tensor(0.5, dtype=torch.float64),
                                    "0.5", None, True])
def test_weight_of_wrong_type(weight):
    shadows, params = _inputs()
    before = [s.clone() for s in shadows]
    with pytest.raises(TypeError, match="weight"):
        ema_update_(shadows, params, weight)
    _assert_untouched(shadows, before)


def test_tensor_weight_on_another_device():
    shadows, params = _inputs()
    with pytest.raises(ValueError, match=r"weight tensor is on meta but shadows\[0\] is on cpu"):
        ema_update_(shadows, params, torch.tensor([0.5], device="meta"))


def test_tensor_weight_is_read_from_the_tensor():
    shadows, params = _inputs()
    expected = [s.clone() for s in shadows]
    ema_update_(expected, params, 0.25)
    ema_update_(shadows, params, torch.tensor([0.25]))
    for s, e in zip(shadows, expected):
        torch.testing.assert_close(s, e, rtol=1e-6, atol=1e-6)


def test_length_mismatch():
    shadows, params = _inputs()
    with pytest.raises(ValueError, match="shadows has 3 tensors but params has 2"):
        ema_update_(shadows, params[:2], 0.5)


def test_shape_mismatch_names_index_and_both_shapes():
    shadows, params = _inputs()
    before = [s.clone() for s in shadows]
    params[2] = torch.zeros(3)
    with pytest.raises(ValueError, match=r"shadows\[2\] \(shape \(2,\).*params\[2\] \(shape \(3,\)"):
        ema_update_(shadows, params, 0.5)
    _assert_untouched(shadows, before)  # shadows[0] and [1] were valid but not written


def test_device_mismatch():
    shadows, params = _inputs()
    before = [s.clone() for s in shadows]
    params[1] = torch.zeros(5, device="meta")
    with pytest.raises(ValueError, match=r"shadows\[1\].*device cpu.*params\[1\].*device meta"):
        ema_update_(shadows, params, 0.5)
    _assert_untouched(shadows, before)


@pytest.mark.parametrize("bad", [torch.int64, torch.bool, torch.complex64, torch.uint8])
@pytest.mark.parametrize("side", ["shadows", "params"])
def test_non_floating_dtype(bad, side):
    shadows, params = _inputs()
    before = [s.clone() for s in shadows]
    target = shadows if side == "shadows" else params
    target[2] = torch.zeros(2, dtype=bad)
    with pytest.raises(TypeError, match=rf"{side}\[2\] has dtype {bad}"):
        ema_update_(shadows, params, 0.5)
    _assert_untouched(shadows[:2], before[:2])


def test_non_tensor_item():
    shadows, params = _inputs()
    params[0] = [1.0, 2.0]
    with pytest.raises(TypeError, match=r"params\[0\] is a list"):
        ema_update_(shadows, params, 0.5)


def test_overlapping_shadow_is_refused():
    shadows, params = _inputs()
    shadows[1] = torch.zeros(1).expand(5)
    with pytest.raises(ValueError, match=r"shadows\[1\].*share memory"):
        ema_update_(shadows, params, 0.5)


def test_shadow_requiring_grad_is_refused_under_grad_mode():
    shadows, params = _inputs()
    shadows[0].requires_grad_(True)
    with pytest.raises(RuntimeError, match=r"shadows\[0\] requires grad"):
        ema_update_(shadows, params, 0.5)
    with torch.no_grad():
        ema_update_(shadows, params, 0.5)


def test_params_requiring_grad_are_fine():
    shadows, params = _inputs()
    params = [p.requires_grad_(True) for p in params]
    ema_update_(shadows, params, 0.5)
    assert not any(s.requires_grad for s in shadows)


def test_copy_checks():
    shadows, params = _inputs()
    before = [p.clone() for p in params]
    with pytest.raises(ValueError, match="scale must be in"):
        ema_copy_(params, shadows, -1.0)
    with pytest.raises(ValueError, match="scale must be in"):
        ema_copy_(params, shadows, math.inf)
    shadows[2] = torch.zeros(7)
    with pytest.raises(ValueError, match=r"dst\[2\].*src\[2\]"):
        ema_copy_(params, shadows, 1.0)
    _assert_untouched(params, before)


def test_unknown_backend_is_refused_before_writing():
    shadows, params = _inputs()
    before = [s.clone() for s in shadows]
    with pytest.raises(ValueError, match="unknown backend 'fast'"):
        ema_update_(shadows, params, 0.5, backend="fast")
    _assert_untouched(shadows, before)
