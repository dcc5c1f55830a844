"""copy_to / store / restore / average_parameters, bias correction on every read."""
from __future__ import annotations

import copy

import pytest
import torch

from ema_fused import EMA, schedules

from helpers.ema_reference import make_model, train_step


def _trained(model_dtype=torch.float32, **kwargs):
    model = make_model(model_dtype)
    ema = EMA(model, **kwargs)
    gen = torch.Generator().manual_seed(11)
    for _ in range(5):
        train_step(model, gen)
        ema.update()
    return model, ema


@pytest.mark.parametrize("model_dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_average_parameters_swaps_in_and_back(model_dtype):
    model, ema = _trained(model_dtype, decay=0.7)
    raw = copy.deepcopy(model.state_dict())
    averaged = ema.averaged_weights()
    with ema.average_parameters():
        for n, t in model.state_dict().items():
            assert t.dtype == raw[n].dtype
            assert torch.equal(t, averaged[n].to(t.dtype)), n
    for n, t in model.state_dict().items():
        assert torch.equal(t, raw[n]), n


def test_average_parameters_restores_when_the_body_raises():
    model, ema = _trained(decay=0.7)
    raw = copy.deepcopy(model.state_dict())
    with pytest.raises(KeyError):
        with ema.average_parameters():
            raise KeyError("evaluation failed")
    assert all(torch.equal(t, raw[n]) for n, t in model.state_dict().items())


def test_store_copy_to_restore_and_restore_without_store():
    model, ema = _trained(decay=0.7)
    raw = copy.deepcopy(model.state_dict())
    ema.store()
    ema.copy_to()
    assert not torch.equal(model[0].weight, raw["0.weight"])
    ema.restore()
    assert all(torch.equal(t, raw[n]) for n, t in model.state_dict().items())
    with pytest.raises(RuntimeError, match="nothing stored"):
        ema.restore()


def test_copy_to_another_model_of_the_same_architecture():
    model, ema = _trained(decay=0.7)
    other = make_model(torch.bfloat16, seed=99)
    ema.copy_to(other)
    for n, s in ema.averaged_weights().items():
        assert torch.equal(other.state_dict()[n], s.to(other.state_dict()[n].dtype)), n
    with pytest.raises(TypeError, match="made from a module"):
        ema.copy_to(list(other.parameters()))


@pytest.mark.parametrize("schedule", [schedules.constant(0.9), schedules.tau_ramp(0.99, tau=3),
                                      schedules.num_updates_warmup(0.999)])
def test_bias_correction_recovers_a_constant_model_exactly(schedule):
    model = make_model()
    ema = EMA(model, schedule=schedule, bias_correction=True, buffers="ignore")
    assert all(not bool(s.any()) for _, s in ema.named_shadows())  # starts at zero
    with pytest.raises(RuntimeError, match="undefined until an update"):
        ema.copy_to()
    target = copy.deepcopy(model.state_dict())
    for _ in range(4):
        ema.update()  # the model does not move: the corrected average is the model itself
    for n, t in ema.averaged_weights().items():
        torch.testing.assert_close(t, target[n], rtol=1e-6, atol=1e-7)
    with ema.average_parameters():
        for n, t in model.state_dict().items():
            torch.testing.assert_close(t, target[n], rtol=1e-6, atol=1e-7)
    raw = dict(ema.named_shadows())["0.weight"]
    assert not torch.allclose(raw, target["0.weight"])  # raw shadows are not corrected


def test_bias_correction_with_a_copy_step_has_no_correction():
    model = make_model()
    ema = EMA(model, decay=0.9, update_after_step=1, bias_correction=True)
    ema.update()  # a copy: prod(decays) = 0
    assert torch.equal(ema.averaged_weights()["0.weight"], model[0].weight.detach())


def test_average_parameters_swaps_in_place_when_dtypes_match():
    model, ema = _trained(decay=0.7)  # fp32 model, fp32 shadows: the swap path
    raw = copy.deepcopy(model.state_dict())
    shadows = {n: s.clone() for n, s in ema.named_shadows()}
    storage = model[0].weight.data_ptr()
    with pytest.raises(ValueError):
        with ema.average_parameters():
            for n, t in model.state_dict().items():
                assert torch.equal(t, shadows[n]), n
            assert model[0].weight.data_ptr() == storage  # same storage, new contents
            assert ema._backup is None  # no backup copy of the model was made
            for call in (ema.update, ema.state_dict, ema.copy_to, ema.store,
                         lambda: dict(ema.named_shadows())):
                with pytest.raises(RuntimeError, match="inside average_parameters"):
                    call()
            raise ValueError("evaluation failed")
    assert all(torch.equal(t, raw[n]) for n, t in model.state_dict().items())
    assert all(torch.equal(s, shadows[n]) for n, s in ema.named_shadows())
    ema.update()  # usable again


def test_swap_op_checks_and_opcheck():
    from ema_fused import ema_swap_
    a, b = [torch.arange(5.0), torch.zeros(3, dtype=torch.bfloat16)], [-torch.arange(5.0), torch.ones(3, dtype=torch.bfloat16)]
    ema_swap_(a, b)
    assert torch.equal(a[0], -torch.arange(5.0)) and torch.equal(b[1], torch.zeros(3, dtype=torch.bfloat16))
    keep = [x.clone() for x in a]
    with pytest.raises(TypeError, match=r"a\[1\] is torch.bfloat16 but b\[1\] is torch.float32"):
        ema_swap_(a, [b[0], torch.zeros(3)])
    assert all(torch.equal(x, k) for x, k in zip(a, keep))
    torch.library.opcheck(torch.ops.ema_fused.swap_.default, (a, b, 0.0, "auto"))
