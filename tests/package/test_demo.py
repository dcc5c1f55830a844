"""The built-in demo (README's main job until the benchmark suite lands) runs and shows EMA helping."""
from __future__ import annotations

import math

import torch

from ema_fused import demo
from ema_fused.backends import selection as _backend


def test_demo_ema_weights_beat_the_raw_weights(capsys):
    losses = demo.main(["--steps", "600", "--device", "cpu"])
    out = capsys.readouterr().out
    backend = _backend.select("auto", torch.device("cpu")).name
    assert "raw loss" in out and "EMA loss" in out and f"  {backend}\n" in out
    assert math.isfinite(losses["raw"]) and math.isfinite(losses["ema"])
    # the noisy SGD iterate jitters; its average sits nearer the optimum
    assert losses["ema"] < losses["raw"]
