"""Each compat module needs only its own framework: timm's, torch_ema's, ema-pytorch's,
diffusers' and torch's classes import and run with every peer framework blocked (none of
them imports its peer), and only ``ema_fused.compat.lightning`` needs Lightning."""
import subprocess
import sys

_BLOCKED = """
import sys
for name in ("lightning", "pytorch_lightning", "lightning_fabric", "transformers", "accelerate",
             "diffusers", "timm", "torch_ema", "ema_pytorch"):
    sys.modules[name] = None  # any import of it now fails
import torch
from torch import nn
import ema_fused.compat
from ema_fused.compat.timm import ModelEmaV2, ModelEmaV3
from ema_fused.compat.torch_ema import ExponentialMovingAverage
from ema_fused.compat.ema_pytorch import EMA
from ema_fused.compat.diffusers import EMAModel
from ema_fused.compat.swa_utils import AveragedModel, get_ema_multi_avg_fn
m = nn.Linear(3, 3)
ModelEmaV3(m).update(m)
ModelEmaV2(m).update(m)
ExponentialMovingAverage(m.parameters(), 0.9).update()
EMA(m).update()
EMAModel(m.parameters()).step(m.parameters())
AveragedModel(m, multi_avg_fn=get_ema_multi_avg_fn()).update_parameters(m)
try:
    import ema_fused.compat.lightning
except ImportError as e:
    print("lightning compat needs lightning:", e)
"""


def test_each_compat_module_needs_only_its_framework():
    out = subprocess.run([sys.executable, "-c", _BLOCKED], capture_output=True, text=True,
                         timeout=120)
    assert out.returncode == 0, out.stderr
    assert "lightning compat needs lightning" in out.stdout
