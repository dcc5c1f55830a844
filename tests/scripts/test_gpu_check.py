"""scripts/gpu_check.sh's dry run, on the CPU: the plan it prints (every step capped, the
caps within the 9-minute budget, the newest kernels' GPU tests first, the sanitizers on
their subsets), and that it fails, naming the problem, when a step names a test that does
not exist, a benchmark option that is not there, or caps over the budget.  Each run
collects every pytest selection in one process: about half a minute here."""
from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from helpers.paths import ROOT

SCRIPT = Path(ROOT) / "scripts" / "gpu_check.sh"
BUDGET = 540


def _dry_run(script: Path, out: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHON": sys.executable}
    env.pop("EMA_GPU_CHECK_DEADLINE", None)
    return subprocess.run(["bash", str(script), "--dry-run", str(out)], capture_output=True,
                          text=True, env=env, timeout=600)


def _plan(stdout: str) -> list[tuple[str, int, str]]:
    """(step, cap in seconds, kind) for each plan line: ``name  <cap>s  kind: what``."""
    rows = re.findall(r"^(\S.*?)\s+(\d+)s  (\S+): ", stdout, flags=re.M)
    return [(name, int(cap), kind) for name, cap, kind in rows]


@pytest.fixture(scope="module")
def dry_run(tmp_path_factory):
    proc = _dry_run(SCRIPT, tmp_path_factory.mktemp("gpu_check"))
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return proc.stdout


def test_the_dry_run_passes_and_prints_every_step_with_its_cap(dry_run):
    plan = _plan(dry_run)
    names = [name for name, _, _ in plan]
    assert names[:5] == ["preflight", "install", "build extension", "extension check",
                         "nvidia-smi"]
    assert all(cap > 0 for _, cap, _ in plan)
    total = sum(cap for _, cap, _ in plan)
    assert total <= BUDGET
    assert f"caps: {total}s in all; budget {BUDGET}s; deadline {BUDGET}s" in dry_run
    assert "dry run: the plan is sound" in dry_run


def test_the_newest_kernels_are_tested_first_then_the_rest_then_the_sanitizers(dry_run):
    plan = _plan(dry_run)
    tests = [name for name, _, kind in plan if kind == "pytest"]
    assert tests == ["tests: stochastic rounding", "tests: multi-update", "tests: weighted sum", "tests: skip_nonfinite",
                     "tests: large tensor", "tests: graph tables", "tests: the rest"]
    kinds = {name: kind for name, _, kind in plan}
    assert kinds["memcheck"] == "sanitize-memcheck" and kinds["initcheck"] == "sanitize-initcheck"
    assert kinds["bandwidth"] == kinds["host cost"] == kinds["stochastic bench"] == "bench"
    memcheck = dry_run[dry_run.index("sanitize-memcheck: "):].splitlines()[0]
    for kernel in ("misaligned_views", "multi_update", "weighted_sum", "skip_nonfinite", "unaligned",
                   "update_real_sizes", "copy_and_swap", "device_weight"):
        for backend in ("triton", "cuda"):
            assert re.search(rf"{kernel}\S*\[{backend}|{kernel}\S*-{backend}\]", memcheck), (
                kernel, backend)
    assert "-x" not in memcheck.split() and "one_launch" not in memcheck  # no profiler test
    initcheck = dry_run[dry_run.index("sanitize-initcheck: "):].splitlines()[0]
    assert "stream" in initcheck and initcheck.count("::") == 1


def test_a_broken_plan_fails_naming_each_problem(tmp_path):
    """A copy of the repository (links) whose script names a test and a benchmark option
    that do not exist and caps over the budget."""
    repo = tmp_path / "repo"
    repo.mkdir()
    for entry in Path(ROOT).iterdir():
        if entry.name not in ("scripts", ".git", ".venv"):
            (repo / entry.name).symlink_to(entry)
    (repo / "scripts").mkdir()
    for entry in SCRIPT.parent.iterdir():
        if entry != SCRIPT:
            (repo / "scripts" / entry.name).symlink_to(entry)
    text = SCRIPT.read_text()
    for old, new in [("test_first_use_on_another_stream_waits_for_the_table_copy",
                      "test_no_such_test"),
                     ("benchmarks/bench_host.py --out", "benchmarks/bench_host.py --no-such-option"),
                     ('"host cost|15|', '"host cost|200|')]:
        assert old in text
        text = text.replace(old, new)
    (repo / "scripts" / "gpu_check.sh").write_text(text)
    proc = _dry_run(repo / "scripts" / "gpu_check.sh", tmp_path / "out")
    assert proc.returncode != 0
    problems = [line for line in proc.stdout.splitlines() if line.startswith("PROBLEM: ")]
    assert len(problems) == 3, proc.stdout[-3000:]
    assert any("collects 0" in p and "test_no_such_test" in p for p in problems)
    assert any("no option --no-such-option" in p for p in problems)
    assert any(f"over the {BUDGET}s budget" in p for p in problems)
