"""benchmarks/bench_average.py runs end to end at toy sizes and records every figure.

Speed is not asserted (benchmarks report, tests assert); the cases, their figures and the
error against float64 are.
"""
from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

from benchmarks import bench_average  # noqa: E402


def test_tiny_run_writes_every_figure(tmp_path, capsys):
    pytest.importorskip("safetensors")
    cases = ["loop, DCP dirs", "ema_fused, DCP -> safetensors"]
    args = ["--size", "tiny", "--ks", "3", "--repeats", "1", "--cases", *cases,
            "--out", str(tmp_path), "--tag", "smoke"]
    assert bench_average.main(args) == 0
    (path,) = tmp_path.glob("average_cpu-*_smoke.json")
    result = json.loads(path.read_text())
    assert result["machine"]["torch"] and len(result["load_avg_end"]) == 3
    (res,) = result["results"]
    assert res["k"] == 3 and res["source_bytes_read"] == 3 * 2 * res["parameters"]
    assert list(res["cases"]) == cases
    for case in res["cases"].values():
        assert case["min_s"] <= case["median_s"] <= case["max_s"]
        assert case["GB_per_s_of_sources"] > 0 and case["peak_rss_MiB"] >= 0
    # bf16 inputs: fp32 sums are within a few fp32 roundings, the bf16 loop is not
    assert res["cases"]["ema_fused, DCP -> safetensors"]["max_abs_error_vs_float64"] < 1e-6
    assert res["cases"]["loop, DCP dirs"]["max_abs_error_vs_float64"] > 1e-4
    assert "ema_fused, DCP -> safetensors" in capsys.readouterr().out
