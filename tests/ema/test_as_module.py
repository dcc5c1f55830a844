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
