"""Model changes that used to give silent wrong results, and tensors no EMA can hold
(issue 13, items 1, 2, 7, 8 and 11): untied or newly tied weights, a model moved to
``meta``, float8 and stride-0 tensors, wrapped and unwrapped models, frozen parameters.

Every test runs with the C++ snapshot (when the extension is loaded) and with the
Python check, after one update has cached the plan (``check_mode`` from
test_model_changes.py).
"""
from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from ema_fused import EMA, ModelChangedError
from ema_fused.ema.checkpoint import plain_name

from test_model_changes import _ema, check_mode  # noqa: F401  (the fixture)

BACKENDS = ["foreach", "cpu"]


class Tied(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.emb = nn.Embedding(11, 6)
        self.mid = nn.Linear(6, 6)
        self.head = nn.Linear(6, 11, bias=False)
        self.head.weight = self.emb.weight


@pytest.mark.parametrize("backend", BACKENDS)
def test_untying_weights_is_a_model_change_naming_both(check_mode, backend):
    model = Tied()
    ema = _ema(check_mode, model, decay=0.5, backend=backend)
    before = {n: s.clone() for n, s in ema.named_shadows()}
    model.head.weight = nn.Parameter(model.head.weight.detach().clone())
    for call in (ema.update, ema.copy_to, ema.store):
        with pytest.raises(ModelChangedError, match=r"'head.weight' was tied to 'emb.weight'"):
            call()
    assert all(torch.equal(s, before[n]) for n, s in ema.named_shadows())


@pytest.mark.parametrize("backend", BACKENDS)
def test_tying_weights_later_is_a_model_change_naming_both(check_mode, backend):
    model = nn.Sequential(nn.Linear(4, 4), nn.Linear(4, 4))
    ema = _ema(check_mode, model, decay=0.5, backend=backend)
    model[1].bias = nn.Parameter(torch.zeros(4))  # a new tensor in a slot: followed
    ema.update()
    model[1].weight = model[0].weight
    with pytest.raises(ModelChangedError, match=r"'0.weight' and '1.weight' were distinct"):
        ema.update()


def test_a_model_moved_to_meta_is_refused_and_the_shadows_stay(check_mode):
    model = nn.Sequential(nn.Linear(4, 3))
    ema = _ema(check_mode, model, decay=0.5)
    before = {n: s.clone() for n, s in ema.named_shadows()}
    model.to("meta")
    with pytest.raises(ModelChangedError, match=r"tensor '0.weight' is now on the meta device"):
        ema.update()
    assert all(s.device.type == "cpu" and torch.equal(s, before[n])
               for n, s in ema.named_shadows())


def test_an_ema_of_a_meta_model_is_refused_at_construction():
    with torch.device("meta"):
        model = nn.Linear(4, 3)
    with pytest.raises(TypeError, match="create the EMA after materializing the model"):
        EMA(model)
    with pytest.raises(ValueError, match="device='meta'"):
        EMA(nn.Linear(2, 2), device="meta")


def test_float8_tensors_are_copied_never_averaged(check_mode):
    if not hasattr(torch, "float8_e4m3fn"):
        pytest.skip("this torch has no float8")
    model = nn.Linear(4, 3)
    model.register_buffer("scale8", torch.tensor([0.5, 2.0, -1.0]).to(torch.float8_e4m3fn))
    ema = _ema(check_mode, model, decay=0.5)
    model.scale8.copy_(torch.tensor([4.0, 8.0, 1.0]).to(torch.float8_e4m3fn))
    ema.update()
    shadow = dict(ema.named_shadows())["scale8"]
    assert shadow.dtype == torch.float8_e4m3fn and torch.equal(shadow.float(), model.scale8.float())


def test_a_stride_zero_parameter_is_refused_naming_it():
    model = nn.Linear(4, 3)
    model.expanded = nn.Parameter(torch.zeros(1).expand(5))
    with pytest.raises(TypeError, match=r"tensor 'expanded' .*share memory .*stride-0"):
        EMA(model)


def _wrapped(wrap: str):
    """(the model an EMA is made on, the plain module holding the very same tensors)."""
    torch.manual_seed(0)
    inner = nn.Sequential(nn.Linear(4, 4), nn.LayerNorm(4))
    if wrap == "compile":
        return torch.compile(inner), inner
    if wrap == "dataparallel":
        return nn.DataParallel(inner), inner
    outer = nn.Sequential(nn.Linear(4, 4))  # a compiled submodule: names hold _orig_mod.
    outer.append(torch.compile(inner))
    plain = nn.Sequential(outer[0], inner)
    return outer, plain


@pytest.mark.parametrize("wrap", ["compile", "dataparallel", "compiled-submodule"])
def test_the_module_inside_a_wrapper_is_the_same_model(check_mode, wrap):
    """copy_to / average_parameters / store with the unwrapped module of an EMA made on
    a wrapped model (and the other way round) match names as load_state_dict does."""
    outer, plain = _wrapped(wrap)
    ema = _ema(check_mode, outer, decay=0.5)
    with torch.no_grad():
        for p in plain.parameters():
            p.add_(1.0)
    ema.update()
    averaged = {plain_name(k): v for k, v in ema.averaged_weights().items()}
    twin = copy.deepcopy(plain)
    ema.copy_to(twin)
    assert all(torch.equal(t, averaged[n]) for n, t in twin.state_dict().items())
    raw = {n: t.clone() for n, t in plain.state_dict().items()}
    with ema.average_parameters(plain):
        assert all(torch.equal(t, averaged[n]) for n, t in plain.state_dict().items())
    assert all(torch.equal(t, raw[n]) for n, t in plain.state_dict().items())
    ema.store(plain)
    ema.restore(plain)
    reverse = _ema(check_mode, plain, decay=0.5)
    reverse.copy_to(outer)  # an EMA of the plain module writes into the wrapped one


@pytest.mark.parametrize("backend", BACKENDS)
def test_trainable_only_leaves_frozen_parameters_alone(check_mode, backend):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 8), nn.BatchNorm1d(8), nn.Linear(8, 2))
    model[0].requires_grad_(False)
    ema = _ema(check_mode, model, decay=0.5, backend=backend, trainable_only=True)
    names = set(dict(ema.named_shadows()))
    assert "0.weight" not in names and "2.weight" in names and "1.running_mean" in names
    frozen = model[0].weight.detach().clone()
    with torch.no_grad():
        model[0].weight.add_(5.0)
        model[2].weight.add_(1.0)
    ema.update()
    ema.copy_to()
    assert torch.equal(model[0].weight, frozen + 5.0)  # reads leave frozen weights as they are
    model[0].weight.requires_grad_(True)
    with pytest.raises(ModelChangedError, match=r"parameter '0.weight' had requires_grad=False"):
        ema.update()
    everything = EMA(model, decay=0.5)
    assert "0.weight" in dict(everything.named_shadows())  # the default keeps them


def test_trainable_only_on_a_list_of_tensors(check_mode):
    a, b = nn.Parameter(torch.ones(3)), torch.zeros(3)  # b: requires_grad=False
    ema = _ema(check_mode, [a, b], decay=0.5, trainable_only=True)
    assert set(dict(ema.named_shadows())) == {"0"}
    b.requires_grad_(True)
    with pytest.raises(ModelChangedError, match=r"parameter '1' had requires_grad=False"):
        ema.update()


def _fine_tuned():
    """A model with a frozen first layer, and a fresh copy of it whose parameters all
    require grad (as a newly built model's do)."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 8), nn.BatchNorm1d(8), nn.Linear(8, 2))
    model[0].requires_grad_(False)
    torch.manual_seed(1)
    fresh = nn.Sequential(nn.Linear(8, 8), nn.BatchNorm1d(8), nn.Linear(8, 2))
    return model, fresh


@pytest.mark.parametrize("backend", BACKENDS)
def test_trainable_only_reads_into_another_model_whose_params_all_train(check_mode, backend):
    """trainable_only selects what is averaged; copy_to(other), average_parameters(other)
    and store/restore(other) write those tensors into another model, whatever its
    requires_grad flags, and leave the rest of it alone (issue 20, item 7)."""
    model, fresh = _fine_tuned()
    ema = _ema(check_mode, model, decay=0.5, backend=backend, trainable_only=True)
    with torch.no_grad():
        model[2].weight.add_(1.0)
    ema.update()
    shadows = {n: s.clone() for n, s in ema.named_shadows()}
    untouched = fresh[0].weight.detach().clone()
    raw = {k: v.clone() for k, v in fresh.state_dict().items()}
    with ema.average_parameters(fresh):
        assert torch.equal(fresh[2].weight, shadows["2.weight"])
        assert torch.equal(fresh[0].weight, untouched)
    for k, v in fresh.state_dict().items():
        assert torch.equal(v, raw[k]), k
    ema.copy_to(fresh)
    for name, t in fresh.state_dict().items():
        expected = untouched if name == "0.weight" else (
            raw[name] if name == "0.bias" else shadows[name])
        assert torch.equal(t, expected), name
    # the tracked model itself still may not change what it froze
    model[0].weight.requires_grad_(True)
    with pytest.raises(ModelChangedError, match=r"parameter '0.weight' had requires_grad=False"):
        ema.copy_to()


def test_trainable_only_list_reads_into_another_list():
    a, b = nn.Parameter(torch.ones(3)), torch.zeros(3)  # b: requires_grad=False
    ema = EMA([a, b], decay=0.5, trainable_only=True)
    other = [nn.Parameter(torch.full((3,), 7.0)), nn.Parameter(torch.full((3,), 9.0))]
    ema.copy_to(other)
    assert other[0].tolist() == [1.0] * 3 and other[1].tolist() == [9.0] * 3


def test_an_all_frozen_model_with_trainable_only_says_so():
    model = nn.Sequential(nn.Linear(3, 3), nn.Linear(3, 1)).requires_grad_(False)
    with pytest.raises(ValueError, match=r"nothing to average.*trainable_only=True left out "
                                         r"4 parameters with requires_grad=False"):
        EMA(model, trainable_only=True, buffers="ignore")
    with pytest.raises(ValueError, match=r"trainable_only=True left out 2"):
        EMA([torch.zeros(2), torch.ones(2)], trainable_only=True)
