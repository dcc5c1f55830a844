"""``import ema_fused`` (and its integrations package, and migrate) never needs a training
framework: each framework is imported only inside its own integration module."""
import subprocess
import sys

import pytest

_BLOCKED = """
import sys
for name in ("lightning", "pytorch_lightning", "transformers", "accelerate", "diffusers",
             "timm", "torch_ema", "ema_pytorch"):
    sys.modules[name] = None  # any import of it now fails
import ema_fused, ema_fused.integrations, ema_fused.migrate
import torch
ema = ema_fused.EMA(torch.nn.Linear(2, 2))
ema.attach(torch.optim.SGD(ema._tracked.module.parameters(), lr=0.1))
try:
    import ema_fused.integrations.lightning
except ImportError as e:
    print("lightning integration needs lightning:", e)
"""


def test_import_needs_no_framework():
    out = subprocess.run([sys.executable, "-c", _BLOCKED], capture_output=True, text=True,
                         timeout=120)
    assert out.returncode == 0, out.stderr
    assert "lightning integration needs lightning" in out.stdout


@pytest.mark.parametrize("name", ["lightning", "transformers"])
def test_integration_modules_import(name):
    pytest.importorskip(name)
    __import__(f"ema_fused.integrations.{name}")
