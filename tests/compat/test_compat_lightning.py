"""ema_fused.compat.lightning against Lightning's own WeightAveraging callbacks in real
(short) CPU runs: the same averaged and final weights, the same swap and copy calls, the
``should_update`` rules, checkpoints both ways, and a subclass written for Lightning's
class."""
import glob
import os
import pickle

import pytest
import torch
from torch import nn
from torch.nn import functional as F
from torch.utils.data import DataLoader, TensorDataset

pl = pytest.importorskip("lightning.pytorch")

from lightning.pytorch import callbacks as lightning_callbacks  # noqa: E402

from ema_fused.compat import lightning as ours  # noqa: E402
from ema_fused.compat.swa_utils import AveragedModel  # noqa: E402

from helpers import compat_parity as cp  # noqa: E402


class Tiny(pl.LightningModule):
    def __init__(self, crash_on_epoch=None) -> None:
        super().__init__()
        self.net = nn.Sequential(nn.Linear(4, 8), nn.BatchNorm1d(8), nn.Tanh(), nn.Linear(8, 1))
        self.crash_on_epoch = crash_on_epoch

    def forward(self, x):
        return self.net(x)

    def training_step(self, batch, batch_idx):
        if self.crash_on_epoch is not None and self.current_epoch >= self.crash_on_epoch:
            raise RuntimeError("CRASH")
        x, y = batch
        return F.mse_loss(self(x), y)

    def validation_step(self, batch, batch_idx):
        x, y = batch
        return F.mse_loss(self(x), y)

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1)


def _data(seed, n):
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 4, generator=gen)
    return DataLoader(TensorDataset(x, x.sum(1, keepdim=True).sin()), batch_size=4)


def _fit(callback, tmp_path, crash_on_epoch=None, ckpt_path=None, epochs=3):
    torch.manual_seed(0)
    model = Tiny(crash_on_epoch)
    trainer = pl.Trainer(accelerator="cpu", devices=1, callbacks=[callback], logger=False,
                         max_epochs=epochs, accumulate_grad_batches=2, num_sanity_val_steps=0,
                         enable_progress_bar=False, enable_model_summary=False,
                         enable_checkpointing=crash_on_epoch is not None,
                         default_root_dir=tmp_path, deterministic=True)
    if crash_on_epoch is not None:
        with pytest.raises(RuntimeError, match="CRASH"):
            trainer.fit(model, _data(0, 16), _data(1, 8), ckpt_path=ckpt_path)
    else:
        trainer.fit(model, _data(0, 16), _data(1, 8), ckpt_path=ckpt_path)
    return model


def _counting(base):
    class Counting(base):
        swaps = copies = 0

        def _swap_models(self, *args, **kwargs):
            type(self).swaps += 1
            return super()._swap_models(*args, **kwargs)

        def _copy_average_to_current(self, *args, **kwargs):
            type(self).copies += 1
            return super()._copy_average_to_current(*args, **kwargs)
    return Counting


@pytest.mark.parametrize("kwargs", [dict(decay=0.9), dict(decay=0.8, update_every_n_steps=3),
                                    dict(decay=0.9, update_starting_at_step=2)])
def test_ema_weight_averaging_matches_lightnings(tmp_path, kwargs):
    theirs_cb = _counting(lightning_callbacks.EMAWeightAveraging)(**kwargs)
    ours_cb = _counting(ours.EMAWeightAveraging)(**kwargs)
    theirs = _fit(theirs_cb, tmp_path / "theirs")
    mine = _fit(ours_cb, tmp_path / "ours")
    assert isinstance(ours_cb._average_model, AveragedModel)
    assert isinstance(ours_cb, lightning_callbacks.EMAWeightAveraging)
    n = ours_cb._average_model.n_averaged.item()
    assert n == theirs_cb._average_model.n_averaged.item() and n > 0
    assert (ours_cb.swaps, ours_cb.copies) == (theirs_cb.swaps, theirs_cb.copies) == (6, 1)
    average = ours_cb._average_model.module.state_dict()
    peer = theirs_cb._average_model.module.state_dict()
    del average["net.1.num_batches_tracked"], peer["net.1.num_batches_tracked"]
    cp.assert_parity(average, peer)
    cp.assert_parity(cp.floats(mine.state_dict()), cp.floats(theirs.state_dict()))
    assert ours_cb.state_dict() == theirs_cb.state_dict()


def test_should_update_is_lightnings():
    for cls in (ours.EMAWeightAveraging, lightning_callbacks.EMAWeightAveraging):
        cb = cls(update_every_n_steps=5, update_starting_at_step=10)
        assert [cb.should_update(step_idx=i) for i in (5, 9, 10, 11, 15)] == [0, 0, 1, 0, 1]
        cb = cls(update_starting_at_epoch=2)
        assert [cb.should_update(epoch_idx=i) for i in range(4)] == [0, 0, 1, 1]


def test_a_weight_averaging_subclass_with_its_own_rules(tmp_path):
    class SWAEveryEpoch(ours.WeightAveraging):
        def should_update(self, step_idx=None, epoch_idx=None):
            return epoch_idx is not None

    class TheirSWA(lightning_callbacks.WeightAveraging):
        should_update = SWAEveryEpoch.should_update

    ours_cb, theirs_cb = SWAEveryEpoch(), TheirSWA()
    _fit(ours_cb, tmp_path / "ours")
    _fit(theirs_cb, tmp_path / "theirs")
    assert ours_cb._average_model.n_averaged.item() == 3
    cp.assert_parity(cp.floats(ours_cb._average_model.module.state_dict()),
                     cp.floats(theirs_cb._average_model.module.state_dict()))


@pytest.mark.parametrize("direction", ["theirs_to_ours", "ours_to_theirs"])
def test_checkpoints_resume_both_ways(tmp_path, direction):
    classes = {"theirs": lightning_callbacks.EMAWeightAveraging, "ours": ours.EMAWeightAveraging}
    src, dst = direction.split("_to_")
    reference = classes[src](decay=0.9)
    _fit(reference, tmp_path / "reference")
    _fit(classes[src](decay=0.9), tmp_path / "run", crash_on_epoch=2)
    ckpt = glob.glob(os.path.join(tmp_path, "run", "checkpoints", "*.ckpt"))
    assert len(ckpt) == 1
    resumed = classes[dst](decay=0.9)
    _fit(resumed, tmp_path / "run", ckpt_path=ckpt[0])
    assert resumed._average_model.n_averaged.item() == reference._average_model.n_averaged.item()
    cp.assert_parity(cp.floats(resumed._average_model.module.state_dict()),
                     cp.floats(reference._average_model.module.state_dict()))


class Configured(Tiny):
    """Layers made in configure_model (Lightning's test_ema_configure_model)."""

    def __init__(self) -> None:
        super().__init__()
        self.net = None

    def configure_model(self) -> None:
        if self.net is None:
            self.net = nn.Sequential(nn.Linear(4, 8), nn.Tanh(), nn.Linear(8, 1))


def test_configure_model_a_private_copy_and_pickling(tmp_path):
    """The averaged model is made after configure_model, is a copy that holds no trainer
    and binds its own dataloader methods (Lightning's test_weight_averaging_deepcopy), and
    the callback pickles (ddp_spawn sends it to the workers)."""
    seen = {}

    class Checked(ours.EMAWeightAveraging):
        def setup(self, trainer, pl_module, stage):
            super().setup(trainer, pl_module, stage)
            module = self._average_model.module
            seen.update(net=isinstance(module.net, nn.Sequential), trainer=module._trainer,
                        bound=module.training_step.__self__ is module)

    callback = Checked(decay=0.9)
    again = pickle.loads(pickle.dumps(ours.EMAWeightAveraging(decay=0.9)))
    assert again._kwargs["avg_fn"].decay == 0.9
    model = Configured()
    trainer = pl.Trainer(accelerator="cpu", devices=1, callbacks=[callback], logger=False,
                         max_epochs=1, enable_progress_bar=False, enable_model_summary=False,
                         enable_checkpointing=False, default_root_dir=tmp_path)
    with pytest.warns(UserWarning, match="configure_model"):
        trainer.fit(model, _data(0, 8))
    assert seen == {"net": True, "trainer": None, "bound": True}
    assert callback._average_model.n_averaged.item() == 2
