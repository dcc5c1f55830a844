"""benchmarks/bench_distributed.py runs end to end (toy widths, 2 ranks) and writes its JSON.

Speed is not asserted (benchmarks report, tests assert); what the run records is.
"""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

BENCH = Path(__file__).resolve().parents[2] / "benchmarks" / "bench_distributed.py"


def test_tiny_run_writes_every_case_and_ratio(tmp_path):
    # its own session, so that a hang is killed with the ranks it spawned
    proc = subprocess.Popen([sys.executable, str(BENCH), "--tiny", "--rounds", "2", "--warmup",
                             "1", "--out", str(tmp_path)], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, start_new_session=True)
    try:
        stdout, stderr = proc.communicate(timeout=180)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
    assert proc.returncode == 0, stderr[-3000:]
    files = list(tmp_path.glob("distributed_cpu-*_tiny.json"))
    assert len(files) == 1
    result = json.loads(files[0].read_text())
    assert set(result["rows"]) == {"sharded", "local-size plain", "gather"}
    for row in result["rows"].values():
        assert len(row["per_rank"]) == 2 and row["slowest_rank_median_ms"] > 0
    assert set(result["ratios"]) == {"sharded / local-size plain", "gather / sharded"}
    assert sum(result["local_elements"]) == result["model"]["params"]  # shards cover the model
    assert "gather / sharded:" in stdout
