"""benchmarks/bench_offload.py runs end to end at toy size and records what it must.

Speed is not asserted (benchmarks report, tests assert); the cases, their figures, the
ratios against the synchronous update and the machine description are.
"""
from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

from benchmarks import bench_offload  # noqa: E402


def test_tiny_run_writes_every_case(tmp_path):
    pytest.importorskip("timm")
    pytest.importorskip("diffusers")
    args = ["--model", "llama-tiny", "--rounds", "2", "--warmup", "1", "--out", str(tmp_path),
            "--tag", "smoke"]
    assert bench_offload.main(args) == 0
    (path,) = tmp_path.glob("offload_cpu-*_smoke.json")
    result = json.loads(path.read_text())
    assert result["device_slug"].startswith("cpu-") and len(result["load_avg_end"]) == 3
    assert set(result["cases"]) == {bench_offload.SYNC, bench_offload.OURS,
                                    "timm ModelEmaV3(device=cpu, fp32)",
                                    "diffusers EMAModel (offload_ema, foreach)"}
    for name, row in result["cases"].items():
        calling = row["calling_thread"]
        assert calling["n"] == 2 and 0 < calling["p20_ms"] <= calling["median_ms"]
        assert calling["median_ms"] <= calling["p80_ms"]
        assert (row["background"]["median_ms"] > 0) == (name == bench_offload.OURS)
    sync = result["cases"][bench_offload.SYNC]
    assert sync["calling_over_sync"] == 1.0
    assert result["goal_met"] is None  # the goal is for llama-200m
    assert result["gil_share_while_background"] > 0
