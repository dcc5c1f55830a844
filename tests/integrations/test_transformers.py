"""``ema_fused.integrations.transformers.EMACallback`` in real ``transformers.Trainer`` runs
on the CPU (a tiny model built here, nothing downloaded, ``report_to="none"``)."""
import json
import os

import pytest
import torch
from torch import nn
from torch.nn import functional as F

transformers = pytest.importorskip("transformers")
pytest.importorskip("accelerate")

from ema_fused.integrations.transformers import STATE_FILE, EMACallback  # noqa: E402
from helpers.trajectory import (Recorder, assert_same_shadows, assert_state_equal, replay,  # noqa: E402
                        snapshot)

DECAY = 0.8


class Regressor(nn.Module):
    """A plain module with the forward the Trainer expects (loss first in the output)."""

    def __init__(self) -> None:
        super().__init__()
        self.net = nn.Sequential(nn.Linear(4, 8), nn.BatchNorm1d(8), nn.Tanh(), nn.Linear(8, 1))

    def forward(self, x, labels=None):
        out = self.net(x)
        return {"loss": F.mse_loss(out, labels), "logits": out}


class Points(torch.utils.data.Dataset):
    def __init__(self, seed: int, n: int) -> None:
        gen = torch.Generator().manual_seed(seed)
        self.x = torch.randn(n, 4, generator=gen)
        self.y = self.x.sum(1, keepdim=True).sin()

    def __len__(self) -> int:
        return len(self.x)

    def __getitem__(self, i):
        return {"x": self.x[i], "labels": self.y[i]}


TRAIN = Points(0, 32)
EVAL = {"a": Points(1, 8), "b": Points(2, 8)}  # two eval datasets, one batch each


def _loss(weights: dict, data: Points) -> float:
    model = _model(0)
    model.load_state_dict(weights)
    model.eval()
    with torch.no_grad():
        return float(F.mse_loss(model.net(data.x), data.y))


class Probe(transformers.TrainerCallback):
    """Placed before the EMACallback: records the raw trajectory, the weights each
    evaluation ran on (its on_evaluate runs first), and checks that every step starts
    from the raw weights of the step before."""

    def __init__(self) -> None:
        self.initial, self.rec, self.evals = None, None, []

    def on_train_begin(self, args, state, control, model=None, optimizer=None, **kw):
        self.model = model
        self.initial = snapshot(model)
        self.rec = Recorder(model, optimizer.optimizer)  # the torch optimizer inside

    def on_step_begin(self, args, state, control, **kw):
        if self.rec.states:  # no evaluation left EMA weights in the model
            assert_state_equal(snapshot(self.model), self.rec.states[-1])

    def on_evaluate(self, args, state, control, metrics=None, **kw):
        self.evals.append((state.global_step, snapshot(self.model), metrics))


def _loss_key(metrics: dict) -> str:
    (key,) = [k for k in metrics if k.endswith("_loss")]
    return key


def _model(seed: int) -> Regressor:
    torch.manual_seed(seed)
    return Regressor()


def _trainer(tmp_path, callbacks, seed: int = 0, **kw) -> "transformers.Trainer":
    kw.setdefault("max_steps", 6)
    kw.setdefault("save_strategy", "no")
    args = transformers.TrainingArguments(
        output_dir=str(tmp_path), per_device_train_batch_size=4, gradient_accumulation_steps=2,
        per_device_eval_batch_size=8, learning_rate=0.1, optim="sgd", lr_scheduler_type="constant",
        weight_decay=0.0, report_to="none", use_cpu=True, seed=0, disable_tqdm=True,
        logging_strategy="no", dataloader_num_workers=0, **kw)
    return transformers.Trainer(model=_model(seed), args=args, train_dataset=TRAIN,
                                eval_dataset=EVAL, callbacks=callbacks)


@pytest.fixture(autouse=True)
def _offline(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("TRANSFORMERS_OFFLINE", "1")


def test_ema_and_evaluations_match_a_hand_replay(tmp_path):
    probe, cb = Probe(), EMACallback(DECAY)
    trainer = _trainer(tmp_path, [probe, cb], eval_strategy="steps", eval_steps=2)
    trainer.train()
    states = probe.rec.states
    assert len(states) == 6 == cb.ema.num_updates  # accumulation 2: one update per step
    assert_same_shadows(cb.ema, replay(probe.initial, trainer.model, states, decay=DECAY))
    assert_state_equal(snapshot(trainer.model), states[-1])  # raw weights at the end

    assert [(s, _loss_key(m)) for s, _, m in probe.evals] == [
        (s, f"eval_{d}_loss") for s in (2, 4, 6) for d in "ab"]
    for step, weights, metrics in probe.evals:
        expected = replay(probe.initial, trainer.model, states[:step], decay=DECAY)
        assert_state_equal(weights, expected.averaged_weights())  # both datasets: EMA in
        name = _loss_key(metrics).split("_")[1]
        ema_loss, raw_loss = _loss(weights, EVAL[name]), _loss(states[step - 1], EVAL[name])
        assert metrics[f"eval_{name}_loss"] == pytest.approx(ema_loss, rel=1e-6)
        assert abs(ema_loss - raw_loss) > 1e-4 * abs(raw_loss)  # it is not the raw loss

    # standalone evaluation: callback.evaluate(trainer) runs on the EMA weights
    metrics = cb.evaluate(trainer, eval_dataset=EVAL["a"])
    assert metrics["eval_loss"] == pytest.approx(_loss(cb.ema.averaged_weights(), EVAL["a"]),
                                                 rel=1e-6)
    assert_state_equal(snapshot(trainer.model), states[-1])


def test_offloaded_background_ema_orders_before_steps_and_matches_a_hand_replay(tmp_path):
    """EMACallback(device="cpu", non_blocking=True): during training the offload's stream
    wait is placed before the optimizer steps (removed at the end), and the shadows are
    the hand replay's, bit for bit."""
    probe, cb = Probe(), EMACallback(DECAY, device="cpu", non_blocking=True)
    deferred = []

    class Watch(transformers.TrainerCallback):
        def on_step_end(self, args, state, control, **kwargs):
            deferred.append(cb.ema._offload.deferred)

    trainer = _trainer(tmp_path, [probe, cb, Watch()])
    trainer.train()
    assert deferred and set(deferred) == {1}
    assert cb.ema._offload.deferred == 0
    assert_same_shadows(cb.ema, replay(probe.initial, trainer.model, probe.rec.states,
                                       decay=DECAY))


@pytest.mark.parametrize("with_ema", [False, True])
def test_epoch_evaluation_and_copy_to_model_at_end(tmp_path, with_ema):
    probe = Probe()
    cb = EMACallback(DECAY, evaluate_with_ema=with_ema, copy_to_model_at_end=True)
    trainer = _trainer(tmp_path, [probe, cb], max_steps=-1, num_train_epochs=1,
                       eval_strategy="epoch")
    trainer.train()
    assert [s for s, _, _ in probe.evals] == [4, 4]  # 32 samples / 4 / 2: one epoch
    expected = cb.ema.averaged_weights() if with_ema else probe.rec.states[-1]
    for _, weights, _ in probe.evals:
        assert_state_equal(weights, expected)
    assert_state_equal(snapshot(trainer.model), cb.ema.averaged_weights())  # copied at end


def test_resume_is_bit_identical(tmp_path):
    full = EMACallback(DECAY)
    trainer = _trainer(tmp_path, [full], save_strategy="steps", save_steps=3)
    trainer.train()
    for step in (3, 6):
        folder = tmp_path / f"checkpoint-{step}"
        assert (folder / STATE_FILE).is_file()
        state = json.loads((folder / "trainer_state.json").read_text())
        assert "ema" not in json.dumps(state).lower()  # no tensors in the JSON state
    saved_at_6 = torch.load(tmp_path / "checkpoint-6" / STATE_FILE, weights_only=True)

    resumed = EMACallback(DECAY)
    other = _trainer(tmp_path, [resumed], seed=99, save_strategy="no")  # other initial weights
    other.train(resume_from_checkpoint=str(tmp_path / "checkpoint-3"))
    assert_same_shadows(resumed.ema, full.ema)
    assert resumed.ema.decay == full.ema.decay
    assert all(torch.equal(a, saved_at_6["shadows"][n])
               for n, a in resumed.ema.state_dict()["shadows"].items())
    assert_state_equal(snapshot(other.model), snapshot(trainer.model))


def test_resume_without_an_ema_state_is_an_error(tmp_path):
    trainer = _trainer(tmp_path, [], max_steps=3, save_strategy="steps", save_steps=3)
    trainer.train()
    os.makedirs(tmp_path / "elsewhere")
    again = _trainer(tmp_path / "elsewhere", [EMACallback(DECAY)])
    with pytest.raises(FileNotFoundError, match=f"resumes at step 3 but no {STATE_FILE}"):
        again.train(resume_from_checkpoint=str(tmp_path / "checkpoint-3"))


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_bf16_model_on_cuda_keeps_fp32_shadows(tmp_path):
    probe, cb = Probe(), EMACallback(DECAY)
    args = transformers.TrainingArguments(
        output_dir=str(tmp_path), per_device_train_batch_size=4, gradient_accumulation_steps=2,
        max_steps=4, learning_rate=0.1, optim="sgd", lr_scheduler_type="constant",
        report_to="none", save_strategy="no", disable_tqdm=True, logging_strategy="no")
    model = _model(0).to("cuda", torch.bfloat16)
    data = Points(0, 32)
    data.x, data.y = data.x.bfloat16(), data.y.bfloat16()
    trainer = transformers.Trainer(model=model, args=args, train_dataset=data,
                                   callbacks=[probe, cb])
    trainer.train()
    assert all(s.dtype == torch.float32 and s.is_cuda
               for n, s in cb.ema.named_shadows() if "num_batches" not in n)
    assert_same_shadows(cb.ema, replay(probe.initial, model, probe.rec.states, decay=DECAY))


def test_fsdp1_is_refused_naming_it():
    """``TrainingArguments.fsdp`` over a model without DTensors is FSDP1 (flat parameters):
    refused at train begin; FSDP2 (DTensor parameters) is followed (test_lightning.py)."""
    import types

    from ema_fused.integrations._sharding import refuse_unsupported_sharding
    from ema_fused.integrations.transformers import _sharding

    plain = nn.Linear(3, 2)
    assert _sharding(types.SimpleNamespace(fsdp="full_shard"), plain) == "TrainingArguments.fsdp (FSDP1)"
    assert _sharding(types.SimpleNamespace(fsdp=""), plain) is None
    with pytest.raises(NotImplementedError, match=r"FSDP1.*fsdp_version=2"):
        refuse_unsupported_sharding(_sharding(types.SimpleNamespace(fsdp="full_shard"), plain))
