"""ema_fused.compat.ema_pytorch against ema-pytorch's EMA: the same trajectory (warmup,
update_every, update_after_step, names copied or ignored, updating the model from the
EMA), the same ``state_dict``, and checkpoints both ways."""
import copy

import pytest
import torch
from torch import nn

from ema_fused.compat.ema_pytorch import EMA

from helpers import compat_parity as cp

ema_pytorch = pytest.importorskip("ema_pytorch")

CASES = {
    "defaults": dict(),
    "every_step": dict(beta=0.99, update_after_step=3, update_every=1, power=0.75,
                       inv_gamma=2.0, min_value=0.1),
    "names": dict(beta=0.9, update_after_step=0, update_every=2,
                  param_or_buffer_names_no_ema={"1.running_mean"}, ignore_names={"0.bias"},
                  ignore_startswith_names={"3."}),
    "model_with_ema": dict(beta=0.9, update_after_step=2, update_every=1,
                           update_model_with_ema_every=5, update_model_with_ema_beta=0.5),
    "no_online_model": dict(beta=0.9, update_after_step=0, update_every=1,
                            include_online_model=False),
}


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("case", sorted(CASES))
def test_trajectory_parity(dtype, case):
    m_theirs = cp.model(dtype)
    m_ours = copy.deepcopy(m_theirs)  # the model is written too (update_model_with_ema)
    theirs = ema_pytorch.EMA(m_theirs, **CASES[case])
    ours = EMA(m_ours, **CASES[case])
    gen_t, gen_o = (torch.Generator().manual_seed(12) for _ in range(2))
    for _ in range(cp.STEPS):
        cp.perturb(m_theirs, gen_t)
        cp.perturb(m_ours, gen_o)
        theirs.update()
        ours.update()
    assert ours.step.item() == theirs.step.item() and bool(ours.initted)
    # bf16: lerp_ rounds once, as ours; the decay is computed in fp32 by ema-pytorch (ours
    # in fp64), a relative weight difference of ~1e-7: at most one ulp here and there
    mine, peer = ours.ema_model.state_dict(), theirs.ema_model.state_dict()
    if dtype == torch.bfloat16:
        for k, t in cp.floats(peer).items():
            ulp = torch.finfo(dtype).eps * t.double().abs().max().item()
            assert (mine[k].double() - t.double()).abs().max().item() <= 2 * ulp, k
    else:
        cp.assert_parity(mine, peer)
        cp.assert_parity(m_ours.state_dict(), m_theirs.state_dict())
    assert ours.state_dict().keys() == theirs.state_dict().keys()


def test_names_left_out_are_copied_or_ignored_as_in_ema_pytorch():
    m = cp.model()
    ours = EMA(m, beta=0.5, min_value=0.5, update_after_step=1, update_every=1,
               param_or_buffer_names_no_ema={"0.weight"}, ignore_names={"0.bias"})
    gen = torch.Generator().manual_seed(13)
    cp.perturb(m, gen)
    ours.update()  # step 0: copies everything
    ours.update()  # step 1 <= update_after_step: copies everything
    copied_bias = m[0].bias.detach().clone()
    cp.perturb(m, gen)
    old = ours.ema_model[3].weight.detach().clone()
    ours.update()  # step 2: averages, copies 0.weight, leaves 0.bias alone
    assert torch.equal(ours.ema_model[0].weight, m[0].weight)
    assert torch.equal(ours.ema_model[0].bias, copied_bias)
    torch.testing.assert_close(ours.ema_model[3].weight, 0.5 * (old + m[3].weight))
    assert ours.ema_model[1].num_batches_tracked.item() == 0  # integers are never touched


def test_ema_model_given_lazy_init_and_forwarding():
    m = cp.model()
    given = copy.deepcopy(m)
    ours = EMA(m, ema_model=given, beta=0.9, update_every=1, update_after_step=0,
               forward_method_names=("extra_repr",))
    assert ours.ema_model is given and ours.extra_repr == given.extra_repr
    assert all(not p.requires_grad for p in given.parameters())
    lazy = EMA(m, lazy_init_ema=True)
    assert lazy.ema_model is None
    lazy.update()
    assert isinstance(lazy.ema_model, nn.Sequential)
    x = torch.randn(4, 7)
    ours.eval()
    assert torch.equal(ours(x), given(x))
    with pytest.raises(TypeError, match="nn.Module"):
        EMA({"w": torch.zeros(2)})


@pytest.mark.parametrize("direction", ["theirs_to_ours", "ours_to_theirs"])
def test_checkpoints_load_both_ways_and_continue_alike(direction):
    m = cp.model()
    kwargs = dict(beta=0.99, update_after_step=2, update_every=1)
    classes = {"theirs": ema_pytorch.EMA, "ours": EMA}
    src_name, dst_name = direction.split("_to_")
    src = classes[src_name](m, **kwargs)
    gen = torch.Generator().manual_seed(14)
    for _ in range(6):
        cp.perturb(m, gen)
        src.update()
    dst = classes[dst_name](m, **kwargs)
    dst.load_state_dict(cp.saved_and_loaded(src.state_dict()))
    assert dst.step.item() == 6 and bool(dst.initted)
    for _ in range(6):
        cp.perturb(m, gen)
        src.update()
        dst.update()
    cp.assert_parity(dst.ema_model.state_dict(), src.ema_model.state_dict())
