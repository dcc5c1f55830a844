"""ema_fused.compat.swa_utils against torch.optim.swa_utils: AveragedModel with every
averaging function (fused ones, SWA, a user's own, unfused), buffers averaged or copied,
bf16 and fp32 models, the factories called directly, pickling, and checkpoints both ways."""
import pickle

import pytest
import torch
from torch.optim import swa_utils as torch_swa

from ema_fused.compat import swa_utils as ours_swa

from helpers import compat_parity as cp


def _user_avg_fn(p_avg, p, n):
    return 0.8 * p_avg + 0.2 * p


FNS = {
    "ema_multi": lambda m: dict(multi_avg_fn=m.get_ema_multi_avg_fn(0.9)),
    "ema_single": lambda m: dict(avg_fn=m.get_ema_avg_fn(0.9)),
    "swa_default": lambda m: dict(),
    "swa_multi": lambda m: dict(multi_avg_fn=m.get_swa_multi_avg_fn()),
    "swa_single": lambda m: dict(avg_fn=m.get_swa_avg_fn()),
    "user_fn": lambda m: dict(avg_fn=_user_avg_fn),
}


# torch's get_swa_multi_avg_fn fails on integer buffers: test_swa_multi_with_integer_buffers
CASES = [(fn, b) for fn in sorted(FNS) for b in (False, True) if (fn, b) != ("swa_multi", True)]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("fn,use_buffers", CASES)
def test_trajectory_parity(dtype, use_buffers, fn):
    m = cp.model(dtype)
    theirs = torch_swa.AveragedModel(m, use_buffers=use_buffers, **FNS[fn](torch_swa))
    ours = ours_swa.AveragedModel(m, use_buffers=use_buffers, **FNS[fn](ours_swa))
    gen = torch.Generator().manual_seed(15)
    for _ in range(cp.STEPS):
        cp.perturb(m, gen)
        theirs.update_parameters(m)
        ours.update_parameters(m)
    assert ours.n_averaged.item() == theirs.n_averaged.item() == cp.STEPS
    mine, peer = ours.module.state_dict(), theirs.module.state_dict()
    if use_buffers:  # torch pushes num_batches_tracked through the float formula; we copy it
        del mine["1.num_batches_tracked"], peer["1.num_batches_tracked"]
    # torch's lerp paths (and a user's function, which runs torch's own loop) round once,
    # as ours: bf16 to the bit; its single-tensor formulas (SWA's default on the CPU too)
    # round two or three times in bf16
    if dtype == torch.bfloat16 and fn not in ("ema_multi", "swa_multi", "user_fn"):
        for k, t in cp.floats(peer).items():
            ulp = torch.finfo(dtype).eps * t.double().abs().max().item()
            assert (mine[k].double() - t.double()).abs().max().item() <= 8 * ulp, k
    else:
        cp.assert_parity(mine, peer, exact=dtype == torch.bfloat16)
    assert ours.state_dict().keys() == theirs.state_dict().keys()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_swa_multi_with_integer_buffers(dtype):
    """torch's SWA over lists raises on BatchNorm's integer buffer (addcdiv of integers);
    ours copies it and averages the rest: the uniform mean of every state, in float64."""
    m = cp.model(dtype)
    theirs = torch_swa.AveragedModel(m, multi_avg_fn=torch_swa.get_swa_multi_avg_fn(),
                                     use_buffers=True)
    ours = ours_swa.AveragedModel(m, multi_avg_fn=ours_swa.get_swa_multi_avg_fn(),
                                  use_buffers=True)
    gen = torch.Generator().manual_seed(15)
    total = {}
    for n in range(1, cp.STEPS + 1):
        cp.perturb(m, gen)
        if n == 1:
            theirs.update_parameters(m)  # copies
        elif n == 2:
            with pytest.raises(RuntimeError, match="addcdiv"):
                theirs.update_parameters(m)
        ours.update_parameters(m)
        for k, v in cp.floats(m.state_dict()).items():
            total[k] = total.get(k, 0) + v.double()
    for k, v in total.items():
        mean = v / cp.STEPS
        ulp = torch.finfo(dtype).eps * mean.abs().max().item()
        err = (ours.module.state_dict()[k].double() - mean).abs().max().item()
        assert err <= (16 * ulp if dtype == torch.bfloat16 else 1e-5), (k, err, ulp)
    assert ours.module[1].num_batches_tracked.item() == cp.STEPS


def test_integer_buffers_are_copied():
    m = cp.model()
    ours = ours_swa.AveragedModel(m, multi_avg_fn=ours_swa.get_ema_multi_avg_fn(0.9),
                                  use_buffers=True)
    gen = torch.Generator().manual_seed(16)
    for _ in range(5):
        cp.perturb(m, gen)
        ours.update_parameters(m)
    assert ours.module[1].num_batches_tracked.item() == m[1].num_batches_tracked.item() == 5


def test_the_factories_called_directly_match_torch_and_pickle():
    gen = torch.Generator().manual_seed(17)
    a = [torch.randn(5, generator=gen), torch.randn(3, 2, generator=gen)]
    c = [torch.randn(5, generator=gen), torch.randn(3, 2, generator=gen)]
    for name, args in (("get_ema_multi_avg_fn", (0.7,)), ("get_swa_multi_avg_fn", ())):
        x, y = [t.clone() for t in a], [t.clone() for t in a]
        getattr(torch_swa, name)(*args)(x, c, torch.tensor(3))
        pickle.loads(pickle.dumps(getattr(ours_swa, name)(*args)))(y, c, torch.tensor(3))
        for p, q in zip(x, y):
            torch.testing.assert_close(p, q)
    for name, args in (("get_ema_avg_fn", (0.7,)), ("get_swa_avg_fn", ())):
        want = getattr(torch_swa, name)(*args)(a[0], c[0], torch.tensor(3))
        got = getattr(ours_swa, name)(*args)(a[0], c[0], torch.tensor(3))
        torch.testing.assert_close(got, want)
    with pytest.raises(ValueError, match="Invalid decay"):
        ours_swa.get_ema_multi_avg_fn(1.5)
    with pytest.raises(AssertionError, match="Only one"):
        ours_swa.AveragedModel(cp.model(), avg_fn=_user_avg_fn, multi_avg_fn=_user_avg_fn)


def test_our_function_in_torchs_averaged_model():
    m = cp.model()
    theirs = torch_swa.AveragedModel(m, multi_avg_fn=torch_swa.get_ema_multi_avg_fn(0.9))
    mixed = torch_swa.AveragedModel(m, multi_avg_fn=ours_swa.get_ema_multi_avg_fn(0.9))
    gen = torch.Generator().manual_seed(18)
    for _ in range(5):
        cp.perturb(m, gen)
        theirs.update_parameters(m)
        mixed.update_parameters(m)
    cp.assert_parity(mixed.module.state_dict(), theirs.module.state_dict())


def test_pickles_and_updates_from_another_model_of_the_same_structure():
    m = cp.model()
    ours = ours_swa.AveragedModel(m, multi_avg_fn=ours_swa.get_ema_multi_avg_fn(0.5))
    ours.update_parameters(m)
    again = pickle.loads(pickle.dumps(ours))
    other = cp.model(seed=3)
    again.update_parameters(other)
    want = 0.5 * (m[0].weight + other[0].weight)
    torch.testing.assert_close(again.module[0].weight, want)
    assert torch.equal(again(torch.ones(2, 7)), again.module(torch.ones(2, 7)))


@pytest.mark.parametrize("direction", ["theirs_to_ours", "ours_to_theirs"])
def test_checkpoints_load_both_ways_and_continue_alike(direction):
    m = cp.model()
    classes = {"theirs": torch_swa, "ours": ours_swa}
    src_name, dst_name = direction.split("_to_")
    src = classes[src_name].AveragedModel(m, use_buffers=True)
    gen = torch.Generator().manual_seed(19)
    for _ in range(4):
        cp.perturb(m, gen)
        src.update_parameters(m)
    dst = classes[dst_name].AveragedModel(m, use_buffers=True)
    dst.load_state_dict(cp.saved_and_loaded(src.state_dict()))
    assert dst.n_averaged.item() == 4
    for _ in range(4):
        cp.perturb(m, gen)
        src.update_parameters(m)
        dst.update_parameters(m)
    mine, peer = dst.module.state_dict(), src.module.state_dict()
    del mine["1.num_batches_tracked"], peer["1.num_batches_tracked"]
    cp.assert_parity(mine, peer)
