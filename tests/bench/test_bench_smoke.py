"""The fallback benchmark runs end to end (tiny repeat count) and reports what it should.

Speed is not asserted here (benchmarks report, tests assert); the memory bound is,
because it is a property of the code: one mixed-dtype update of a bf16 model must
allocate at most max(64 MiB, largest tensor in fp32) beyond what already exists.
"""
from __future__ import annotations

import json
import os
import sys

import pytest

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "..", "benchmarks"))
import bench_fallback as bench  # noqa: E402  (a plain import: a moved file must fail, not skip)
pytest.importorskip("timm")


def test_quick_run_writes_json_with_every_provider(tmp_path, capsys):
    assert bench.main(["--quick", "--repeats", "1", "--out", str(tmp_path)]) == 0
    files = list(tmp_path.glob("fallback_cpu-*_quick.json"))
    assert len(files) == 1
    result = json.loads(files[0].read_text())
    assert {c["case"] for c in result["cases"]} == {"bf16 model, fp32 shadows", "fp32 model"}
    bf16, fp32 = result["cases"]
    assert set(bf16["providers"]) == {"ema_fused EMA (foreach)", "timm ModelEmaV3 fp32",
                                      "per-tensor lerp_ loop"}
    assert "torch._foreach_lerp_" in fp32["providers"]
    for case in result["cases"]:
        for row in case["providers"].values():
            assert row["median_ms"] > 0 and row["gb_per_s"] > 0
    peak = bf16["providers"]["ema_fused EMA (foreach)"]["peak_extra_bytes_profiler"]
    if peak is not None:  # the profiler's memory events are a private API
        assert peak <= bf16["memory_bound_bytes"]
    assert "| case | provider |" in capsys.readouterr().out
