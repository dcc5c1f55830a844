"""``EMA.attach(optimizer)``: an update after every real optimizer step, none after a
step that GradScaler skipped, none after ``remove()``."""
import copy
import gc
import weakref

import pytest
import torch
from torch import nn

from ema_fused import EMA
from helpers.trajectory import Recorder, assert_same_shadows, replay, shadows, snapshot

ACCUMULATE = 2


def _model(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(5, 9), nn.BatchNorm1d(9), nn.ReLU(), nn.Linear(9, 3))


def _two_groups(model: nn.Module, cls=torch.optim.SGD, **kw) -> torch.optim.Optimizer:
    first, last = list(model[0].parameters()), list(model[3].parameters()) + list(
        model[1].parameters())
    return cls([{"params": first, "lr": 0.05}, {"params": last, "lr": 0.2}], **kw)


def _train(model, opt, steps: int, scaler=None, poison_steps=()) -> None:
    """``steps`` optimizer steps, each over ``ACCUMULATE`` micro-batches; on the steps in
    ``poison_steps`` one gradient is set to inf, which a GradScaler must skip."""
    gen = torch.Generator().manual_seed(1)
    for step in range(1, steps + 1):
        for _ in range(ACCUMULATE):
            x = torch.randn(8, 5, generator=gen)
            loss = model(x).square().mean() / ACCUMULATE
            (scaler.scale(loss) if scaler else loss).backward()
        if step in poison_steps:
            next(model.parameters()).grad[0, 0] = float("inf")
        if scaler is None:
            opt.step()
        else:
            scaler.step(opt)
            scaler.update()
        opt.zero_grad(set_to_none=True)


def test_attach_updates_after_every_step_with_two_param_groups():
    model = _model()
    opt = _two_groups(model, momentum=0.9)
    initial = snapshot(model)
    rec = Recorder(model, opt)
    ema = EMA(model, decay=0.8)
    handle = ema.attach(opt)
    _train(model, opt, 6)
    assert len(rec.states) == 6 and ema.num_updates == 6
    assert_same_shadows(ema, replay(initial, model, rec.states, decay=0.8))
    assert not torch.equal(shadows(ema)["0.weight"], model[0].weight)  # it averaged

    handle.remove()
    before = {k: v.clone() for k, v in shadows(ema).items()}
    _train(model, opt, 2)
    assert ema.num_updates == 6
    assert all(torch.equal(before[k], v) for k, v in shadows(ema).items())
    handle.remove()  # twice is harmless


def test_attach_twice_is_refused_until_removed():
    model = _model()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    ema = EMA(model)
    handle = ema.attach(opt)
    with pytest.raises(RuntimeError, match="already attached"):
        ema.attach(opt)
    handle.remove()
    with ema.attach(opt):  # the handle is also a context manager
        _train(model, opt, 1)
    _train(model, opt, 1)
    assert ema.num_updates == 1


def test_attach_refuses_a_non_optimizer():
    with pytest.raises(TypeError, match="torch.optim.Optimizer"):
        EMA(_model()).attach(object())


@pytest.mark.parametrize("fused", [False, True], ids=["sgd-skips-step", "fused-adam-found-inf"])
def test_grad_scaler_skipped_step_is_not_counted(fused):
    """A real CPU GradScaler: an inf gradient makes it skip the step.  SGD's step() is
    then never called; fused Adam's is, with ``found_inf`` set, and skips on its own."""
    model = _model(2)
    if fused:
        opt = torch.optim.Adam(model.parameters(), lr=0.01, fused=True)
        assert opt._step_supports_amp_scaling
    else:
        opt = torch.optim.SGD(model.parameters(), lr=0.1)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0 ** 8)
    initial = snapshot(model)
    ema = EMA(model, decay=0.7)
    ema.attach(opt)
    real = []
    opt.register_step_post_hook(lambda o, a, k: real.append(snapshot(model)))
    _train(model, opt, 5, scaler=scaler, poison_steps={3})
    assert scaler.get_scale() < 2.0 ** 8  # the scaler did see the inf and backed off
    assert ema.num_updates == 4
    if fused:  # step() ran five times; the skipped one left the weights as they were
        assert len(real) == 5
        params = [n for n, _ in model.named_parameters()]
        assert all(torch.equal(real[1][n], real[2][n]) for n in params)
        real = real[:2] + real[3:]
    assert len(real) == 4
    assert_same_shadows(ema, replay(initial, model, real, decay=0.7))


def test_attach_with_a_compiled_model():
    model = _model(3)
    compiled = torch.compile(model, backend="aot_eager")  # inductor would need a C++ build
    opt = _two_groups(model)
    initial = snapshot(model)
    rec = Recorder(model, opt)
    ema = EMA(compiled, decay=0.75)
    ema.attach(opt)
    _train(compiled, opt, 4)
    assert any(n.startswith("_orig_mod.") for n, _ in ema.named_shadows())
    assert_same_shadows(ema, replay(initial, model, rec.states, decay=0.75))


def test_attach_does_not_keep_the_ema_alive():
    model = _model()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    ema = EMA(copy.deepcopy(model))
    ema.attach(opt)
    alive = weakref.ref(ema)
    del ema
    gc.collect()
    assert alive() is None
    _train(model, opt, 1)  # the hook finds no EMA and does nothing


def test_attaching_one_ema_to_a_second_optimizer_is_refused():
    """Two optimizers stepping in one iteration (e.g. one per parameter group kind) would
    update an EMA attached to both twice per iteration: the second attach is refused
    until the first is removed (issue 20, item 8)."""
    model = _model()
    first = torch.optim.SGD(model[0].parameters(), lr=0.1)
    second = torch.optim.SGD(model[3].parameters(), lr=0.1)
    ema = EMA(model)
    handle = ema.attach(first)
    with pytest.raises(RuntimeError, match=r"already attached to another optimizer \(SGD\).*"
                                           r"twice per iteration"):
        ema.attach(second)
    other = EMA(model)
    with other.attach(second):  # another EMA may use it
        pass
    handle.remove()
    with ema.attach(second):
        _train(model, second, 1)
    assert ema.num_updates == 1
