"""The EMA class end to end against a float64 reference of the documented step rules."""
from __future__ import annotations

import pytest
import torch
from torch import nn

from ema_fused import EMA, available_backends, schedules
from ema_fused.backends import selection as _backend

from helpers.ema_reference import Reference, make_model, train_step
from helpers.numerics import rand


def float_state(model):
    return {n: t for n, t in model.state_dict().items() if t.is_floating_point()}


CONFIGS = {
    "constant": dict(decay=0.9),
    "warmup-after-3": dict(schedule=schedules.power_warmup(0.95, power=0.75), update_after_step=3),
    "every-3": dict(decay=0.8, update_every=3),
    "num-updates": dict(schedule=schedules.num_updates_warmup(0.99)),
    "tau-ramp": dict(schedule=schedules.tau_ramp(0.9, tau=5)),
    "karras": dict(schedule=schedules.karras_power(gamma=6.94)),
    "swa": dict(schedule=schedules.swa()),
    "bias-constant": dict(decay=0.9, bias_correction=True),
    "bias-schedule-after-2": dict(schedule=schedules.tau_ramp(0.95, tau=3), update_after_step=2,
                                  bias_correction=True),
}


@pytest.mark.parametrize("name", CONFIGS)
@pytest.mark.parametrize("model_dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("explicit_steps", [False, True])
def test_matches_float64_reference(name, model_dtype, explicit_steps):
    cfg = dict(CONFIGS[name])
    gen = torch.Generator().manual_seed(7)
    model = make_model(model_dtype)
    ema = EMA(model, **cfg)
    sched = cfg.get("schedule") or schedules.constant(cfg["decay"])
    ref = Reference(model.state_dict(), sched, cfg.get("update_after_step", 0),
                    cfg.get("update_every", 1), cfg.get("bias_correction", False))
    steps = list(range(1, 21)) if not explicit_steps else [1, 2, 3, 5, 6, 9, 12, 13, 18, 24]
    for step in steps:
        train_step(model, gen)
        ema.update(step if explicit_steps else None)
        ref.update(model.state_dict(), step)
        assert ema.num_updates == step
        if ref.decay is not None:
            assert ema.decay == pytest.approx(ref.decay, abs=1e-15)
    got = ema.averaged_weights()
    assert set(got) == set(ref.s)
    for n, v in ref.read().items():
        if v.is_floating_point():
            assert got[n].dtype == torch.float32  # FP32 master shadows whatever the model dtype
            torch.testing.assert_close(got[n].double(), v, rtol=2e-6, atol=2e-6)
        else:
            assert torch.equal(got[n], v)


def test_first_update_after_step_copies_and_reports_zero_decay():
    model = make_model()
    ema = EMA(model, decay=0.5, update_after_step=2)
    gen = torch.Generator().manual_seed(0)
    for step in (1, 2):
        train_step(model, gen)
        ema.update()
        assert ema.decay == 0.0
        for n, t in float_state(model).items():
            assert torch.equal(dict(ema.named_shadows())[n], t)
    train_step(model, gen)
    ema.update()
    assert ema.decay == 0.5


def test_skipped_steps_change_nothing():
    model = make_model()
    ema = EMA(model, decay=0.5, update_every=4)
    before = {n: s.clone() for n, s in ema.named_shadows()}
    train_step(model, torch.Generator().manual_seed(0))
    for step in (1, 2, 3, 5, 7):
        ema.update(step)
    assert all(torch.equal(s, before[n]) for n, s in ema.named_shadows())
    assert ema.decay is None and ema.num_updates == 7
    ema.update(8)
    assert ema.decay == 0.5


@pytest.mark.parametrize("bad,error", [(0, ValueError), (-3, ValueError), (1.5, TypeError),
                                       (True, TypeError), ("2", TypeError),
                                       (torch.tensor(2.0), TypeError), (torch.tensor([2]), TypeError)])
def test_bad_steps(bad, error):
    ema = EMA(make_model())
    with pytest.raises(error, match="step must be an integer"):
        ema.update(bad)
    assert ema.num_updates == 0


@pytest.mark.parametrize("value", [1.5, -0.1, float("nan")])
def test_schedule_out_of_range_fails_before_writing(value):
    model = make_model()
    ema = EMA(model, schedule=lambda n: value)
    before = {n: s.clone() for n, s in ema.named_shadows()}
    train_step(model, torch.Generator().manual_seed(0))
    with pytest.raises(ValueError, match=r"decay from schedule .* at n=1"):
        ema.update()
    assert all(torch.equal(s, before[n]) for n, s in ema.named_shadows())


@pytest.mark.parametrize("kwargs,err", [
    (dict(decay=1.5), ValueError), (dict(decay=float("nan")), ValueError),
    (dict(buffers="average"), ValueError), (dict(dtype=torch.int32), TypeError),
    (dict(update_every=0), ValueError), (dict(update_after_step=-1), ValueError),
    (dict(schedule=0.9), TypeError), (dict(backend="fastest"), ValueError),
])
def test_bad_constructor_arguments(kwargs, err):
    with pytest.raises(err):
        EMA(make_model(), **kwargs)


def test_dtype_rules():
    bf16 = make_model(torch.bfloat16)
    assert all(s.dtype == torch.float32 for n, s in EMA(bf16).named_shadows()
               if "num_batches" not in n)
    assert all(s.dtype == torch.bfloat16 for n, s in EMA(bf16, dtype=None).named_shadows()
               if "num_batches" not in n)
    with pytest.raises(TypeError, match=r"'0.weight' is torch.float64.*lose precision"):
        EMA(make_model(torch.float64))
    with pytest.raises(TypeError, match="lose precision"):
        EMA(make_model(), dtype=torch.bfloat16)
    with pytest.raises(TypeError, match="lose precision"):
        EMA(make_model(torch.float16), dtype=torch.bfloat16)
    assert all(s.dtype == torch.float64 for n, s in
               EMA(make_model(torch.float64), dtype=torch.float64).named_shadows()
               if "num_batches" not in n)


def test_buffer_policies():
    gen = torch.Generator().manual_seed(3)
    model = make_model()
    emas = {p: EMA(model, decay=0.5, buffers=p) for p in ("ema", "copy", "ignore")}
    start = model[1].running_mean.clone()
    train_step(model, gen)
    for e in emas.values():
        e.update()
    now = model[1].running_mean
    shadows = {p: dict(e.named_shadows()) for p, e in emas.items()}
    torch.testing.assert_close(shadows["ema"]["1.running_mean"], 0.5 * start + 0.5 * now)
    assert torch.equal(shadows["copy"]["1.running_mean"], now)
    assert "1.running_mean" not in shadows["ignore"] and "1.num_batches_tracked" not in shadows["ignore"]
    for p in ("ema", "copy"):
        nbt = shadows[p]["1.num_batches_tracked"]
        assert nbt.dtype == torch.int64 and int(nbt) == int(model[1].num_batches_tracked) == 1


def test_exclude_patterns():
    ema = EMA(make_model(), exclude=["1.*", "3.bias"])
    assert set(dict(ema.named_shadows())) == {"0.weight", "0.bias", "3.weight"}
    with pytest.raises(ValueError, match="nothing to average"):
        EMA(make_model(), exclude="*")


def test_list_of_tensors_is_named_by_position_and_has_no_buffers():
    model = make_model()
    params = list(model.parameters())
    ema = EMA(params, decay=0.5)
    assert list(dict(ema.named_shadows())) == [str(i) for i in range(len(params))]
    train_step(model, torch.Generator().manual_seed(0))
    old = [s.clone() for _, s in ema.named_shadows()]
    ema.update()
    for (_, s), o, p in zip(ema.named_shadows(), old, params):
        torch.testing.assert_close(s, 0.5 * o + 0.5 * p.detach())
    with pytest.raises(TypeError, match="not a tensor"):
        EMA([torch.zeros(2), 3.0])
    with pytest.raises(TypeError, match="complex"):
        EMA([torch.zeros(2, dtype=torch.complex64)])


def test_tied_weights_share_one_shadow():
    class Tied(nn.Module):
        def __init__(self):
            super().__init__()
            self.embed = nn.Embedding(11, 4)
            self.head = nn.Linear(4, 11, bias=False)
            self.head.weight = self.embed.weight

    model = Tied()
    ema = EMA(model, decay=0.5)
    shadows = dict(ema.named_shadows())
    assert set(shadows) == {"embed.weight", "head.weight"}
    assert shadows["embed.weight"] is shadows["head.weight"]
    with torch.no_grad():
        model.embed.weight.add_(1.0)
    ema.update()
    torch.testing.assert_close(shadows["embed.weight"], model.embed.weight.detach() - 0.5)


def test_grad_mode_and_requires_grad_do_not_leak_into_shadows():
    model = make_model()
    ema = EMA(model, decay=0.5)
    model(torch.randn(4, 7)).sum().backward()  # grad mode on, params require grad
    ema.update()
    ema.copy_to()
    assert not any(s.requires_grad for _, s in ema.named_shadows())
    assert all(p.requires_grad and p.is_leaf for p in model.parameters())


@pytest.mark.parametrize("backend", ["auto", "cpu", "foreach"])
def test_many_tensors_end_to_end(backend):
    usable, why = available_backends("cpu")[backend] if backend != "auto" else (True, "")
    if not usable:
        pytest.skip(why)
    model = nn.Sequential(*[nn.Linear(3, 3) for _ in range(250)])  # 500 tensors
    ema = EMA(model, decay=0.75, backend=backend)
    gen = torch.Generator().manual_seed(5)
    ref = Reference(float_state(model), schedules.constant(0.75))
    for _ in range(3):
        train_step_plain(model, gen)
        ema.update()
        ref.update(float_state(model))
    got = ema.averaged_weights()
    expected = _backend.select("auto", torch.device("cpu")).name if backend == "auto" else backend
    assert len(got) == 500 and ema.backend == expected
    for n, v in ref.read().items():
        torch.testing.assert_close(got[n].double(), v, rtol=2e-6, atol=2e-6)


def train_step_plain(model, gen):
    with torch.no_grad():
        for p in model.parameters():
            p.add_(rand(p.shape, p.dtype, gen, scale=0.1))
