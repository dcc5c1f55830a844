"""benchmarks/bench_posthoc.py runs end to end at toy sizes and writes what it must record.

Speed is not asserted (benchmarks report, tests assert); the cases, the figures of every
row, the ratios and the machine description are.
"""
from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

from benchmarks import bench_posthoc  # noqa: E402


def test_tiny_run_writes_every_case(tmp_path, capsys):
    pytest.importorskip("ema_pytorch")
    args = ["--models", "llama-tiny", "--ks", "2", "4", "--repeats", "2", "--warmup", "1",
            "--device", "cpu", "--backend", "foreach", "--out", str(tmp_path), "--tag", "smoke"]
    assert bench_posthoc.main(args) == 0
    (path,) = tmp_path.glob("posthoc_cpu-*_smoke.json")
    result = json.loads(path.read_text())
    assert result["machine"]["torch"] and result["machine"]["device_slug"].startswith("cpu-")
    assert isinstance(result["multi_shadow_op"], bool) and len(result["load_avg_end"]) == 3
    parts = [(c["part"], c["k"]) for c in result["cases"]]
    assert parts == [("one_pass", 2), ("one_pass", 4), ("vs_ema_pytorch", 2)]
    for case in result["cases"]:
        assert case["backend"] == "foreach" and case["params"] > 0 and case["copy_gb_per_s"] > 0
        assert "copy (roofline)" in case["rows"]
        for row in case["rows"].values():
            assert len(row["times_ms"]) == 2
            assert row["p20_ms"] <= row["median_ms"] <= row["p80_ms"]
            assert row["gb_per_s"] > 0 and row["frac_of_copy"] > 0
    one = result["cases"][1]
    assert set(one["rows"]) == {"PostHocEMA (one pass)", "4 x EMA", "copy (roofline)"}
    assert one["rows"]["copy (roofline)"]["frac_of_copy"] == pytest.approx(1.0)
    assert one["byte_ratio"] == pytest.approx(34 / 40)
    assert one["rows"]["4 x EMA"]["bytes_per_element"] == 40
    assert one["time_ratio"] == pytest.approx(one["rows"]["PostHocEMA (one pass)"]["median_ms"]
                                              / one["rows"]["4 x EMA"]["median_ms"])
    vs = result["cases"][2]
    assert vs["speedup"] > 0 and vs["goal_met"] is None  # the goal is for llama-200m
    assert "speed-up vs ema-pytorch" in capsys.readouterr().out
