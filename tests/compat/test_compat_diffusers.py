"""ema_fused.compat.diffusers against diffusers' EMAModel: the same trajectory (warmups,
frozen parameters), the behaviours diffusers' tests/others/test_ema.py pins (with a tiny
local model instead of the hub's), save_pretrained / from_pretrained, and checkpoints
both ways."""
import pytest
import torch
from torch import nn

from ema_fused.compat.diffusers import EMAModel

from helpers import compat_parity as cp

training_utils = pytest.importorskip("diffusers.training_utils")
diffusers = pytest.importorskip("diffusers")


class Tiny(diffusers.ModelMixin, diffusers.ConfigMixin):
    """A diffusers model small enough for CI (save_pretrained / from_pretrained)."""

    @diffusers.configuration_utils.register_to_config
    def __init__(self, width: int = 6):
        super().__init__()
        self.net = nn.Sequential(nn.Linear(3, width), nn.LayerNorm(width), nn.Linear(width, 2))

    def forward(self, x):
        return self.net(x)


def _lists(ema):
    return {str(i): s for i, s in enumerate(ema.shadow_params)}


KWARGS = {
    "default": dict(decay=0.95),
    "warmup": dict(decay=0.99, use_ema_warmup=True, inv_gamma=2.0, power=0.75, min_decay=0.3),
    "after": dict(decay=0.9, update_after_step=4, foreach=True),
}


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("case", sorted(KWARGS))
def test_trajectory_parity_with_frozen_parameters(dtype, case):
    m = cp.model(dtype)
    m[3].bias.requires_grad_(False)  # diffusers copies parameters that do not train
    theirs = training_utils.EMAModel(m.parameters(), **KWARGS[case])
    ours = EMAModel(m.parameters(), **KWARGS[case])
    ref = {str(i): p.double() for i, p in enumerate(m.parameters())}
    gen = torch.Generator().manual_seed(3)
    for _ in range(cp.STEPS):
        cp.perturb(m, gen)
        theirs.step(m.parameters())
        ours.step(m.parameters())
        assert ours.cur_decay_value == theirs.cur_decay_value
        w = 1.0 - theirs.cur_decay_value
        ref = {k: (r + w * (p.double() - r) if p.requires_grad else p.double())
               for (k, r), p in zip(ref.items(), m.parameters())}
    assert ours.optimization_step == theirs.optimization_step == cp.STEPS
    assert torch.equal(ours.shadow_params[-1], m[3].bias)  # the frozen one: a copy
    if dtype == torch.float32:
        cp.assert_parity(_lists(ours), _lists(theirs))
    else:  # diffusers rounds twice per step in bf16, ours once
        cp.assert_as_close_to(ref, _lists(ours), _lists(theirs))


def test_steps_count_and_constant_parameters_stay_put():
    m = cp.model()
    ema = EMAModel(m.parameters(), decay=0.9999)
    for n in range(1, 5):
        ema.step(m.parameters())
        assert ema.optimization_step == n
        assert all(torch.allclose(s, p) for s, p in zip(ema.shadow_params, m.parameters()))


def test_zero_decay_follows_the_parameters_and_a_module_is_deprecated():
    m = cp.model()
    ema = EMAModel(m.parameters(), decay=0.0)
    gen = torch.Generator().manual_seed(4)
    for _ in range(2):
        cp.perturb(m, gen)
        ema.step(m.parameters())
        assert all(torch.equal(s, p) for s, p in zip(ema.shadow_params, m.parameters()))
    with pytest.warns(FutureWarning, match="deprecated"):
        warm = EMAModel(m)
    assert warm.use_ema_warmup


def test_save_pretrained_and_from_pretrained_round_trip(tmp_path):
    torch.manual_seed(0)
    model = Tiny()
    ema = EMAModel(model.parameters(), decay=0.99, model_cls=Tiny, model_config=model.config)
    gen = torch.Generator().manual_seed(5)
    for _ in range(3):
        with torch.no_grad():
            for p in model.parameters():
                p.add_(torch.randn(p.shape, generator=gen))
        ema.step(model.parameters())
    ema.save_pretrained(tmp_path)
    loaded = EMAModel.from_pretrained(tmp_path, model_cls=Tiny)
    assert loaded.optimization_step == 3 and loaded.decay == 0.99
    for a, b in zip(ema.shadow_params, loaded.shadow_params):
        torch.testing.assert_close(a, b)
    saved = Tiny.from_pretrained(tmp_path)  # the averaged weights, loadable as the model
    for a, b in zip(ema.shadow_params, saved.parameters()):
        torch.testing.assert_close(a, b)
    theirs = training_utils.EMAModel.from_pretrained(tmp_path, model_cls=Tiny)
    assert theirs.optimization_step == 3
    with pytest.raises(ValueError, match="model_cls"):
        EMAModel(model.parameters()).save_pretrained(tmp_path)


def test_store_keeps_a_cpu_copy_and_restore_forgets_it():
    m = cp.model()
    ema = EMAModel(m.parameters())
    with pytest.raises(RuntimeError, match="no `store\\(\\)`ed weights"):
        ema.restore(m.parameters())
    raw = [p.detach().clone() for p in m.parameters()]
    ema.store(m.parameters())
    assert all(t.device.type == "cpu" for t in ema.temp_stored_params)
    with torch.no_grad():
        for p in m.parameters():
            p.zero_()
    ema.restore(m.parameters())
    assert ema.temp_stored_params is None
    assert all(torch.equal(p, r) for p, r in zip(m.parameters(), raw))


def test_load_state_dict_checks_types_and_counts_before_changing_anything():
    m = cp.model()
    ema = EMAModel(m.parameters(), decay=0.9)
    state = ema.state_dict()
    for key, value in (("min_decay", 1), ("optimization_step", 1.5), ("use_ema_warmup", 1)):
        with pytest.raises(ValueError, match="Invalid"):
            ema.load_state_dict(dict(state, **{key: value}, decay=0.5))
    with pytest.raises(ValueError, match="between 0 and 1"):
        ema.load_state_dict(dict(state, decay=2.0))
    with pytest.raises(ValueError, match="shadow_params"):
        ema.load_state_dict(dict(state, shadow_params=state["shadow_params"][:-1], decay=0.5))
    assert ema.decay == 0.9
    ema.load_state_dict({"decay": 0.5})  # missing keys keep their values
    assert ema.decay == 0.5 and ema.optimization_step == 0


@pytest.mark.parametrize("direction", ["theirs_to_ours", "ours_to_theirs"])
def test_checkpoints_load_both_ways_and_continue_alike(direction):
    m = cp.model()
    gen = torch.Generator().manual_seed(6)
    classes = {"theirs": training_utils.EMAModel, "ours": EMAModel}
    src_name, dst_name = direction.split("_to_")
    src = classes[src_name](m.parameters(), decay=0.99, use_ema_warmup=True, power=0.8)
    for _ in range(6):
        cp.perturb(m, gen)
        src.step(m.parameters())
    dst = classes[dst_name](m.parameters(), decay=0.5)
    dst.load_state_dict(cp.saved_and_loaded(src.state_dict()))
    assert (dst.decay, dst.power, dst.optimization_step) == (0.99, 0.8, 6)
    for _ in range(6):
        cp.perturb(m, gen)
        src.step(m.parameters())
        dst.step(m.parameters())
    cp.assert_parity(_lists(dst), _lists(src))
