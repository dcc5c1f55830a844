"""benchmarks/bench_stochastic.py runs end to end at toy widths and records what it should:
the fp32-shadow, bf16 stochastic and bf16 nearest rows of every kernel backend, timm's
stochastic ModelEmaV3 row, and their ratios against the goals.  Speed is not asserted
(benchmarks report, tests assert)."""
from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

from benchmarks import bench_stochastic as bench  # noqa: E402

import torch  # noqa: E402


def test_tiny_run_writes_rows_and_ratios(tmp_path, capsys):
    pytest.importorskip("timm")
    names = bench.backends(torch.device("cpu"))
    if not names:
        pytest.skip("the C++ extension is not built: no cpu backend to time")
    assert bench.main(["--tiny", "--repeats", "2", "--warmup", "0", "--device", "cpu",
                       "--out", str(tmp_path)]) == 0
    (path,) = tmp_path.glob("stochastic_cpu-*_tiny.json")
    result = json.loads(path.read_text())
    assert result["config"]["backends"] == names == ["cpu"] and result["config"]["timm"]
    cases = {(r["model"], r["provider"]) for r in result["rows"]}
    assert cases == {(m, p) for m in ("llama-tiny", "mix500-tiny")
                     for p in ("cpu fp32 shadows", "cpu bf16 stochastic", "cpu bf16 nearest",
                               "timm ModelEmaV3 bf16")}
    for r in result["rows"]:
        assert r["p20_ms"] <= r["median_ms"] <= r["p80_ms"] and len(r["times_ms"]) == 2
        assert r["bytes"] == r["params"] * (10 if "fp32" in r["provider"] else 6)
    for r in result["ratios"]:
        assert r["goal_0.8"] == (r["stochastic_over_fp32"] <= 0.8)
        assert r["goal_8x"] == (r["timm_over_stochastic"] >= 8)
    assert "stochastic / fp32" in capsys.readouterr().out
