"""A model changed after the EMA was made: follow new storage, or fail naming the tensor.

Every test runs twice: with the C++ snapshot that lets a cached plan skip re-reading
the model (``ema_fused.ema.host_path``, when the extension is loaded) and with the Python check.
Each EMA runs one update before the change, so the change meets a cached plan.
"""
from __future__ import annotations

import pytest
import torch
from torch import nn

from ema_fused import EMA, ModelChangedError
from ema_fused.ema import host_path as _host_path
from ema_fused.backends import extension as _extension

from helpers.ema_reference import make_model


@pytest.fixture(params=["snapshot", "python"], autouse=True)
def check_mode(request, monkeypatch):
    if request.param == "snapshot":
        if not _extension.load(build=False):
            pytest.skip(f"the C++ extension is not built here: {_extension.error()}")
    else:
        monkeypatch.setattr(_host_path, "snapshot", lambda *args: None)
    return request.param


def _ema(check_mode, model, **kwargs):
    """An EMA whose plan is built and cached (one update), checked the given way."""
    ema = EMA(model, **kwargs)
    ema.update()
    assert (ema._plan.snapshot is not None) == (check_mode == "snapshot")
    return ema


def _shadow(ema, name):
    return dict(ema.named_shadows())[name]


def test_added_parameter_is_named(check_mode):
    model = make_model()
    ema = _ema(check_mode, model)
    model[3].extra = nn.Parameter(torch.zeros(2))
    with pytest.raises(ModelChangedError, match=r"added \['3.extra'\]"):
        ema.update()


def test_added_submodule_is_named(check_mode):
    model = make_model()
    ema = _ema(check_mode, model)
    model.append(nn.Linear(5, 2))
    with pytest.raises(ModelChangedError, match=r"added \['4.bias', '4.weight'\]"):
        ema.update()


def test_removed_tensor_is_named(check_mode):
    model = make_model()
    ema = _ema(check_mode, model)
    del model[0].bias
    model[0].register_parameter("bias", None)
    with pytest.raises(ModelChangedError, match=r"0.bias"):
        ema.update()


def test_reshaped_tensor_is_named_with_both_shapes(check_mode):
    model = make_model()
    ema = _ema(check_mode, model)
    before = {n: s.clone() for n, s in ema.named_shadows()}
    model[3].weight.data = torch.zeros(5, 14)
    with pytest.raises(ModelChangedError, match=r"'3.weight' changed shape from \(5, 13\) to \(5, 14\)"):
        ema.update()
    assert all(torch.equal(s, before[n]) for n, s in ema.named_shadows())


def test_replaced_storage_is_followed(check_mode):
    model = make_model()
    ema = _ema(check_mode, model, decay=0.5)
    old = model[0].weight.data
    model[0].weight.data = torch.full_like(old, 3.0)  # p.data = ...
    old.fill_(-100.0)  # writing the old storage must not matter
    start = _shadow(ema, "0.weight").clone()
    ema.update()
    torch.testing.assert_close(_shadow(ema, "0.weight"), 0.5 * start + 1.5)
    ema.copy_to()
    assert bool((old == -100.0).all())  # copy_to wrote the new storage, not the old one


def test_load_state_dict_assign_is_followed(check_mode):
    model = make_model()
    ema = _ema(check_mode, model, decay=0.5)
    start = _shadow(ema, "3.bias").clone()
    new = {k: torch.ones_like(v) if v.is_floating_point() else v for k, v in model.state_dict().items()}
    model.load_state_dict(new, assign=True)
    ema.update()
    torch.testing.assert_close(_shadow(ema, "3.bias"), 0.5 * start + 0.5)


def test_model_to_dtype_is_followed_without_downcasting_shadows(check_mode):
    model = make_model()
    ema = _ema(check_mode, model, decay=0.5)
    start = _shadow(ema, "0.weight").clone()
    model.to(torch.bfloat16)
    ema.update()
    s = _shadow(ema, "0.weight")
    assert s.dtype == torch.float32
    torch.testing.assert_close(s, 0.5 * start + 0.5 * model[0].weight.float(), rtol=0, atol=1e-7)
    ema.copy_to()
    assert model[0].weight.dtype == torch.bfloat16


def test_model_widened_beyond_shadow_dtype_fails_clearly(check_mode):
    model = make_model(torch.bfloat16)
    ema = _ema(check_mode, model, dtype=None)
    model.to(torch.float32)
    with pytest.raises(TypeError, match=r"'0.weight' is now torch.float32 but its shadow is torch.bfloat16"):
        ema.update()


def test_swapped_submodule_of_same_shape_is_followed(check_mode):
    model = make_model()
    ema = _ema(check_mode, model, decay=0.5)
    start = _shadow(ema, "3.weight").clone()
    model[3] = nn.Linear(13, 5)
    with torch.no_grad():
        model[3].weight.fill_(2.0)
    ema.update()
    torch.testing.assert_close(_shadow(ema, "3.weight"), 0.5 * start + 1.0)


def test_list_ema_follows_tensor_objects(check_mode):
    w = nn.Parameter(torch.zeros(3))
    ema = _ema(check_mode, [w], decay=0.5)
    w.data = torch.ones(3)
    ema.update()
    torch.testing.assert_close(_shadow(ema, "0"), torch.full((3,), 0.5))
    with pytest.raises(ModelChangedError, match="expected 1 tensors, got 2"):
        ema.copy_to([w, w])


def test_reused_plan_follows_storage_replaced_after_several_updates(check_mode):
    model = make_model()
    ema = _ema(check_mode, model, decay=0.5)
    for _ in range(3):  # the plan is built once, then reused
        ema.update()
    plan = ema._plan
    ema.update()
    assert ema._plan is plan
    start = _shadow(ema, "0.weight").clone()
    old = model[0].weight.data
    model[0].weight.data = torch.full_like(old, 5.0)
    old.fill_(-7.0)
    ema.update()
    assert ema._plan is not plan
    torch.testing.assert_close(_shadow(ema, "0.weight"), 0.5 * start + 2.5)


def test_same_address_new_dtype_or_layout_rebuilds_the_plan(check_mode):
    w = nn.Parameter(torch.arange(16.0).view(4, 4))
    ema = _ema(check_mode, [w], decay=0.5, dtype=None)
    ema.update()
    plan = ema._plan
    w.data = w.data.t()  # same storage, same shape, transposed layout
    assert w.data_ptr() == w.data.t().data_ptr()
    start = _shadow(ema, "0").clone()
    ema.update()
    assert ema._plan is not plan
    torch.testing.assert_close(_shadow(ema, "0"), 0.5 * start + 0.5 * w.detach())
    v = nn.Parameter(torch.zeros(4, dtype=torch.bfloat16))
    ema_v = _ema(check_mode, [v], decay=0.5)
    ema_v.update()
    plan_v = ema_v._plan
    v.data = v.data.view(torch.float16)  # same address and shape, another dtype
    ema_v.update()
    assert ema_v._plan is not plan_v and _shadow(ema_v, "0").dtype == torch.float32


def test_swap_tensors_is_followed(check_mode):
    """torch.utils.swap_tensors keeps the Parameter object but gives it another TensorImpl
    (what Module._apply does under the swap-on-conversion flag)."""
    model = make_model()
    ema = _ema(check_mode, model, decay=0.5)
    start = _shadow(ema, "0.weight").clone()
    p = model[0].weight
    new = nn.Parameter(torch.full_like(p, 4.0))
    torch.utils.swap_tensors(p, new)
    assert model[0].weight is p and bool((p == 4.0).all())
    new.data.fill_(-9.0)  # the old TensorImpl, now `new`'s: must not be what is read
    ema.update()
    torch.testing.assert_close(_shadow(ema, "0.weight"), 0.5 * start + 2.0)


def test_module_to_with_swap_on_conversion_is_followed(check_mode):
    model = make_model()
    ema = _ema(check_mode, model, decay=0.5)
    start = _shadow(ema, "0.weight").clone()
    before = torch.__future__.get_swap_module_params_on_conversion()
    torch.__future__.set_swap_module_params_on_conversion(True)
    try:
        model.to(torch.bfloat16)
    finally:
        torch.__future__.set_swap_module_params_on_conversion(before)
    ema.update()
    torch.testing.assert_close(_shadow(ema, "0.weight"),
                               0.5 * start + 0.5 * model[0].weight.float(), rtol=0, atol=1e-7)


def test_deleted_submodule_is_named(check_mode):
    model = make_model()
    ema = _ema(check_mode, model)
    del model[3]  # Sequential rebuilds its module dict
    with pytest.raises(ModelChangedError, match=r"removed \['3.bias', '3.weight'\]"):
        ema.update()


def test_parameter_object_replaced_in_its_dict_is_followed(check_mode):
    """Module._apply with overwrite-on-conversion writes _parameters[key] directly (no hook)."""
    model = make_model()
    ema = _ema(check_mode, model, decay=0.5)
    start = _shadow(ema, "3.bias").clone()
    model[3]._parameters["bias"] = nn.Parameter(torch.full((5,), 2.0))
    ema.update()
    torch.testing.assert_close(_shadow(ema, "3.bias"), 0.5 * start + 1.0)


def test_buffer_replaced_and_added_are_seen(check_mode):
    model = nn.Sequential(nn.Linear(3, 3), nn.BatchNorm1d(3))
    ema = _ema(check_mode, model, decay=0.5)
    start = _shadow(ema, "1.running_mean").clone()
    model[1].running_mean = torch.full((3,), 4.0)  # a new buffer object, same name
    ema.update()
    torch.testing.assert_close(_shadow(ema, "1.running_mean"), 0.5 * start + 2.0)
    model[1].register_buffer("extra", torch.zeros(1))
    with pytest.raises(ModelChangedError, match=r"added \['1.extra'\]"):
        ema.update()


def test_unchanged_model_keeps_its_plan(check_mode):
    model = make_model()
    ema = _ema(check_mode, model, decay=0.5)
    plan = ema._plan
    for _ in range(3):
        with torch.no_grad():
            for p in model.parameters():
                p.add_(1.0)  # values change in place: the plan stays
        ema.update()
    assert ema._plan is plan


def test_new_parameter_over_the_same_storage_gets_a_new_plan(check_mode):
    """Same address and layout, another Parameter object: the Python key cannot tell, the
    snapshot can; either way the update reaches the model's tensor."""
    model = make_model()
    ema = _ema(check_mode, model, decay=0.5)
    plan = ema._plan
    start = _shadow(ema, "3.bias").clone()
    model[3].bias = nn.Parameter(model[3].bias.data)  # aliases the old storage
    with torch.no_grad():
        model[3].bias.fill_(6.0)
    ema.update()
    torch.testing.assert_close(_shadow(ema, "3.bias"), 0.5 * start + 3.0)
    if check_mode == "snapshot":
        assert ema._plan is not plan and ema._plan.snapshot.still_valid()
