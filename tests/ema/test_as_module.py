"""An EMA inside a module (issue 13, item 13): left out of the owner's state_dict unless
registered through ``ema.as_module()``, which carries it as extra state."""
from __future__ import annotations

import copy
import io

import pytest
import torch
from torch import nn

from ema_fused import EMA


class Owner(nn.Module):
    def __init__(self, face: bool = True, **ema_kwargs):
        super().__init__()
        torch.manual_seed(0)
        self.net = nn.Sequential(nn.Linear(6, 10), nn.BatchNorm1d(10), nn.Linear(10, 2))
        self.ema = EMA(self.net, decay=0.8, **ema_kwargs)
        if face:
            self.ema_state = self.ema.as_module()

    def forward(self, x):
        return self.net(x)


def _train(owner, steps=3):
    gen = torch.Generator().manual_seed(3)
    for _ in range(steps):
        with torch.no_grad():
            for p in owner.net.parameters():
                p.add_(torch.randn(p.shape, generator=gen))
        owner(torch.randn(4, 6, generator=gen))  # moves BatchNorm's running stats
        owner.ema.update()


def test_a_bare_ema_attribute_is_not_in_the_state_dict():
    """The behaviour the README warns about (why as_module exists)."""
    owner = Owner(face=False)
    assert not any(k.startswith("ema") for k in owner.state_dict())


def test_owner_state_dict_round_trip_restores_the_ema_bit_for_bit():
    owner = Owner()
    _train(owner)
    state = owner.state_dict()
    assert "ema_state._extra_state" in state
    buf = io.BytesIO()
    torch.save(state, buf)
    buf.seek(0)
    loaded = torch.load(buf, weights_only=True)
    fresh = Owner()
    fresh.load_state_dict(loaded)
    assert fresh.ema.num_updates == owner.ema.num_updates == 3
    for (n, a), (_, b) in zip(owner.ema.named_shadows(), fresh.ema.named_shadows()):
        assert torch.equal(a, b), n
    # and both continue identically
    _train(owner, 2)
    _train(fresh, 2)
    for (n, a), (_, b) in zip(owner.ema.named_shadows(), fresh.ema.named_shadows()):
        assert torch.equal(a, b), n


def test_missing_ema_state_is_reported_under_strict():
    owner = Owner()
    _train(owner)
    state = {k: v for k, v in owner.state_dict().items() if k != "ema_state._extra_state"}
    with pytest.raises(RuntimeError, match="ema_state._extra_state"):
        Owner().load_state_dict(state)


def test_owner_half_does_not_cast_the_fp32_masters():
    owner = Owner()
    _train(owner, 1)
    owner.half()
    assert all(s.dtype == torch.float32 for _, s in owner.ema.named_shadows()
               if s.is_floating_point())
    assert list(owner.ema_state.parameters()) == [] and list(owner.ema_state.buffers()) == []


def test_deepcopy_of_the_owner_tracks_the_copied_model():
    owner = Owner()
    _train(owner, 1)
    twin = copy.deepcopy(owner)
    assert twin.ema_state.ema is twin.ema and twin.ema._tracked.module is twin.net
    _train(twin, 1)
    assert twin.ema.num_updates == 2 and owner.ema.num_updates == 1


def test_bad_extra_state_and_forward_are_refused():
    owner = Owner()
    with pytest.raises(TypeError, match="EMA.state_dict"):
        owner.ema_state.set_extra_state([1, 2])
    with pytest.raises(RuntimeError, match="only carries"):
        owner.ema_state(torch.zeros(1))


# ---------------------------------------------------------------- the EMA in its own model
# transformers, Lightning and accelerate import torch.distributed.tensor; with it imported
# an EMA looks for sharding before handing out its state (issue 20, item 6)
import torch.distributed.tensor  # noqa: E402,F401


class _Tracks(nn.Module):
    """A model whose own EMA is registered in it (``m.ema_state = EMA(m).as_module()``)."""

    def __init__(self, seed: int = 0) -> None:
        super().__init__()
        torch.manual_seed(seed)
        self.a, self.bn, self.b = nn.Linear(6, 10), nn.BatchNorm1d(10), nn.Linear(10, 2)
        self.ema_state = EMA(self, decay=0.8).as_module()

    def forward(self, x):
        return self.b(self.bn(self.a(x)))


def _self_tracking(seed: int = 0):
    return _Tracks(seed)


def test_an_ema_registered_in_the_model_it_tracks():
    """m.ema_state = EMA(m).as_module(): update() and m.state_dict() work (no recursion),
    the EMA tracks the model's tensors only, and m's checkpoint restores it."""
    model = _self_tracking()
    ema = model.ema_state.ema
    names = sorted(n for n, _ in ema.named_shadows())
    gen = torch.Generator().manual_seed(1)
    for _ in range(3):
        with torch.no_grad():
            for p in model.parameters():
                p.add_(torch.randn(p.shape, generator=gen))
        model(torch.randn(4, 6, generator=gen))
        ema.update()
    state = model.state_dict()
    assert sorted(k for k in state if k != "ema_state._extra_state") == names
    assert sorted(state["ema_state._extra_state"]["shadows"]) == names
    second = EMA(model, decay=0.5)  # made while the first EMA is registered in the model
    assert sorted(n for n, _ in second.named_shadows()) == names
    second.update()
    fresh = _self_tracking(seed=5)
    fresh.load_state_dict(state)
    assert fresh.ema_state.ema.num_updates == 3
    for (n, a), (_, b) in zip(ema.named_shadows(), fresh.ema_state.ema.named_shadows()):
        assert torch.equal(a, b), n
    fresh.ema_state.ema.update()
    with fresh.ema_state.ema.average_parameters():
        fresh(torch.zeros(2, 6))


def _corrupted(state: dict) -> dict:
    """``state`` with new model weights and an EMA part the EMA refuses (a wrong shape)."""
    bad = {k: (v + 1.0 if v.is_floating_point() else v) if isinstance(v, torch.Tensor) else v
           for k, v in state.items()}
    key = next(k for k in bad if k.endswith("_extra_state"))
    ema_part = dict(bad[key])
    shadows = dict(ema_part["shadows"])
    first = next(iter(shadows))
    shadows[first] = torch.zeros(3, 3)
    ema_part["shadows"] = shadows
    bad[key] = ema_part
    return bad


@pytest.mark.parametrize("layout", ["ema of the owner", "ema of a child", "a deepcopy"])
def test_owner_load_is_all_or_nothing_when_the_ema_refuses_its_part(layout):
    """The owner's load_state_dict checks the EMA's part before any weight is copied: a
    refused EMA part leaves the owner's weights and the EMA as they were."""
    owner = {"ema of the owner": _self_tracking, "ema of a child": Owner,
             "a deepcopy": lambda: copy.deepcopy(Owner())}[layout]()
    ema = owner.ema_state.ema
    ema.update()
    weights = {k: v.clone() for k, v in owner.state_dict().items() if isinstance(v, torch.Tensor)}
    before = {n: s.clone() for n, s in ema.named_shadows()}
    with pytest.raises(ValueError, match=r"holds \(3, 3\)"):
        owner.load_state_dict(_corrupted(owner.state_dict()))
    for k, v in owner.state_dict().items():
        if isinstance(v, torch.Tensor):
            assert torch.equal(v, weights[k]), f"{k} was overwritten"
    assert ema.num_updates == 1
    for n, s in ema.named_shadows():
        assert torch.equal(s, before[n]), n
