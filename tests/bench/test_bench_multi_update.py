"""benchmarks/bench_multi_update.py runs end to end at toy widths and records what it
should: every backend's one-pass and separate rows, their ratio against the byte bound.
Speed is not asserted (benchmarks report, tests assert)."""
from __future__ import annotations

import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

from benchmarks import bench_multi_update as bench  # noqa: E402

import torch  # noqa: E402


def test_tiny_run_writes_rows_and_ratios(tmp_path, capsys):
    assert bench.main(["--tiny", "--repeats", "2", "--warmup", "0", "--device", "cpu",
                       "--out", str(tmp_path)]) == 0
    (path,) = tmp_path.glob("multi_update_cpu-*_tiny.json")
    result = json.loads(path.read_text())
    names = result["config"]["backends"]
    assert "foreach" in names and "triton" not in names
    assert names == bench.backends(torch.device("cpu"))
    cases = {(r["model"], r["k"], r["provider"]) for r in result["rows"]}
    assert cases == {(m, k, f"{b} {how}") for m in ("llama-tiny", "mix500-tiny") for k in (2, 4)
                     for b in names for how in ("one pass", "separate")}
    for r in result["rows"]:
        assert r["p20_ms"] <= r["median_ms"] <= r["p80_ms"] and len(r["times_ms"]) == 2
        assert r["gb_per_s"] > 0 and r["cpu_ms"] >= 0
    assert {(r["k"], r["byte_ratio"]) for r in result["ratios"]} == {(2, 0.9), (4, 0.85)}
    for r in result["ratios"]:
        assert r["one_pass_over_separate"] > 0 and r["median_of_round_ratios"] > 0
        assert r["within_10pct"] == (r["one_pass_over_separate"] <= 1.1 * r["byte_ratio"])
    assert "one pass / separate" in capsys.readouterr().out
    assert result["machine"]["git_commit"] and result["machine"]["torch"] == torch.__version__
