"""The README's peer-recipe table, checked against the real packages.

Each row of the table says "this peer configuration == this ``ema_fused.EMA``
configuration".  Every test below drives one peer and our EMA on the *same*
model trajectory (random perturbations standing in for optimizer steps, plus
train-mode forward passes so BatchNorm running stats move) and then compares
every floating tensor the peer averages.  A last group checks the per-step decay
values themselves and the EDM2 ``sigma_rel -> gamma`` conversion.

Tolerances: all shadows are fp32.  Peers and we may evaluate the update in a
different order (``lerp`` vs ``s - w (s - p)`` vs ``s (1 - w) + w p``), which
differs by a few ulps per step; the EMA is a contraction, so after ~30 steps the
gap stays at a few tens of ulps of O(1) values: rtol=1e-5, atol=1e-6 is ~100x
that, yet ~1000x below the effect of any wrong decay at any step.
"""
import pytest
import torch
from torch import nn
from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn

from ema_fused import EMA
from ema_fused.schedules import (karras_power, num_updates_warmup, power_warmup,
                                 sigma_rel_to_gamma, swa)

RTOL, ATOL = 1e-5, 1e-6  # see the module docstring
STEPS = 25


def _model(seed, dtype=torch.float32):
    torch.manual_seed(seed)
    m = nn.Sequential(nn.Linear(7, 13), nn.BatchNorm1d(13), nn.ReLU(), nn.Linear(13, 5))
    return m.to(dtype).train()


def _perturb(m):
    """One simulated optimizer step, and a forward pass that moves the BN stats."""
    dtype = next(m.parameters()).dtype
    with torch.no_grad():
        m(torch.randn(11, 7, dtype=dtype) * 2 + 0.5)
        for p in m.parameters():
            p.add_(torch.randn_like(p) * 0.1)


def _compare(ours, theirs, names):
    shadows = dict(ours.named_shadows())
    assert names, "nothing compared"
    for name in names:
        assert shadows[name].dtype == torch.float32, name
        torch.testing.assert_close(shadows[name], theirs[name].to(torch.float32),
                                   rtol=RTOL, atol=ATOL, msg=lambda m, n=name: f"{n}: {m}")


def _float_names(state):
    return [k for k, v in state.items() if v.is_floating_point()]


def _assert_moved(model, theirs_state):
    """Guard against a vacuous test: the average must differ from the live model."""
    live = model.state_dict()
    assert any(not torch.allclose(live[k].float(), theirs_state[k].float(), atol=1e-3)
               for k in _float_names(theirs_state) if k in live)


# 1. timm ModelEmaV3 (constant decay, params + buffers) -------------------------
def test_timm_v3_constant_decay():
    timm_ema = pytest.importorskip("timm.utils.model_ema")
    m = _model(1)
    theirs = timm_ema.ModelEmaV3(m, decay=0.9)
    ours = EMA(m, decay=0.9)
    bn_mean0 = m[1].running_mean.clone()
    for _ in range(STEPS):
        _perturb(m)
        theirs.update(m)
        ours.update()
    assert not torch.equal(m[1].running_mean, bn_mean0)  # buffers did move
    state = theirs.module.state_dict()
    names = _float_names(state)
    assert {"1.running_mean", "1.running_var", "0.weight"} <= set(names)
    _compare(ours, state, names)
    # integer buffers are copied by both
    assert torch.equal(dict(ours.named_shadows())["1.num_batches_tracked"],
                       state["1.num_batches_tracked"])
    _assert_moved(m, state)


# 2. timm ModelEmaV3 use_warmup + update_after_step + explicit steps -----------
@pytest.mark.parametrize("after", [0, 5])
@pytest.mark.parametrize("gamma,power", [(1.0, 2 / 3), (2.0, 0.75)])
def test_timm_v3_warmup(after, gamma, power):
    timm_ema = pytest.importorskip("timm.utils.model_ema")
    m = _model(2 + after)
    d, md = 0.8, 0.4  # both clamps bite within STEPS
    theirs = timm_ema.ModelEmaV3(m, decay=d, use_warmup=True, warmup_gamma=gamma,
                                 warmup_power=power, min_decay=md, update_after_step=after)
    sched = power_warmup(d, inv_gamma=gamma, power=power, min_decay=md)
    ours = EMA(m, schedule=sched, update_after_step=after)
    for k in range(1, STEPS + 1):
        _perturb(m)
        theirs.update(m, step=k)
        ours.update(step=k)
        assert ours.decay == pytest.approx(theirs.get_decay(k), rel=1e-12, abs=0)
    state = theirs.module.state_dict()
    _compare(ours, state, _float_names(state))
    _assert_moved(m, state)


# 3. timm ModelEmaV3 dtype=float32 on a bf16 model == our default fp32 shadows -
def test_timm_v3_bf16_model_fp32_shadows():
    timm_ema = pytest.importorskip("timm.utils.model_ema")
    m = _model(3, torch.bfloat16)
    theirs = timm_ema.ModelEmaV3(m, decay=0.9, dtype=torch.float32)
    ours = EMA(m, decay=0.9)
    for _ in range(STEPS):
        _perturb(m)
        theirs.update(m)
        ours.update()
    state = theirs.module.state_dict()
    names = _float_names(state)
    assert all(state[n].dtype == torch.float32 for n in names)
    assert all(s.dtype == torch.float32 for n, s in ours.named_shadows() if n in names)
    _compare(ours, state, names)
    # the fp32 average keeps sub-bf16 detail: it is not representable in bf16
    w = dict(ours.named_shadows())["0.weight"]
    assert not torch.equal(w, w.to(torch.bfloat16).float())


# 4. torch_ema ExponentialMovingAverage(use_num_updates=True) ------------------
def test_torch_ema_num_updates():
    torch_ema = pytest.importorskip("torch_ema")
    m = _model(4)
    params = list(m.parameters())
    d = 0.7  # (1 + n) / (10 + n) < d until n = 20: both branches of the min run
    theirs = torch_ema.ExponentialMovingAverage(params, decay=d, use_num_updates=True)
    ours = EMA(params, schedule=num_updates_warmup(d))
    for _ in range(STEPS):
        _perturb(m)
        theirs.update()
        ours.update()
        n = theirs.num_updates
        assert ours.num_updates == n
        assert ours.decay == pytest.approx(min(d, (1 + n) / (10 + n)), rel=1e-12, abs=0)
    state = {str(i): s for i, s in enumerate(theirs.shadow_params)}
    assert [n for n, _ in ours.named_shadows()] == list(state)
    _compare(ours, state, list(state))


# 5. ema-pytorch EMA (power warm-up, update_after_step) ------------------------
@pytest.mark.parametrize("after", [0, 5])
def test_ema_pytorch_power_warmup(after):
    ema_pytorch = pytest.importorskip("ema_pytorch")
    m = _model(5 + after)
    d, g, p, md = 0.85, 2.0, 0.75, 0.3
    theirs = ema_pytorch.EMA(m, beta=d, update_after_step=after, update_every=1,
                             inv_gamma=g, power=p, min_value=md)
    ours = EMA(m, schedule=power_warmup(d, inv_gamma=g, power=p, min_decay=md),
               update_after_step=after)
    for _ in range(STEPS):
        _perturb(m)
        theirs.update()
        ours.update()
        # ema-pytorch evaluates its decay in fp32 tensor math: ~1 ulp of fp32
        assert ours.decay == pytest.approx(theirs.get_current_decay(), rel=0, abs=1e-6)
    state = theirs.ema_model.state_dict()
    names = [n for n in _float_names(state)
             if n in theirs.parameter_names or n in theirs.buffer_names]
    assert "1.running_var" in names
    _compare(ours, state, names)
    _assert_moved(m, state)


# 6. AveragedModel + get_ema_multi_avg_fn == constant decay, first update copies
def test_averaged_model_ema():
    m = _model(6)
    d = 0.9
    theirs = AveragedModel(m, multi_avg_fn=get_ema_multi_avg_fn(d))
    ours = EMA(m, decay=d, update_after_step=1, buffers="ignore")
    for k in range(1, STEPS + 1):
        _perturb(m)
        theirs.update_parameters(m)
        ours.update()
        assert ours.decay == (0.0 if k == 1 else d)
    state = dict(theirs.module.named_parameters())
    assert [n for n, _ in ours.named_shadows()] == list(state)  # buffers ignored
    _compare(ours, state, list(state))
    _assert_moved(m, state)


# 7. plain AveragedModel (SWA) == schedule=swa() -------------------------------
def test_averaged_model_swa():
    m = _model(7)
    theirs = AveragedModel(m)
    ours = EMA(m, schedule=swa(), buffers="ignore")
    history = []
    for _ in range(STEPS):
        _perturb(m)
        history.append({n: p.detach().clone() for n, p in m.named_parameters()})
        theirs.update_parameters(m)
        ours.update()
        n = int(theirs.n_averaged)
        assert ours.decay == pytest.approx((n - 1) / n, rel=1e-12, abs=0)
    state = dict(theirs.module.named_parameters())
    _compare(ours, state, list(state))
    # and both are the uniform mean of every visited point
    mean = {n: torch.stack([h[n] for h in history]).mean(0) for n in state}
    _compare(ours, mean, list(mean))


# 8. EDM2 sigma_rel -> gamma and the karras_power formula ----------------------
@pytest.mark.parametrize("sigma_rel", [0.05, 0.1, 0.15, 0.28])
def test_sigma_rel_to_gamma_matches_ema_pytorch(sigma_rel):
    post_hoc = pytest.importorskip("ema_pytorch.post_hoc_ema")
    # numpy's companion-matrix eigenvalues are accurate to ~1e-13 relative here
    gamma = sigma_rel_to_gamma(sigma_rel)
    assert gamma == pytest.approx(post_hoc.sigma_rel_to_gamma(sigma_rel), rel=1e-9, abs=1e-9)
    sched = karras_power(sigma_rel=sigma_rel)
    assert sched.gamma == gamma
    assert sched(1) == 0.0
    for n in range(2, 60):
        assert sched(n) == pytest.approx((1 - 1 / n) ** (1 + gamma), rel=1e-14)


# Per-step decays of the scheduled recipes, over a longer horizon than above ---
@pytest.mark.parametrize("after", [0, 3])
def test_decay_values_match_peers(after):
    timm_ema = pytest.importorskip("timm.utils.model_ema")
    ema_pytorch = pytest.importorskip("ema_pytorch")
    m = nn.Linear(3, 2)
    d, g, p, md = 0.999, 1.0, 2 / 3, 0.45  # md > decay(2) = 0.37: the floor bites
    sched = power_warmup(d, inv_gamma=g, power=p, min_decay=md)
    ours = EMA(m, schedule=sched, update_after_step=after)
    timm_v3 = timm_ema.ModelEmaV3(m, decay=d, use_warmup=True, warmup_gamma=g,
                                  warmup_power=p, min_decay=md, update_after_step=after)
    theirs = ema_pytorch.EMA(m, beta=d, update_after_step=after, update_every=1,
                             inv_gamma=g, power=p, min_value=md)
    swa_peer = AveragedModel(m)
    swa_ours = EMA(m, schedule=swa())
    seen = set()
    for k in range(1, 400):
        ours.update(step=k)
        theirs.update()
        swa_peer.update_parameters(m)
        swa_ours.update()
        assert ours.decay == pytest.approx(timm_v3.get_decay(k), rel=1e-12, abs=0), k
        assert ours.decay == pytest.approx(theirs.get_current_decay(), rel=0, abs=1e-6), k
        n = int(swa_peer.n_averaged)
        assert swa_ours.decay == pytest.approx((n - 1) / n, rel=1e-12, abs=0), k
        seen.add(round(ours.decay, 3))
    assert 0.0 in seen and md in seen and len(seen) > 50  # copy, floor and ramp all hit
