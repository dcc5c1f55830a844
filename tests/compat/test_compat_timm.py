"""ema_fused.compat.timm against timm's ModelEmaV2 / ModelEmaV3: the same trajectory
(warmup, update_after_step, FP32 averages of a bf16 model, buffers excluded), the same
``.module`` and ``state_dict``, checkpoints both ways, and the stochastic bf16 default."""

import pytest
import torch

from ema_fused.compat.timm import ModelEmaV2, ModelEmaV3

from helpers import compat_parity as cp

timm_ema = pytest.importorskip("timm.utils.model_ema")

V3_CASES = {
    "constant": (torch.float32, dict(decay=0.9), False),
    "warmup": (torch.float32, dict(decay=0.999, use_warmup=True, warmup_gamma=2.0,
                                   warmup_power=0.75, min_decay=0.2, update_after_step=3), True),
    "steps_no_warmup": (torch.float32, dict(decay=0.9, update_after_step=5), True),
    "bf16_fp32_averages": (torch.bfloat16, dict(decay=0.95, dtype=torch.float32), False),
    "exclude_buffers": (torch.float32, dict(decay=0.9, exclude_buffers=True), False),
    "bf16_nearest": (torch.bfloat16, dict(decay=0.9, stochastic_rounding=False), False),
}


def _run(theirs, ours, m, with_step, seed=7, steps=cp.STEPS, start=1):
    gen = torch.Generator().manual_seed(seed)
    for k in range(start, start + steps):
        cp.perturb(m, gen)
        for ema in (theirs, ours):
            ema.update(m, step=k) if with_step else ema.update(m)


@pytest.mark.parametrize("case", sorted(V3_CASES))
def test_v3_trajectory_parity(case):
    dtype, kwargs, with_step = V3_CASES[case]
    m = cp.model(dtype)
    theirs, ours = timm_ema.ModelEmaV3(m, **kwargs), ModelEmaV3(m, **kwargs)
    _run(theirs, ours, m, with_step)
    for k in (1, 4, 5, 100):
        assert ours.get_decay(k) == theirs.get_decay(k)
    # bf16 averages: timm's foreach lerp rounds once, as ours: to the bit
    exact = case == "bf16_nearest"
    cp.assert_parity(ours.module.state_dict(), theirs.module.state_dict(), exact=exact)
    cp.assert_moved(m, ours.module.state_dict())
    assert ours.state_dict().keys() == theirs.state_dict().keys()
    assert not ours.module.training


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_v2_trajectory_parity_and_set(dtype):
    m = cp.model(dtype)
    theirs, ours = timm_ema.ModelEmaV2(m, decay=0.9), ModelEmaV2(m, decay=0.9)
    ref = {k: v.double() for k, v in cp.floats(m.state_dict()).items()}
    gen = torch.Generator().manual_seed(8)
    for _ in range(cp.STEPS):
        cp.perturb(m, gen)
        theirs.update(m)
        ours.update(m)
        ref = {k: r + 0.1 * (m.state_dict()[k].double() - r) for k, r in ref.items()}
    mine, peer = ours.module.state_dict(), theirs.module.state_dict()
    if dtype == torch.float32:
        cp.assert_parity(cp.floats(mine), cp.floats(peer))
    else:  # timm V2 computes d * e + (1 - d) * m in bf16: three roundings, ours one
        cp.assert_as_close_to(ref, cp.floats(mine), cp.floats(peer))
    ours.set(m)
    assert all(torch.equal(a, b) for a, b in zip(ours.module.state_dict().values(),
                                                  m.state_dict().values()))
    x = torch.ones(3, 7, dtype=dtype)
    assert torch.equal(ours(x), ours.module(x))


@pytest.mark.parametrize("direction", ["theirs_to_ours", "ours_to_theirs"])
def test_checkpoints_load_both_ways_and_continue_alike(direction):
    m = cp.model(torch.bfloat16)
    kwargs = dict(decay=0.99, dtype=torch.float32, use_warmup=True)
    classes = {"theirs": timm_ema.ModelEmaV3, "ours": ModelEmaV3}
    src_name, dst_name = direction.split("_to_")
    src = classes[src_name](m, **kwargs)
    gen = torch.Generator().manual_seed(9)
    for k in range(1, 6):
        cp.perturb(m, gen)
        src.update(m, step=k)
    dst = classes[dst_name](m, **kwargs)
    dst.load_state_dict(cp.saved_and_loaded(src.state_dict()))
    # the way timm's train.py saves and resumes: the averaged module's own state_dict
    dst.module.load_state_dict(cp.saved_and_loaded(src.module.state_dict()))
    _run(src, dst, m, with_step=True, seed=10, steps=5, start=6)
    cp.assert_parity(dst.module.state_dict(), src.module.state_dict())


def test_the_averaged_module_moves_and_stays_the_average():
    m = cp.model()
    ours = ModelEmaV3(m, decay=0.5)
    ours.double()  # the averages follow the module (here: float64)
    gen = torch.Generator().manual_seed(11)
    cp.perturb(m, gen)
    before = {k: v.clone() for k, v in ours.module.state_dict().items()}
    ours.update(m)
    for k, v in cp.floats(m.state_dict()).items():
        assert ours.module.state_dict()[k].dtype == torch.float64
        torch.testing.assert_close(ours.module.state_dict()[k], 0.5 * (before[k] + v.double()))


def test_bf16_default_rounds_stochastically():
    """timm's default for a bf16 model: stochastic rounding of bf16 averages (ours through
    the stochastic-rounding kernels: the same statistics, not the same random bits).
    Constant weights w and bf16 averages a starting at w - delta, with decay 0.999:
    nearest rounding never moves a (each step's change is far below half an ulp), the
    stochastic averages (ours and timm's) follow the FP32 average in mean, within a few
    standard errors."""
    m = cp.model(torch.bfloat16)
    with torch.no_grad():
        for p in m.parameters():
            p.fill_(1.0)
    ours = ModelEmaV3(m, decay=0.999, stochastic_rounding_seed=3)
    assert ours._ema.rounding == "stochastic"
    theirs = timm_ema.ModelEmaV3(m, decay=0.999)
    nearest = ModelEmaV3(m, decay=0.999, stochastic_rounding=False)
    start = 1.0 - 2.0 ** -6
    for ema in (ours, theirs, nearest):
        with torch.no_grad():
            for p in ema.module.parameters():
                p.fill_(start)
    for _ in range(200):
        for ema in (ours, theirs, nearest):
            ema.update(m)
    expected = 1.0 - (1.0 - start) * 0.999 ** 200
    stalled = torch.cat([p.float().flatten() for p in nearest.module.parameters()])
    assert torch.all(stalled == start)
    ulp = 2.0 ** -8  # bf16 spacing just below 1.0
    for ema in (ours, theirs):
        got = torch.cat([p.float().flatten() for p in ema.module.parameters()])
        assert {p.dtype for p in ema.module.parameters()} == {torch.bfloat16}
        assert abs(got.mean().item() - expected) < 4 * ulp / got.numel() ** 0.5 + 1e-4
