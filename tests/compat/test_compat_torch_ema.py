"""ema_fused.compat.torch_ema against the real torch_ema: the same trajectory, the
behaviours torch_ema's own tests pin, and checkpoints both ways."""
import copy

import pytest
import torch
from torch import nn

from ema_fused.compat.torch_ema import ExponentialMovingAverage

from helpers import compat_parity as cp

torch_ema = pytest.importorskip("torch_ema")


def _lists(ema):
    return {str(i): s for i, s in enumerate(ema.shadow_params)}


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("use_num_updates", [True, False])
@pytest.mark.parametrize("explicit", [True, False])
def test_trajectory_parity(dtype, use_num_updates, explicit):
    m = cp.model(dtype)
    theirs = torch_ema.ExponentialMovingAverage(m.parameters(), 0.9, use_num_updates)
    ours = ExponentialMovingAverage(m.parameters(), 0.9, use_num_updates)
    ref = {str(i): p.double() for i, p in enumerate(m.parameters())}
    gen = torch.Generator().manual_seed(1)
    for n in range(1, cp.STEPS + 1):
        cp.perturb(m, gen)
        for ema in (theirs, ours):
            ema.update(m.parameters()) if explicit else ema.update()
        d = min(0.9, (1 + n) / (10 + n)) if use_num_updates else 0.9
        ref = {k: r + (1 - d) * (p.double() - r) for (k, r), p in zip(ref.items(), m.parameters())}
    assert ours.num_updates == theirs.num_updates
    if dtype == torch.float32:
        cp.assert_parity(_lists(ours), _lists(theirs))
    else:  # torch_ema rounds three times per step in bf16, ours once
        cp.assert_as_close_to(ref, _lists(ours), _lists(theirs))
    cp.assert_moved(m, {n: s for (n, _), s in zip(m.named_parameters(), ours.shadow_params)})


@pytest.mark.parametrize("decay", [0.995, 0.9, 0.0, 1.0])
def test_one_update_and_copy_to(decay):
    model = nn.Linear(10, 2, bias=False)
    with torch.no_grad():
        model.weight.fill_(0.0)
    ema = ExponentialMovingAverage(model.parameters(), decay=decay, use_num_updates=False)
    with torch.no_grad():
        model.weight.fill_(1.0)
    ema.update()
    assert torch.all(model.weight == 1.0)
    ema.copy_to()
    torch.testing.assert_close(model.weight, torch.full((2, 10), 1.0 - decay))


def test_store_restore_keeps_the_stored_copy_and_average_parameters_restores():
    model = nn.Linear(10, 2)
    ema = ExponentialMovingAverage(model.parameters(), decay=0.9)
    with pytest.raises(RuntimeError, match="no `store\\(\\)`ed weights"):
        ema.restore()
    orig = model.weight.detach().clone()
    ema.store()
    for _ in range(2):  # torch_ema keeps collected_params after restore()
        with torch.no_grad():
            model.weight.uniform_(0.0, 1.0)
        ema.restore(model.parameters())
        assert torch.equal(model.weight, orig)
    with torch.no_grad():
        model.weight.add_(1.0)
    ema.update()
    raw, average = model.weight.detach().clone(), ema.shadow_params[0].clone()
    torch.testing.assert_close(average, orig + 9 / 11 * (raw - orig))  # decay (1+1)/(10+1)
    with ema.average_parameters():
        assert torch.equal(model.weight, average)
    assert torch.equal(model.weight, raw)


def test_explicit_parameters_of_another_model_and_a_wrong_count():
    model, model2 = nn.Linear(10, 2), nn.Linear(10, 2)
    with torch.no_grad():
        model.weight.fill_(0.0)
        model2.weight.fill_(1.0)
    ema = ExponentialMovingAverage(model.parameters(), decay=0.9)
    ema.update(model2.parameters())
    ema.copy_to()
    torch.testing.assert_close(model.weight, torch.full((2, 10), 9 / 11))  # decay 2/11
    with pytest.raises(ValueError, match="Number of parameters"):
        ema.update([model2.weight])


def test_to_casts_shadows_and_collected_params():
    m = nn.Linear(11, 3)
    ema = ExponentialMovingAverage(m.parameters(), decay=0.9)
    ema.to(dtype=torch.float16)
    assert ema.shadow_params[0].dtype == torch.float16
    ema.store()
    assert ema.collected_params[0].dtype == torch.float32  # it stores whatever it gets
    m = m.to(torch.float16)
    ema.store(m.parameters())
    assert ema.collected_params[0].dtype == torch.float16
    ema.to(dtype=torch.float64)
    assert ema.collected_params[0].dtype == torch.float64
    assert ema.shadow_params[0].dtype == torch.float64


def test_state_dict_round_trip_carries_decay_and_casts_to_the_parameters():
    m1, m2 = nn.Linear(10, 2, bias=False), nn.Linear(10, 2, bias=False).half()
    ema1 = ExponentialMovingAverage(m1.parameters(), decay=0.995, use_num_updates=False)
    ema2 = ExponentialMovingAverage(m2.parameters(), decay=0.0)
    ema1.store()
    ema2.load_state_dict(copy.deepcopy(ema1.state_dict()))
    assert ema2.decay == 0.995 and ema2.num_updates is None
    assert ema2.shadow_params[0].dtype == torch.float16
    assert ema2.collected_params[0].dtype == torch.float16
    torch.testing.assert_close(ema2.shadow_params[0], m1.weight.half())


def test_a_checkpoint_of_other_shapes_fails_at_first_use_and_writes_nothing():
    m = nn.Linear(10, 2, bias=False)
    ema = ExponentialMovingAverage(m.parameters(), decay=0.9)
    sd = ema.state_dict()
    sd["shadow_params"][0] = torch.zeros(3, 7)
    ema.load_state_dict(sd)  # torch_ema cannot know shapes at load; its tests pin this
    before = m.weight.detach().clone()
    for call in (ema.copy_to, ema.update, ema.store):
        with pytest.raises(RuntimeError, match=r"shape \(3, 7\)"):
            call()
    assert torch.equal(m.weight, before)
    sd["shadow_params"] = sd["shadow_params"][:-1]
    with pytest.raises(ValueError, match="wrong number"):
        ema.load_state_dict(sd)
    ema.load_state_dict(ExponentialMovingAverage(m.parameters(), 0.9).state_dict())
    ema.copy_to()  # usable again


@pytest.mark.parametrize("direction", ["theirs_to_ours", "ours_to_theirs"])
def test_checkpoints_load_both_ways_and_continue_alike(direction):
    m = cp.model()
    gen = torch.Generator().manual_seed(2)
    classes = {"theirs": torch_ema.ExponentialMovingAverage, "ours": ExponentialMovingAverage}
    src_name, dst_name = direction.split("_to_")
    src = classes[src_name](m.parameters(), 0.99)
    for _ in range(5):
        cp.perturb(m, gen)
        src.update()
    src.store()
    state = cp.saved_and_loaded(src.state_dict())
    dst = classes[dst_name](m.parameters(), 0.5)
    dst.load_state_dict(state)
    assert dst.decay == 0.99 and dst.num_updates == 5
    for _ in range(5):
        cp.perturb(m, gen)
        src.update()
        dst.update()
    cp.assert_parity(_lists(dst), _lists(src))
    assert [c.shape for c in dst.collected_params] == [c.shape for c in src.collected_params]

