"""accelerate: ``ema.attach(accelerated_optimizer)`` under ``accelerator.accumulate`` and
``accelerator.register_for_checkpointing(ema)`` through ``save_state`` / ``load_state``."""
import pytest
import torch
from torch import nn
from torch.nn import functional as F
from torch.utils.data import DataLoader, TensorDataset

accelerate = pytest.importorskip("accelerate")

from ema_fused import EMA  # noqa: E402
from helpers.trajectory import Recorder, assert_same_shadows, replay, snapshot  # noqa: E402

DECAY, STEPS = 0.8, 6


@pytest.fixture
def accelerator():
    acc = accelerate.Accelerator(cpu=True, gradient_accumulation_steps=2)
    yield acc
    # accelerate keeps its state in process-wide singletons: leave none for later tests
    accelerate.state.AcceleratorState._reset_state(True)
    accelerate.state.GradientState._reset_state()


def _batches():
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(4 * 2 * STEPS, 4, generator=gen)
    return DataLoader(TensorDataset(x, x.sum(1, keepdim=True).cos()), batch_size=4)


def _run(accelerator, model, opt, loader, skip: int = 0) -> None:
    for i, (x, y) in enumerate(loader):
        if i < skip:
            continue
        with accelerator.accumulate(model):
            accelerator.backward(F.mse_loss(model(x), y))
            opt.step()
            opt.zero_grad()


def test_attach_and_register_for_checkpointing(accelerator, tmp_path):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 8), nn.BatchNorm1d(8), nn.Tanh(), nn.Linear(8, 1))
    initial = snapshot(model)
    opt = torch.optim.SGD(model.parameters(), lr=0.2, momentum=0.5)
    model, opt, loader = accelerator.prepare(model, opt, _batches())
    rec = Recorder(model, opt.optimizer)
    ema = EMA(model, decay=DECAY)
    ema.attach(opt)  # the AcceleratedOptimizer: hooked at the torch optimizer inside
    accelerator.register_for_checkpointing(ema)

    half = len(loader) // 2
    _run(accelerator, model, opt, [b for i, b in enumerate(loader) if i < half])
    assert ema.num_updates == STEPS // 2  # accumulation 2: one update per real step
    accelerator.save_state(str(tmp_path / "mid"))
    _run(accelerator, model, opt, loader, skip=half)
    assert ema.num_updates == STEPS
    assert_same_shadows(ema, replay(initial, model, rec.states, decay=DECAY))
    final = {k: v.clone() for k, v in ema.state_dict()["shadows"].items()}

    accelerator.load_state(str(tmp_path / "mid"))  # model, optimizer and EMA back at mid-run
    assert ema.num_updates == STEPS // 2
    _run(accelerator, model, opt, loader, skip=half)
    assert ema.num_updates == STEPS
    for name, shadow in ema.state_dict()["shadows"].items():
        assert torch.equal(shadow, final[name]), name
