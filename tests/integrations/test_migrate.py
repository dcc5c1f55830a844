"""``ema_fused.migrate.load_peer_state_dict``: each peer package runs a few real optimizer
steps, saves, its checkpoint goes into an ``EMA`` configured by the README's recipe, and
then both continue on the same trajectory: the shadows stay equal within fp32 rounding
(the tolerances of ``test_peers.py``: ~100x the rounding, ~1000x below a wrong decay).

Lightning's ``EMAWeightAveraging`` checkpoint is covered in ``test_lightning.py``.
"""
import io

import pytest
import torch
from torch import nn
from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn

from ema_fused import EMA, migrate
from ema_fused.schedules import num_updates_warmup, power_warmup, swa
from helpers.trajectory import shadows

RTOL, ATOL = 1e-5, 1e-6
BEFORE, AFTER = 6, 9  # steps the peer runs before saving, and steps both run after


class _Run:
    """A small model trained by SGD on fixed random data (BatchNorm stats move too)."""

    def __init__(self, seed: int, dtype=torch.float32) -> None:
        torch.manual_seed(seed)
        self.model = nn.Sequential(nn.Linear(7, 13), nn.BatchNorm1d(13), nn.ReLU(),
                                   nn.Linear(13, 5)).to(dtype)
        self.opt = torch.optim.SGD(self.model.parameters(), lr=0.3)
        self.gen = torch.Generator().manual_seed(seed)

    def step(self) -> None:
        dtype = next(self.model.parameters()).dtype
        x = torch.randn(16, 7, generator=self.gen).to(dtype)
        self.model(x).square().mean().backward()
        self.opt.step()
        self.opt.zero_grad()


def _saved(state):
    """``state`` through torch.save / torch.load, as it would come back from disk."""
    buf = io.BytesIO()
    torch.save(state, buf)
    buf.seek(0)
    return torch.load(buf, weights_only=True)


def _compare(ours: EMA, theirs: dict, names=None) -> None:
    mine = shadows(ours)
    names = list(theirs) if names is None else names
    assert names
    for n in names:
        assert mine[n].dtype == torch.float32, n
        torch.testing.assert_close(mine[n], theirs[n].float(), rtol=RTOL, atol=ATOL,
                                   msg=lambda m, n=n: f"{n}: {m}")


def _continue(run: _Run, ours: EMA, peer_update, first_step: int) -> None:
    for k in range(first_step, first_step + AFTER):
        run.step()
        peer_update(k)
        ours.update(step=k)


def _float_state(module: nn.Module) -> dict:
    return {k: v for k, v in module.state_dict().items() if v.is_floating_point()}


@pytest.mark.parametrize("version", ["V2", "V3"])
def test_timm(version):
    timm_ema = pytest.importorskip("timm.utils.model_ema")
    run = _Run(1)
    theirs = getattr(timm_ema, f"ModelEma{version}")(run.model, decay=0.8)
    for _ in range(BEFORE):
        run.step()
        theirs.update(run.model)
    saved = _saved({"state_dict_ema": theirs.module.state_dict()})  # timm train.py's layout
    ours = EMA(run.model, decay=0.8)
    report = migrate.load_peer_state_dict(ours, saved, "timm", step=BEFORE)
    assert (report.step, report.missing, report.unexpected) == (BEFORE, [], [])
    assert ours.num_updates == BEFORE and ours.decay == 0.8
    _compare(ours, _float_state(theirs.module))
    _continue(run, ours, lambda k: theirs.update(run.model), BEFORE + 1)
    _compare(ours, _float_state(theirs.module))
    if version == "V3":  # V2 pushes the integer counter through float math; both copy it here
        assert torch.equal(shadows(ours)["1.num_batches_tracked"],
                           theirs.module.state_dict()["1.num_batches_tracked"])


def test_timm_v3_warmup_continues_the_schedule():
    timm_ema = pytest.importorskip("timm.utils.model_ema")
    run = _Run(2)
    kw = dict(decay=0.9, use_warmup=True, warmup_gamma=1.0, warmup_power=0.75, min_decay=0.2)
    theirs = timm_ema.ModelEmaV3(run.model, update_after_step=2, **kw)
    for k in range(1, BEFORE + 1):
        run.step()
        theirs.update(run.model, step=k)
    ours = EMA(run.model, schedule=power_warmup(0.9, 1.0, 0.75, 0.2), update_after_step=2)
    migrate.load_peer_state_dict(ours, _saved(theirs.module.state_dict()), "timm", step=BEFORE)
    assert ours.decay == pytest.approx(theirs.get_decay(BEFORE), rel=1e-12)
    _continue(run, ours, lambda k: theirs.update(run.model, step=k), BEFORE + 1)
    _compare(ours, _float_state(theirs.module))


def test_ema_pytorch():
    ema_pytorch = pytest.importorskip("ema_pytorch")
    run = _Run(3)
    theirs = ema_pytorch.EMA(run.model, beta=0.85, update_after_step=2, update_every=1,
                             inv_gamma=2.0, power=0.75, min_value=0.3)
    for _ in range(BEFORE):
        run.step()
        theirs.update()
    ours = EMA(run.model, schedule=power_warmup(0.85, 2.0, 0.75, 0.3), update_after_step=2)
    report = migrate.load_peer_state_dict(ours, _saved(theirs.state_dict()), "ema_pytorch")
    assert report.step == BEFORE == int(theirs.step)
    _continue(run, ours, lambda k: theirs.update(), BEFORE + 1)
    assert ours.decay == pytest.approx(theirs.get_current_decay(), abs=1e-6)
    _compare(ours, _float_state(theirs.ema_model))


def test_torch_ema_by_parameter_order():
    torch_ema = pytest.importorskip("torch_ema")
    run = _Run(4)
    theirs = torch_ema.ExponentialMovingAverage(run.model.parameters(), decay=0.7,
                                                use_num_updates=True)
    for _ in range(BEFORE):
        run.step()
        theirs.update()
    ours = EMA(run.model, schedule=num_updates_warmup(0.7), buffers="ignore")
    report = migrate.load_peer_state_dict(ours, _saved(theirs.state_dict()), "torch_ema")
    assert report.step == BEFORE
    _continue(run, ours, lambda k: theirs.update(), BEFORE + 1)
    names = [n for n, _ in run.model.named_parameters()]
    _compare(ours, dict(zip(names, theirs.shadow_params)))


@pytest.mark.parametrize("warmup", [True, False], ids=["use_ema_warmup", "default"])
def test_diffusers(warmup):
    training_utils = pytest.importorskip("diffusers.training_utils")
    run = _Run(5)
    if warmup:
        theirs = training_utils.EMAModel(run.model.parameters(), decay=0.8, min_decay=0.1,
                                         update_after_step=2, use_ema_warmup=True,
                                         inv_gamma=1.0, power=2 / 3)
        ours = EMA(run.model, schedule=power_warmup(0.8, 1.0, 2 / 3, 0.1), update_after_step=2,
                   buffers="ignore")
    else:  # diffusers' default decay min(d, (1 + s) / (10 + s)) counts s from its 2nd step
        theirs = training_utils.EMAModel(run.model.parameters(), decay=0.8)
        ours = EMA(run.model, schedule=num_updates_warmup(0.8), update_after_step=1,
                   buffers="ignore")
    for _ in range(BEFORE):
        run.step()
        theirs.step(run.model.parameters())
    report = migrate.load_peer_state_dict(ours, _saved(theirs.state_dict()), "diffusers")
    assert report.step == BEFORE
    assert ours.decay == pytest.approx(theirs.cur_decay_value, rel=1e-12)
    _continue(run, ours, lambda k: theirs.step(run.model.parameters()), BEFORE + 1)
    assert ours.decay == pytest.approx(theirs.cur_decay_value, rel=1e-12)
    names = [n for n, _ in run.model.named_parameters()]
    _compare(ours, dict(zip(names, theirs.shadow_params)))


@pytest.mark.parametrize("kind", ["ema", "swa"])
def test_averaged_model(kind):
    run = _Run(6)
    if kind == "ema":
        theirs = AveragedModel(run.model, multi_avg_fn=get_ema_multi_avg_fn(0.9))
        ours = EMA(run.model, decay=0.9, update_after_step=1, buffers="ignore")
    else:
        theirs = AveragedModel(run.model)
        ours = EMA(run.model, schedule=swa(), buffers="ignore")
    for _ in range(BEFORE):
        run.step()
        theirs.update_parameters(run.model)
    # with use_buffers=False (the default) it saves buffers it never averaged: listed, not loaded
    report = migrate.load_peer_state_dict(ours, _saved(theirs.state_dict()), "averaged_model",
                                          strict=False)
    assert report.step == BEFORE == int(theirs.n_averaged)
    assert report.unexpected == ["1.num_batches_tracked", "1.running_mean", "1.running_var"]
    _continue(run, ours, lambda k: theirs.update_parameters(run.model), BEFORE + 1)
    _compare(ours, dict(theirs.module.named_parameters()))


# Errors: each names what is wrong and leaves the EMA exactly as it was -------------
def _untouched(ema: EMA):
    before = {k: v.clone() for k, v in shadows(ema).items()}
    step, decay = ema.num_updates, ema.decay

    def check():
        assert (ema.num_updates, ema.decay) == (step, decay)
        assert all(torch.equal(before[k], v) for k, v in shadows(ema).items())
    return check


def _timm_state(run: _Run) -> dict:
    return {k: v.clone() for k, v in run.model.state_dict().items()}


def test_wrong_shape_is_refused_and_nothing_written():
    run = _Run(7)
    state = _timm_state(run)
    state["3.weight"] = torch.zeros(5, 14)
    ours = EMA(run.model)
    ours.update()
    check = _untouched(ours)
    with pytest.raises(ValueError, match=r"'3.weight' has shape \(5, 13\).*\(5, 14\)"):
        migrate.load_peer_state_dict(ours, state, "timm", step=3)
    check()


def test_float64_average_is_never_downcast():
    run = _Run(8)
    state = _timm_state(run)
    state["0.bias"] = state["0.bias"].double()
    ours = EMA(run.model)
    check = _untouched(ours)
    with pytest.raises(TypeError, match="'0.bias' is torch.float32 but the checkpoint holds "
                                        "torch.float64"):
        migrate.load_peer_state_dict(ours, state, "timm", step=3)
    check()


def test_missing_and_unexpected_names_are_listed():
    torch_ema = pytest.importorskip("torch_ema")
    run = _Run(9)
    extra = nn.Parameter(torch.ones(2))  # torch_ema holds only weak references
    theirs = torch_ema.ExponentialMovingAverage(list(run.model.parameters()) + [extra],
                                                decay=0.5, use_num_updates=True)
    run.step()
    theirs.update()
    ours = EMA(run.model)  # also tracks the BatchNorm buffers, which torch_ema never has
    check = _untouched(ours)
    # 7 shadows against the model's 6 parameters: matched by position, so refused
    # whatever strict says (a shift would load every average after it into the wrong
    # tensor); param_names names each entry, and then names are matched
    for strict in (True, False):
        with pytest.raises(ValueError, match=r"holds 7 shadows .* model has 6 parameters"):
            migrate.load_peer_state_dict(ours, theirs.state_dict(), "torch_ema", strict=strict)
    check()
    names = [n for n, _ in run.model.named_parameters()] + ["extra"]
    with pytest.raises(KeyError, match=r"missing names \['1.running_mean', '1.running_var', "
                                       r"'1.num_batches_tracked'\], unexpected names "
                                       r"\['extra'\]"):
        migrate.load_peer_state_dict(ours, theirs.state_dict(), "torch_ema", param_names=names)
    check()
    report = migrate.load_peer_state_dict(ours, theirs.state_dict(), "torch_ema", strict=False,
                                          param_names=names)
    assert report.missing == ["1.running_mean", "1.running_var", "1.num_batches_tracked"]
    assert report.unexpected == ["extra"]
    assert report.step == ours.num_updates == 1
    assert torch.equal(shadows(ours)["3.bias"], theirs.shadow_params[5])


def _partly_frozen_run() -> _Run:
    """Three linear layers, the middle one frozen (a fine-tuning set-up)."""
    run = _Run(12)
    torch.manual_seed(12)
    run.model = nn.Sequential(nn.Linear(7, 13), nn.Linear(13, 13), nn.Linear(13, 5))
    run.model[1].requires_grad_(False)
    run.opt = torch.optim.SGD([p for p in run.model.parameters() if p.requires_grad], lr=0.3)
    return run


def test_torch_ema_of_trainable_params_into_trainable_only():
    """torch_ema's own recipe averages only the trainable parameters; its list goes into
    EMA(trainable_only=True) by the same selection, and both continue alike."""
    torch_ema = pytest.importorskip("torch_ema")
    run = _partly_frozen_run()
    theirs = torch_ema.ExponentialMovingAverage(
        [p for p in run.model.parameters() if p.requires_grad], decay=0.7, use_num_updates=True)
    for _ in range(BEFORE):
        run.step()
        theirs.update()
    ours = EMA(run.model, schedule=num_updates_warmup(0.7), trainable_only=True)
    report = migrate.load_peer_state_dict(ours, _saved(theirs.state_dict()), "torch_ema")
    assert (report.step, report.missing, report.unexpected) == (BEFORE, [], [])
    _continue(run, ours, lambda k: theirs.update(), BEFORE + 1)
    names = ["0.weight", "0.bias", "2.weight", "2.bias"]
    assert sorted(shadows(ours)) == sorted(names)
    _compare(ours, dict(zip(names, theirs.shadow_params)))


def test_torch_ema_of_trainable_params_into_an_all_params_ema_is_refused():
    """The same list into an EMA of every parameter: four shadows for six parameters.
    Matching by position would load layer 2's average into frozen layer 1's shadow, so
    it is refused (strict or not), naming the fix, and nothing is written."""
    torch_ema = pytest.importorskip("torch_ema")
    run = _partly_frozen_run()
    theirs = torch_ema.ExponentialMovingAverage(
        [p for p in run.model.parameters() if p.requires_grad], decay=0.7)
    run.step()
    theirs.update()
    ours = EMA(run.model)
    check = _untouched(ours)
    for strict in (True, False):
        with pytest.raises(ValueError, match=r"holds 4 shadows .* model has 6 parameters.*"
                                             r"trainable_only=True"):
            migrate.load_peer_state_dict(ours, theirs.state_dict(), "torch_ema", step=1,
                                         strict=strict)
    check()


def test_bad_requests_name_the_problem():
    run = _Run(10)
    ours = EMA(run.model)
    check = _untouched(ours)
    with pytest.raises(ValueError, match="unknown source 'keras'"):
        migrate.load_peer_state_dict(ours, {}, "keras")
    with pytest.raises(ValueError, match="'timm' checkpoint holds no step; pass step="):
        migrate.load_peer_state_dict(ours, _timm_state(run), "timm")
    with pytest.raises(ValueError, match=r"source='diffusers' expects .*optimization_step"):
        migrate.load_peer_state_dict(ours, {"shadow_params": []}, "diffusers")
    with pytest.raises(ValueError, match="step must be an integer >= 0"):
        migrate.load_peer_state_dict(ours, _timm_state(run), "timm", step=-1)
    with pytest.raises(ValueError, match="bias_correction=True"):
        migrate.load_peer_state_dict(EMA(run.model, bias_correction=True), _timm_state(run),
                                     "timm", step=1)
    check()


def test_list_ema_and_param_names():
    """An EMA of a tensor list takes torch_ema's list as it is; ``param_names`` renames."""
    torch_ema = pytest.importorskip("torch_ema")
    run = _Run(11)
    params = list(run.model.parameters())
    theirs = torch_ema.ExponentialMovingAverage(params[::-1], decay=0.5)
    run.step()
    theirs.update()
    ours = EMA(params[::-1])
    migrate.load_peer_state_dict(ours, theirs.state_dict(), "torch_ema", step=1)
    assert all(torch.equal(a, b) for (_, a), b in zip(ours.named_shadows(), theirs.shadow_params))
    named = EMA(run.model, buffers="ignore")
    names = [n for n, _ in run.model.named_parameters()][::-1]
    migrate.load_peer_state_dict(named, theirs.state_dict(), "torch_ema", step=1,
                                 param_names=names)
    assert torch.equal(shadows(named)["3.weight"], theirs.shadow_params[1])
