"""Steps (repeated, going back, integer-like, a failed update) and strict checks of the
numbers EMA takes as arguments and from checkpoints (issue 13, items 5 and 9)."""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from torch import nn

from ema_fused import EMA


def _model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(5, 7), nn.LayerNorm(7))


def _bump(model: nn.Module) -> None:
    with torch.no_grad():
        for p in model.parameters():
            p.add_(1.0)


def _shadows(ema: EMA) -> dict:
    return {n: s.clone() for n, s in ema.named_shadows()}


def test_the_same_step_twice_averages_once():
    """What makes update(step=global_step) right under gradient accumulation."""
    model = _model()
    ema = EMA(model, decay=0.5)
    _bump(model)
    ema.update(50)
    once = _shadows(ema)
    _bump(model)
    ema.update(50)
    assert all(torch.equal(s, once[n]) for n, s in ema.named_shadows())
    assert ema.num_updates == 50


def test_a_step_before_the_last_is_refused_naming_both():
    model = _model()
    ema = EMA(model, decay=0.5)
    ema.update(100)
    before = _shadows(ema)
    _bump(model)
    with pytest.raises(ValueError, match=r"step 50 comes before the last step 100"):
        ema.update(50)
    assert ema.num_updates == 100
    assert all(torch.equal(s, before[n]) for n, s in ema.named_shadows())


@pytest.mark.parametrize("step", [np.int64(3), np.int32(3), torch.tensor(3),
                                  torch.tensor(3, dtype=torch.int32)], ids=repr)
def test_integer_like_steps_are_taken(step):
    model = _model()
    ema, ref = EMA(model, decay=0.5), EMA(model, decay=0.5)
    _bump(model)
    ema.update(step)
    ref.update(3)
    assert ema.num_updates == 3 and isinstance(ema.num_updates, int)
    assert all(torch.equal(s, dict(ref.named_shadows())[n]) for n, s in ema.named_shadows())


def test_a_failed_update_does_not_advance_the_counter():
    calls = []

    def schedule(n):
        calls.append(n)
        if len(calls) == 2:
            raise RuntimeError("schedule failed")
        return 0.5

    model = _model()
    ema = EMA(model, schedule=schedule)
    ema.update()
    with pytest.raises(RuntimeError, match="schedule failed"):
        ema.update()
    assert ema.num_updates == 1
    ema.update()  # the counter retries step 2
    assert calls == [1, 2, 2] and ema.num_updates == 2


@pytest.mark.parametrize("kwargs,error,match", [
    ({"decay": "0.9"}, TypeError, "decay must be a real number"),
    ({"decay": True}, TypeError, "decay must be a real number"),
    ({"decay": 1.5}, ValueError, r"decay must be in \[0.0, 1.0\]"),
    ({"decay": float("nan")}, ValueError, "decay must be in"),
    ({"update_every": 2.0}, TypeError, "update_every must be an integer"),
    ({"update_after_step": -1}, ValueError, "update_after_step must be an integer >= 0"),
    ({"bias_correction": "False"}, TypeError, "bias_correction must be True or False"),
    ({"capturable": 1}, TypeError, "capturable must be True or False"),
])
def test_arguments_are_checked_for_type_and_range(kwargs, error, match):
    with pytest.raises(error, match=match):
        EMA(_model(), **kwargs)


@pytest.mark.parametrize("key,value,error", [
    ("step", -5, ValueError), ("step", "7", TypeError), ("step", 2.5, TypeError),
    ("step", True, TypeError), ("decay", 7.0, ValueError), ("decay", "0.5", TypeError),
    ("decay_product", math.nan, ValueError), ("decay_product", 5.0, ValueError),
    ("bias_correction", "no", TypeError)])
def test_a_checkpoint_with_bad_counters_is_refused_before_anything_is_written(key, value, error):
    model = _model()
    source = EMA(model, decay=0.5)
    _bump(model)
    source.update()
    state = source.state_dict()
    state[key] = value
    target = EMA(_model(), decay=0.5)
    before = _shadows(target)
    with pytest.raises(error, match=f"EMA.load_state_dict: {key}"):
        target.load_state_dict(state)
    assert all(torch.equal(s, before[n]) for n, s in target.named_shadows())
    assert target.num_updates == 0 and target.decay is None


def test_good_counters_still_load():
    model = _model()
    source = EMA(model, decay=0.5)
    _bump(model)
    source.update(4)
    target = EMA(_model(), decay=0.5)
    target.load_state_dict(source.state_dict())
    assert target.num_updates == 4 and target.decay == 0.5
