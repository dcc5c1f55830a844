"""state_dict / load_state_dict: exact resume, strictness, wrapper prefixes, no downcast."""
from __future__ import annotations

import io

import pytest
import torch
from torch import nn

from ema_fused import EMA, schedules

from helpers.ema_reference import make_model, train_step


def _roundtrip(sd):
    buf = io.BytesIO()
    torch.save(sd, buf)
    buf.seek(0)
    return torch.load(buf, weights_only=True)


@pytest.mark.parametrize("kwargs", [
    dict(decay=0.9),
    dict(schedule=schedules.power_warmup(0.99), update_after_step=2, update_every=2),
    dict(schedule=schedules.tau_ramp(0.95, tau=4), bias_correction=True),
])
@pytest.mark.parametrize("model_dtype", [torch.float32, torch.bfloat16])
def test_resume_is_bit_identical(kwargs, model_dtype):
    gen_a, gen_b = torch.Generator().manual_seed(1), torch.Generator().manual_seed(1)
    model_a, model_b = make_model(model_dtype), make_model(model_dtype)
    ema_a = EMA(model_a, **kwargs)
    ema_b = EMA(model_b, **kwargs)
    for _ in range(7):
        train_step(model_a, gen_a)
        ema_a.update()
        train_step(model_b, gen_b)
        ema_b.update()
    saved = _roundtrip(ema_b.state_dict())
    resumed = EMA(model_b, **kwargs)  # fresh object, as after a restart
    resumed.load_state_dict(saved)
    assert resumed.num_updates == ema_a.num_updates and resumed.decay == ema_a.decay
    for _ in range(6):
        train_step(model_a, gen_a)
        ema_a.update()
        train_step(model_b, gen_b)
        resumed.update()
    a, b = dict(ema_a.named_shadows()), dict(resumed.named_shadows())
    for n in a:
        assert torch.equal(a[n], b[n]), n
    for n, t in ema_a.averaged_weights().items():
        assert torch.equal(t, resumed.averaged_weights()[n]), n


def test_strict_reports_missing_and_unexpected_and_changes_nothing():
    ema = EMA(make_model(), decay=0.9)
    sd = ema.state_dict()
    sd = dict(sd, shadows={k: v.clone() + 1 for k, v in sd["shadows"].items()})
    sd["shadows"]["extra.weight"] = torch.zeros(2)
    del sd["shadows"]["0.bias"]
    before = {n: s.clone() for n, s in ema.named_shadows()}
    with pytest.raises(KeyError, match=r"missing keys \['0.bias'\], unexpected keys \['extra.weight'\]"):
        ema.load_state_dict(sd)
    assert all(torch.equal(s, before[n]) for n, s in ema.named_shadows())
    ema.load_state_dict(sd, strict=False)
    shadows = dict(ema.named_shadows())
    assert torch.equal(shadows["0.bias"], before["0.bias"])
    assert torch.equal(shadows["0.weight"], before["0.weight"] + 1)


class Wrapper(nn.Module):
    """Stands in for DDP (``module.``) and torch.compile (``_orig_mod.``) wrappers."""

    def __init__(self, inner, attr):
        super().__init__()
        self.add_module(attr, inner)


@pytest.mark.parametrize("attr", ["module", "_orig_mod"])
def test_wrapper_prefixes_match_plain_names(attr):
    wrapped = EMA(Wrapper(make_model(seed=3), attr), decay=0.9)
    assert all(n.startswith(attr + ".") for n, _ in wrapped.named_shadows())
    plain = EMA(make_model(seed=4), decay=0.9)
    plain.load_state_dict(wrapped.state_dict())
    for (n, s), (m, t) in zip(plain.named_shadows(), wrapped.named_shadows()):
        assert m == f"{attr}.{n}" and torch.equal(s, t)
    back = EMA(Wrapper(make_model(seed=5), attr), decay=0.9)
    back.load_state_dict(plain.state_dict())  # and the other way round


def test_real_torch_compile_wrapper_names():
    model = make_model()
    compiled = torch.compile(model)
    ema = EMA(compiled, decay=0.9)
    assert all(n.startswith("_orig_mod.") for n, _ in ema.named_shadows())
    EMA(model, decay=0.9).load_state_dict(ema.state_dict())


def test_no_downcast_on_load_and_upcast_is_fine():
    bf16_ema = EMA(make_model(torch.bfloat16), dtype=None)  # bf16 shadows
    fp32_ema = EMA(make_model(torch.bfloat16))               # fp32 shadows
    before = {n: s.clone() for n, s in bf16_ema.named_shadows()}
    with pytest.raises(TypeError, match=r"shadow '0.weight' is torch.bfloat16 but the checkpoint holds torch.float32"):
        bf16_ema.load_state_dict(fp32_ema.state_dict())
    assert all(torch.equal(s, before[n]) for n, s in bf16_ema.named_shadows())
    fp32_ema.load_state_dict(bf16_ema.state_dict())
    assert torch.equal(dict(fp32_ema.named_shadows())["0.weight"], before["0.weight"].float())


def test_shape_mismatch_and_foreign_dicts():
    ema = EMA(make_model(), decay=0.9)
    sd = ema.state_dict()
    bad = dict(sd, shadows=dict(sd["shadows"], **{"0.weight": torch.zeros(2, 2)}))
    with pytest.raises(ValueError, match=r"shadow '0.weight' has shape \(13, 7\) but the checkpoint holds \(2, 2\)"):
        ema.load_state_dict(bad)
    with pytest.raises(ValueError, match="not an ema_fused EMA state_dict"):
        ema.load_state_dict(make_model().state_dict())
    with pytest.raises(ValueError, match="version 99"):
        ema.load_state_dict(dict(sd, version=99))
    with pytest.raises(ValueError, match="bias_correction"):
        EMA(make_model(), bias_correction=True).load_state_dict(sd)
