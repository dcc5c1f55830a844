"""``ema_fused.integrations.lightning.EMACallback`` in real Lightning runs on the CPU:
the EMA against a reference replayed by hand on the recorded parameter trajectory
(gradient accumulation 2), validation on the EMA weights with the raw weights back
afterwards, resume bit-identically, export into the checkpoint, manual optimization with
two optimizers, and side by side with Lightning's own ``EMAWeightAveraging``."""
import copy

import pytest
import torch
from torch import nn
from torch.nn import functional as F
from torch.utils.data import DataLoader, TensorDataset

pl = pytest.importorskip("lightning.pytorch")

from ema_fused.integrations.lightning import EMACallback  # noqa: E402
from helpers.trajectory import (Recorder, assert_same_shadows, assert_state_equal, replay,  # noqa: E402
                        shadows, snapshot)

DECAY = 0.8
EPOCHS = 2
STEPS_PER_EPOCH = 4  # 8 batches of 4, accumulated by 2


class Tiny(pl.LightningModule):
    """A small regression model that records what it sees: the raw trajectory (optimizer
    post-hook) and, at each validation batch, its weights and the loss computed from them."""

    def __init__(self, lr: float = 0.2) -> None:
        super().__init__()
        self.save_hyperparameters()
        self.net = nn.Sequential(nn.Linear(4, 8), nn.BatchNorm1d(8), nn.Tanh(), nn.Linear(8, 1))
        self.seen: list = []  # (global_step, weights, val loss) per validation batch

    def forward(self, x):
        return self.net(x)

    def training_step(self, batch, batch_idx):
        x, y = batch
        return F.mse_loss(self(x), y)

    def validation_step(self, batch, batch_idx):
        x, y = batch
        loss = F.mse_loss(self(x), y)
        self.seen.append((self.trainer.global_step, snapshot(self), loss.detach().clone()))
        return loss

    test_step = validation_step

    def configure_optimizers(self):
        opt = torch.optim.SGD(self.parameters(), lr=self.hparams.lr, momentum=0.5)
        self.recorder = Recorder(self, opt)
        return opt


def _data(seed: int, n: int, batch: int = 4) -> DataLoader:
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 4, generator=gen)
    return DataLoader(TensorDataset(x, x.sum(1, keepdim=True).sin()), batch_size=batch)


TRAIN, VAL = _data(0, 32), _data(1, 8, batch=8)  # validation: one batch


def _trainer(callbacks, tmp_path=None, **kw) -> "pl.Trainer":
    kw.setdefault("max_epochs", EPOCHS)
    kw.setdefault("accumulate_grad_batches", 2)
    return pl.Trainer(accelerator="cpu", devices=1, callbacks=callbacks, logger=False,
                      enable_progress_bar=False, enable_model_summary=False,
                      enable_checkpointing=tmp_path is not None, default_root_dir=tmp_path,
                      num_sanity_val_steps=1, deterministic=True, **kw)


def _model(seed: int = 0) -> Tiny:
    torch.manual_seed(seed)
    return Tiny()


def _val_loss(weights: dict, batch) -> torch.Tensor:
    model = _model()
    model.load_state_dict(weights)
    model.eval()
    x, y = batch
    with torch.no_grad():
        return F.mse_loss(model(x), y)


def test_ema_validation_and_raw_weights_match_a_hand_replay():
    model = _model()
    initial = snapshot(model)
    cb = EMACallback(DECAY)
    _trainer([cb]).fit(model, TRAIN, VAL)
    states = model.recorder.states
    assert len(states) == EPOCHS * STEPS_PER_EPOCH == cb.ema.num_updates
    assert_same_shadows(cb.ema, replay(initial, model, states, decay=DECAY))
    # the raw weights were back after every validation: training continued from them
    assert_state_equal(snapshot(model), states[-1])

    (step0, weights0, _), *during = model.seen
    assert step0 == 0
    assert_state_equal(weights0, initial)  # sanity check: before any update, raw weights
    assert [s for s, _, _ in during] == [STEPS_PER_EPOCH * (e + 1) for e in range(EPOCHS)]
    for step, weights, loss in during:
        expected = replay(initial, model, states[:step], decay=DECAY).averaged_weights()
        assert_state_equal(weights, expected)
        assert torch.equal(loss, _val_loss(expected, next(iter(VAL))))
        assert not torch.equal(loss, _val_loss(states[step - 1], next(iter(VAL))))


def test_validate_with_ema_false_uses_the_raw_weights():
    model = _model()
    cb = EMACallback(DECAY, validate_with_ema=False)
    _trainer([cb], max_epochs=1).fit(model, TRAIN, VAL)
    assert_state_equal(model.seen[-1][1], model.recorder.states[-1])
    model.seen.clear()
    _trainer([cb]).test(model, VAL)  # test_with_ema=True: after fit, the EMA weights
    assert_state_equal(model.seen[0][1], cb.ema.averaged_weights())


def test_offloaded_background_ema_orders_before_steps_and_matches_a_hand_replay():
    """EMACallback(device="cpu", non_blocking=True): while fitting, the offload's stream
    wait is placed before the optimizer steps (removed after), and the shadows are the
    hand replay's, bit for bit."""
    model = _model()
    initial = snapshot(model)
    cb, deferred = EMACallback(DECAY, device="cpu", non_blocking=True), []

    class Watch(pl.Callback):
        def on_train_batch_end(self, *args, **kwargs):
            deferred.append(cb.ema._offload.deferred)

    _trainer([cb, Watch()], max_epochs=1).fit(model, TRAIN, VAL)
    assert deferred and set(deferred) == {1}
    assert cb.ema._offload.deferred == 0
    assert_same_shadows(cb.ema, replay(initial, model, model.recorder.states, decay=DECAY))


@pytest.mark.parametrize("export", [False, True], ids=["plain", "export_ema_on_save"])
def test_resume_is_bit_identical_and_export_loads_the_average(tmp_path, export):
    full = _model()
    cb_full = EMACallback(DECAY, export_ema_on_save=export)
    ckpt = pl.callbacks.ModelCheckpoint(dirpath=tmp_path, save_top_k=-1, every_n_epochs=1)
    _trainer([cb_full, ckpt], tmp_path).fit(full, TRAIN, VAL)
    first = tmp_path / f"epoch=0-step={STEPS_PER_EPOCH}.ckpt"
    saved = torch.load(first, weights_only=False)
    averaged_then = replay(snapshot(_model()), full, full.recorder.states[:STEPS_PER_EPOCH],
                           decay=DECAY).averaged_weights()
    if export:  # state_dict: the average; raw weights beside it
        assert_state_equal(saved["current_model_state"], full.recorder.states[STEPS_PER_EPOCH - 1])
        assert_state_equal(snapshot(Tiny.load_from_checkpoint(first)), averaged_then)
    else:
        assert "current_model_state" not in saved
        assert_state_equal(saved["state_dict"], full.recorder.states[STEPS_PER_EPOCH - 1])

    resumed = _model(seed=123)  # other initial weights: all must come from the checkpoint
    cb = EMACallback(DECAY, export_ema_on_save=export)
    _trainer([cb], tmp_path).fit(resumed, TRAIN, VAL, ckpt_path=first)
    assert_same_shadows(cb.ema, cb_full.ema)
    assert cb.ema.decay == cb_full.ema.decay
    assert_state_equal(snapshot(resumed), snapshot(full))

    # a fresh trainer validating from the checkpoint uses the EMA stored in it
    fresh = _model(seed=7)
    _trainer([EMACallback(DECAY)]).validate(fresh, VAL, ckpt_path=first)
    assert_state_equal(fresh.seen[0][1], averaged_then)
    assert_state_equal(snapshot(fresh), full.recorder.states[STEPS_PER_EPOCH - 1])  # raw back


def _float_close(ours: dict, theirs: dict) -> None:
    names = [k for k, v in theirs.items() if v.is_floating_point()]
    assert len(names) > 4
    for n in names:
        torch.testing.assert_close(ours[n], theirs[n], rtol=1e-5, atol=1e-6,
                                   msg=lambda m, n=n: f"{n}: {m}")


def test_side_by_side_with_ema_weight_averaging_and_taking_over_its_checkpoint(tmp_path):
    """The README's recipe: ``EMAWeightAveraging(decay=d)`` (AveragedModel: the first
    update copies) == ``EMACallback(decay=d, update_after_step=1)``, within fp32 rounding
    (``d*a + (1-d)*p`` against ``lerp``).  Then a resume from its checkpoint with ours."""
    from lightning.pytorch.callbacks import EMAWeightAveraging, ModelCheckpoint

    theirs_model, ours_model = _model(), _model()
    ckpt = ModelCheckpoint(dirpath=tmp_path, save_top_k=-1, every_n_epochs=1)
    _trainer([EMAWeightAveraging(decay=DECAY), ckpt], tmp_path).fit(theirs_model, TRAIN, VAL)
    ours = EMACallback(DECAY, update_after_step=1)
    _trainer([ours]).fit(ours_model, TRAIN, VAL)

    assert len(theirs_model.recorder.states) == len(ours_model.recorder.states)
    for a, b in zip(theirs_model.recorder.states, ours_model.recorder.states):
        assert_state_equal(a, b)  # both put the raw weights back after each validation
    # EMAWeightAveraging copies its average into the model at train end
    _float_close(shadows(ours.ema), snapshot(theirs_model))
    assert len(theirs_model.seen) == len(ours_model.seen) == EPOCHS + 1
    for (s1, _, loss1), (s2, _, loss2) in zip(theirs_model.seen, ours_model.seen):
        assert s1 == s2
        torch.testing.assert_close(loss1, loss2, rtol=1e-5, atol=1e-7)

    # their epoch-0 checkpoint (average in "state_dict", raw beside it) resumed with ours
    first = tmp_path / f"epoch=0-step={STEPS_PER_EPOCH}.ckpt"
    resumed = _model(seed=5)
    taken = EMACallback(DECAY, update_after_step=1)
    _trainer([taken]).fit(resumed, TRAIN, VAL, ckpt_path=first)
    assert taken.ema.num_updates == EPOCHS * STEPS_PER_EPOCH
    assert_state_equal(resumed.recorder.states[-1], theirs_model.recorder.states[-1])
    _float_close(shadows(taken.ema), snapshot(theirs_model))


class TwoOptimizers(Tiny):
    """Manual optimization: optimizer ``a`` (first layer) steps on most batches, ``b``
    (the rest) on even ones, neither on every third batch."""

    def __init__(self) -> None:
        super().__init__()
        self.automatic_optimization = False
        self.after_batch: list = []  # (stepped, global_step, weights)

    def training_step(self, batch, batch_idx):
        a, b = self.optimizers()
        x, y = batch
        self.manual_backward(F.mse_loss(self(x), y))
        stepped = batch_idx % 3 != 2
        if stepped:
            a.step()
            if batch_idx % 2 == 0:
                b.step()
        a.zero_grad()
        b.zero_grad()
        self._stepped = stepped

    def on_train_batch_end(self, outputs, batch, batch_idx):
        self.after_batch.append((self._stepped, self.trainer.global_step, snapshot(self)))

    def configure_optimizers(self):
        first = list(self.net[0].parameters())
        rest = [p for p in self.parameters() if all(p is not q for q in first)]
        return torch.optim.SGD(first, lr=0.1), torch.optim.SGD(rest, lr=0.3)


def test_manual_optimization_with_two_optimizers():
    from ema_fused.schedules import power_warmup
    torch.manual_seed(0)
    model = TwoOptimizers()
    initial = snapshot(model)
    sched = power_warmup(0.95, power=0.75)  # depends on the step: the step numbers matter
    cb = EMACallback(schedule=sched)
    _trainer([cb], max_epochs=1, accumulate_grad_batches=1).fit(model, TRAIN)
    stepped = [(g, w) for s, g, w in model.after_batch if s]
    assert len(stepped) < len(model.after_batch)  # some batches did not step at all
    steps = [g for g, _ in stepped]
    assert steps[:4] == [2, 3, 4, 6]  # Lightning counts global_step per optimizer step
    assert cb.ema.num_updates == steps[-1]
    ref = replay(initial, model, [w for _, w in stepped], steps=steps, schedule=sched)
    assert_same_shadows(cb.ema, ref)


_SHARDED = """
import sys
import lightning.pytorch as pl
import torch
from torch.distributed.tensor import DTensor
sys.path[:0] = [{here!r}, {tests!r}]
from test_lightning import DECAY, TRAIN, VAL, Tiny, _model
from helpers.trajectory import replay, snapshot
from ema_fused.integrations.lightning import EMACallback


def full(state):
    return {{k: v.full_tensor() if isinstance(v, DTensor) else v for k, v in state.items()}}


class Sharded(Tiny):
    def configure_model(self):
        from torch.distributed.fsdp import fully_shard
        fully_shard(self.net, mesh=self.device_mesh["data_parallel"])


model = Sharded()
model.load_state_dict(_model().state_dict())
initial = snapshot(model)  # before fit: configure_model shards it
cb = EMACallback(DECAY)
trainer = pl.Trainer(accelerator="cpu", devices=1, strategy=pl.strategies.ModelParallelStrategy(),
                     max_steps=4, accumulate_grad_batches=2, val_check_interval=4, logger=False,
                     enable_progress_bar=False, enable_checkpointing=False,
                     enable_model_summary=False, num_sanity_val_steps=0, callbacks=[cb])
trainer.fit(model, TRAIN, VAL)
ours = dict(cb.ema.named_shadows())
params = {{n for n, _ in model.named_parameters()}}  # FSDP2 shards params, not buffers
assert all(isinstance(ours[n], DTensor) for n in params), ours
states = [full(s) for s in model.recorder.states]
ref = dict(replay(initial, _model(), states, decay=DECAY).named_shadows())
assert ours.keys() == ref.keys()
for name, shadow in ours.items():
    got = shadow.full_tensor() if isinstance(shadow, DTensor) else shadow
    assert torch.equal(got, ref[name]), name
step, weights, _ = model.seen[-1]
for name, value in full(weights).items():  # validation ran on the EMA weights
    assert torch.equal(value.float(), ref[name].float()), name
for name, value in full(snapshot(model)).items():  # and the raw ones are back, exactly
    assert torch.equal(value, states[-1][name]), name
import types
from ema_fused.integrations.transformers import _sharding
assert _sharding(types.SimpleNamespace(fsdp="full_shard"), model) is None  # FSDP2: followed
print("SHARDED OK", len(states), "steps")
"""


def test_model_parallel_strategy_averages_the_shards_without_a_gather():
    """ModelParallelStrategy + FSDP2 on the CPU (gloo, one process; in a subprocess so
    that its process group does not outlive the test): the callback's shadows are DTensors,
    bit for bit the reference EMA of the recorded trajectory, validation sees them, and
    the raw weights come back."""
    import os
    import subprocess
    import sys
    from helpers.paths import TESTS
    here = os.path.dirname(os.path.abspath(__file__))
    out = subprocess.run([sys.executable, "-c", _SHARDED.format(here=here, tests=TESTS)],
                         capture_output=True, text=True, timeout=240)
    assert "SHARDED OK 4 steps" in out.stdout, out.stdout + out.stderr[-4000:]


def test_fsdp1_and_deepspeed_are_refused_with_a_clear_error():
    """FSDP1 flattens parameters into its own buffers (and needs a GPU in Lightning):
    the callback refuses it at fit start, naming the strategy and what works instead."""
    import types

    from lightning.pytorch.strategies import FSDPStrategy

    from ema_fused.integrations._sharding import refuse_unsupported_sharding
    from ema_fused.integrations.lightning import _sharding_strategy

    assert _sharding_strategy(types.SimpleNamespace(strategy=FSDPStrategy())) == "FSDPStrategy"
    assert _sharding_strategy(types.SimpleNamespace(
        strategy=pl.strategies.ModelParallelStrategy())) is None
    with pytest.raises(NotImplementedError, match=r"sharded by FSDPStrategy.*Use FSDP2"):
        refuse_unsupported_sharding("FSDPStrategy")
    refuse_unsupported_sharding(None)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_bf16_model_on_cuda_keeps_fp32_shadows():
    model = _model()
    initial = snapshot(model)
    cb = EMACallback(DECAY)
    pl.Trainer(accelerator="gpu", devices=1, precision="bf16-true", callbacks=[cb],
               max_epochs=1, accumulate_grad_batches=2, logger=False, enable_progress_bar=False,
               enable_checkpointing=False, enable_model_summary=False,
               num_sanity_val_steps=0).fit(model, TRAIN, VAL)
    assert next(model.parameters()).dtype == torch.bfloat16
    assert all(s.dtype == torch.float32 and s.is_cuda
               for n, s in cb.ema.named_shadows() if "num_batches" not in n)
    states = model.recorder.states
    template = copy.deepcopy(model)  # bf16 on the GPU: loading ``initial`` rounds as .to() did
    ref = replay(initial, template, states, decay=DECAY)
    assert_same_shadows(cb.ema, ref)
    assert_state_equal(snapshot(model), states[-1])
