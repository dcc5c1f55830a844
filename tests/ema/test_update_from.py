"""``EMA.update_from(source, decay=...)``: a caller's decay, from the tracked model or from
another module / tensor list of the same structure, against a float64 reference."""
import copy

import pytest
import torch
from torch import nn

from ema_fused import EMA
from ema_fused.checks import ModelChangedError

from helpers.numerics import lerp_reference, seeded


def _model(dtype=torch.float32):
    torch.manual_seed(0)
    m = nn.Sequential(nn.Linear(7, 13), nn.BatchNorm1d(13), nn.Linear(13, 1))
    return m.to(dtype)


def _perturb(m, gen):
    with torch.no_grad():
        for t in m.state_dict().values():
            if t.is_floating_point():
                t.add_(torch.randn(t.shape, generator=gen).to(t.dtype))
            else:
                t.add_(1)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("other", [False, True], ids=["tracked", "other"])
def test_update_from_matches_float64_reference(dtype, other):
    gen = seeded("update_from", dtype, other)
    m = _model(dtype)
    ema = EMA(m)  # fp32 shadows
    ref = {k: v.double() for k, v in m.state_dict().items()}
    src = copy.deepcopy(m) if other else m
    decays = [0.0, 0.9, 0.5, 1.0, 0.99]
    for d in decays:
        _perturb(src, gen)
        ema.update_from(src, decay=d)
        for k, v in src.state_dict().items():
            ref[k] = lerp_reference(ref[k], v, 1.0 - d) if v.is_floating_point() else v.double()
    shadows = dict(ema.named_shadows())
    for k, v in ref.items():
        tol = dict(rtol=1e-6, atol=1e-6) if shadows[k].is_floating_point() else dict(rtol=0, atol=0)
        torch.testing.assert_close(shadows[k].double(), v, **tol, msg=k)
    assert ema.num_updates == len(decays) and ema.decay == 0.99
    assert shadows["1.num_batches_tracked"].dtype == torch.int64  # copied, never averaged


def test_update_from_a_parameter_list_by_position():
    params = [torch.randn(5), torch.randn(3, 4)]
    ema = EMA(params, dtype=None)
    others = [torch.randn(5), torch.randn(3, 4)]
    ema.update_from(others, decay=0.75)
    for s, p, q in zip(dict(ema.named_shadows()).values(), params, others):
        torch.testing.assert_close(s, 0.75 * p + 0.25 * q)
    ema.update_from(iter(params), decay=0.0)  # a generator is read once
    assert all(torch.equal(s, p) for s, p in zip(dict(ema.named_shadows()).values(), params))


def test_update_from_refuses_bad_input_and_changes_nothing():
    m = _model()
    ema = EMA(m)
    before = {k: v.clone() for k, v in ema.named_shadows()}
    with pytest.raises(ValueError, match="decay"):
        ema.update_from(m, decay=1.5)
    with pytest.raises(ModelChangedError, match="no tensor"):
        ema.update_from(nn.Sequential(nn.Linear(7, 13)), decay=0.5)
    wrong = _model()
    wrong[0] = nn.Linear(7, 12)
    with pytest.raises(ModelChangedError, match="shape"):
        ema.update_from(wrong, decay=0.5)
    with pytest.raises(ModelChangedError, match="expected 2 tensors"):
        EMA([torch.randn(2), torch.randn(3)]).update_from([torch.randn(2)], decay=0.5)
    assert all(torch.equal(v, before[k]) for k, v in ema.named_shadows())
    assert ema.num_updates == 0


def test_update_from_is_refused_inside_average_parameters():
    m = _model()
    ema = EMA(m)
    with ema.average_parameters():
        with pytest.raises(RuntimeError, match="update_from"):
            ema.update_from(m, decay=0.5)


def test_update_from_a_wider_source_refuses_to_round():
    m = _model()
    ema = EMA(m)
    with pytest.raises(TypeError, match="lose precision"):
        ema.update_from(_model(torch.float64), decay=0.5)


# ---------------------------------------------------------------- with the newer options
def _bf16_model():
    torch.manual_seed(3)
    return nn.Sequential(nn.Linear(33, 65), nn.Linear(65, 5)).to(torch.bfloat16)


def _bits(ema):
    return [t.view(torch.int16).clone() for _, t in ema.named_shadows()]


@pytest.mark.parametrize("other", [False, True], ids=["tracked", "other"])
def test_stochastic_update_from_draws_as_update_does(other):
    """update_from(decay=d) on a stochastic EMA is update() with that decay: the same
    bits (keyed by the step and each tensor's position), so each step draws new bits
    (a fixed offset would round every step alike) and a resume continues bit for bit."""
    gen = seeded("update_from-sr", other)
    m = _bf16_model()
    kw = dict(dtype=torch.bfloat16, rounding="stochastic", seed=77)
    by_update = EMA(m, decay=0.99, **kw)
    by_from = EMA(m, **kw)
    src = copy.deepcopy(m) if other else m
    for step in range(6):
        _perturb(m, gen)
        if other:
            src.load_state_dict(m.state_dict())
        by_update.update()
        by_from.update_from(src, decay=0.99)
        assert by_from.num_updates == by_update.num_updates == step + 1
        assert all(torch.equal(a, b) for a, b in zip(_bits(by_from), _bits(by_update))), step
    state = copy.deepcopy(by_from.state_dict())
    _perturb(m, gen)
    by_from.update_from(src if not other else m, decay=0.99)
    resumed = EMA(m, dtype=torch.bfloat16, rounding="stochastic", seed=1)
    resumed.load_state_dict(state)
    resumed.update_from(m, decay=0.99)
    assert all(torch.equal(a, b) for a, b in zip(_bits(resumed), _bits(by_from)))


def test_update_from_on_offloaded_shadows_waits_and_matches_the_blocking_ema():
    gen = seeded("update_from-offload")
    m = _model()
    blocking = EMA(m, device="cpu")
    background = EMA(m, device="cpu", non_blocking=True)
    other = copy.deepcopy(m)
    for d in (0.9, 0.5, 0.0, 0.99):
        _perturb(m, gen)
        other.load_state_dict(m.state_dict())
        blocking.update_from(m, decay=d)
        background.update_from(m, decay=d)
        blocking.update_from(other, decay=d)
        background.update_from(other, decay=d)
    background.wait()
    for (name, a), (_, b) in zip(blocking.named_shadows(), background.named_shadows()):
        assert torch.equal(a, b), name
