"""benchmarks/bench_compat.py runs end to end at toy widths and records what it should:
every pair on every model and dtype (timm V3's stochastic pair on bf16 only), each with
the peer's and the compat class's times or the reason it did not run, the speed-up and
the goal.  Speed is not asserted (benchmarks report, tests assert)."""
from __future__ import annotations

import inspect
import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

from benchmarks import bench_compat as bench  # noqa: E402
from benchmarks.common.compat_pairs import PAIRS  # noqa: E402

from ema_fused import EMA  # noqa: E402


def test_tiny_run_writes_every_pair(tmp_path, capsys):
    assert bench.main(["--tiny", "--repeats", "1", "--warmup", "1", "--device", "cpu",
                       "--out", str(tmp_path)]) == 0
    (path,) = tmp_path.glob("compat_cpu-*_tiny.json")
    result = json.loads(path.read_text())
    want = {(m, d, p.name) for m in ("llama-tiny", "mix500-tiny") for d in ("bf16", "fp32")
            for p in PAIRS if d == "bf16" or not p.bf16_only}
    assert {(r["model"], r["dtype"], r["pair"]) for r in result["rows"]} == want
    stochastic_ready = "rounding" in inspect.signature(EMA).parameters
    for r in result["rows"]:
        assert "skipped" not in r, r["skipped"]  # the peers are test extras
        assert r["peer"]["median_ms"] > 0 and len(r["peer"]["times_ms"]) == 1
        pending = "pending" in r
        assert pending == ("stochastic" in r["pair"] and not stochastic_ready), r["pair"]
        if not pending:
            assert r["speedup"] == r["peer"]["median_ms"] / r["compat"]["median_ms"]
            assert r["meets_goal"] == (r["speedup"] >= r["goal"])
        assert r["goal"] == (5.0 if "stochastic" in r["pair"] else
                             1.5 if r["per_tensor"] else 0.95)
    assert len(result["load_avg_at_start"]) == 3 and result["machine"]["git_commit"]
    assert "speed-up" in capsys.readouterr().out
