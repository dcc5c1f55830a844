"""Smoke runs of the benchmark suite at toy sizes, so it never rots.

Speed is not asserted (benchmarks report, tests assert); the files, the providers,
the figures each row must carry, the memory plan, ``compare.py`` and the
pytest-benchmark entry point are.
"""
from __future__ import annotations

import importlib
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

from benchmarks import bench_host, compare, run  # noqa: E402
from benchmarks.common import models, providers  # noqa: E402

from ema_fused import available_backends  # noqa: E402
from ema_fused.ema import host_path as _host_path  # noqa: E402
from ema_fused.backends import extension as _extension  # noqa: E402

PEERS = {"torch._foreach_lerp_": None, "timm ModelEmaV3": "timm", "timm ModelEmaV2": "timm",
         "AveragedModel": None, "torch_ema": "torch_ema", "ema-pytorch": "ema_pytorch",
         "naive loop": None, "copy (roofline)": None}
TINY = ["--models", "llama-tiny", "mix500-tiny", "--dtypes", "bf16", "fp32",
        "--repeats", "2", "--warmup", "0", "--max-copies", "2", "--device", "cpu"]


def _importable(module):
    try:
        importlib.import_module(module)
    except Exception:
        return False
    return True


def expected_here(device="cpu") -> set[str]:
    # Every usable backend, except Triton on the CPU: that is its interpreter, not timed.
    ours = {f"ema_fused[{n}]" for n, (ok, _) in available_backends(device).items()
            if ok and not (n == "triton" and device == "cpu")}
    return ours | {n for n, mod in PEERS.items() if mod is None or _importable(mod)}


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("bench")
    assert run.main(TINY + ["--out", str(out), "--tag", "smoke"]) == 0
    (path,) = out.glob("bench_*_smoke.json")
    return path, json.loads(path.read_text())


def test_run_writes_json_table_and_plot_with_every_provider(tiny_run, capsys):
    path, result = tiny_run
    assert path.with_suffix(".md").exists()
    if _importable("matplotlib"):  # the plot is optional; CI installs the bench extra
        assert path.with_suffix(".png").read_bytes()[:4] == b"\x89PNG"
    assert expected_here() >= {"ema_fused[foreach]", "naive loop", "copy (roofline)"}
    assert [(c["model"], c["dtype"]) for c in result["cases"]] == [
        ("llama-tiny", "bf16"), ("llama-tiny", "fp32"), ("mix500-tiny", "bf16"),
        ("mix500-tiny", "fp32")]
    for case in result["cases"]:
        assert set(case["results"]) == expected_here(), case["skipped"]
        for name, row in case["results"].items():
            assert row["median_ms"] > 0 and row["gb_per_s"] > 0 and row["cpu_ms"] >= 0
            assert row["p20_ms"] <= row["median_ms"] <= row["p80_ms"]
            assert len(row["times_ms"]) == 2 and row["frac_of_copy"] > 0
            assert row["launches"] is None and row["host_sync"] is None  # GPU-only figures
        best = case["speedup"]["ema_fused[foreach]"]
        assert set(best) == expected_here() - {"copy (roofline)"} - {
            n for n in case["results"] if n.startswith("ema_fused")}
    table = path.with_suffix(".md").read_text()
    for name in expected_here():
        assert name in table
    assert "Speed-up of ema_fused against each peer" in table
    m = result["machine"]
    assert m["device_name"].startswith("CPU") and m["torch"] == torch.__version__
    assert {"git_commit", "date", "cuda", "triton", "compute_capability"} <= set(m)


def test_bytes_and_shadow_dtypes_per_provider(tiny_run):
    _, result = tiny_run
    bf16 = result["cases"][0]
    numel = bf16["params"]
    rows = bf16["results"]
    assert rows["ema_fused[foreach]"]["shadow_dtype"] == "float32"
    assert rows["ema_fused[foreach]"]["bytes_moved"] == 10 * numel
    assert rows["copy (roofline)"]["bytes_moved"] == 10 * numel
    for name in ("timm ModelEmaV2", "AveragedModel", "torch_ema", "ema-pytorch"):
        if name in rows:  # these keep bf16 shadows: fewer bytes, and labelled so
            assert rows[name]["shadow_dtype"] == "bfloat16"
            assert rows[name]["bytes_moved"] == 6 * numel
    assert result["cases"][1]["results"]["naive loop"]["bytes_moved"] == 12 * numel
    peak = rows["ema_fused[foreach]"]["peak_extra_bytes"]
    if peak is not None:  # profiler memory events are a private API
        assert peak <= max(64 * 2**20, 4 * bf16["largest_tensor"])


def test_compare_merges_runs(tiny_run, tmp_path, capsys):
    path, result = tiny_run
    other = dict(result, machine=dict(result["machine"], device_name="Other device"))
    second = tmp_path / "other.json"
    second.write_text(json.dumps(other))
    assert compare.main([str(path), str(second), "--out", str(tmp_path), "--name", "x"]) == 0
    table = (tmp_path / "x.md").read_text()
    assert "Other device" in table and result["machine"]["device_name"] in table
    for name in expected_here():
        assert name in table
    if _importable("matplotlib"):
        assert (tmp_path / "x.png").read_bytes()[:4] == b"\x89PNG"


def test_memory_plan():
    spec = models.SPECS["llama-7b"]
    usable, _ = providers.discover(torch.device("cpu"))
    schedule, fits, skipped = run.plan(usable, spec, torch.bfloat16, 1, 10**15)
    assert schedule == "round-robin" and len(fits) == len(usable) and not skipped
    # 80 GB free: the model (13.5 GB) plus one provider at a time, not all together
    schedule, fits, skipped = run.plan(usable, spec, torch.bfloat16, 1, 80 * 10**9)
    assert schedule == "one at a time" and "ema_fused[foreach]" in {p.name for p in fits}
    schedule, fits, skipped = run.plan(usable, spec, torch.bfloat16, 1, 10**9)
    assert not fits and set(skipped) == {p.name for p in usable}
    assert "GiB" in skipped["ema_fused[foreach]"]


def test_a_failing_provider_is_reported_not_fatal(capsys):
    calls = []

    def breaks_on_third_call(model, decay):
        def update():
            calls.append(1)
            if len(calls) > 2:
                raise RuntimeError("boom")
        return update

    usable, _ = providers.discover(torch.device("cpu"))
    bad = providers.Provider("bad", "peer", "raises once timed", breaks_on_third_call)
    broken = providers.Provider("broken", "peer", "raises when made",
                                lambda m, d: (_ for _ in ()).throw(TypeError("no such arg")))
    case = run.run_case(models.SPECS["llama-tiny"], "bf16", torch.device("cpu"),
                        usable[:1] + [bad, broken], repeats=2, warmup=1, max_copies=1)
    assert set(case["results"]) == {usable[0].name}
    assert case["skipped"]["bad"] == "failed while timed: RuntimeError: boom"
    assert case["skipped"]["broken"].startswith("failed: TypeError")


def test_pytest_benchmark_entry_point(tmp_path):
    pytest.importorskip("pytest_benchmark")
    env = dict(os.environ, EMA_BENCH_SIZE="tiny", EMA_BENCH_DTYPES="bf16", EMA_BENCH_ROUNDS="2",
               EMA_BENCH_DEVICE="cpu")
    out = tmp_path / "pb.json"
    proc = subprocess.run([sys.executable, "-m", "pytest", "benchmarks/", "--benchmark-only", "-q",
                           "-p", "no:cacheprovider", f"--benchmark-json={out}",
                           "-k", "llama-tiny"], cwd=ROOT, env=env, capture_output=True,
                          text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    names = {b["params"]["provider"] for b in json.loads(out.read_text())["benchmarks"]}
    assert names == expected_here()


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_gpu_figures(tmp_path):
    args = [a for a in TINY if a not in ("--device", "cpu")] + ["--device", "cuda"]
    assert run.main(args + ["--out", str(tmp_path), "--tag", "gpu"]) == 0
    (path,) = tmp_path.glob("bench_*_gpu.json")
    result = json.loads(path.read_text())
    assert result["machine"]["compute_capability"]
    for case in result["cases"]:
        assert set(case["results"]) == expected_here("cuda"), case["skipped"]
        for name, row in case["results"].items():
            assert isinstance(row["host_sync"], bool), name
            assert row["launches"] is None or row["launches"]["total"] >= 1, name
            assert row["peak_extra_bytes"] >= 0


def test_host_cost_benchmark_times_every_usable_backend_both_ways(tmp_path, capsys):
    real = _host_path.snapshot
    assert bench_host.main(["--device", "cpu", "--rounds", "2", "--batch", "2",
                            "--out", str(tmp_path)]) == 0
    assert _host_path.snapshot is real  # the "python check" cases put it back
    files = list(tmp_path.glob("host_cpu-*core_*.json"))
    assert len(files) == 1
    rows = {r["case"]: r for r in json.loads(files[0].read_text())["rows"]}
    usable = [n for n, (ok, _) in available_backends("cpu").items() if ok and n != "triton"]
    checks = ["snapshot", "python check"] if _extension.load(build=False) else ["python check"]
    expected = {f"ema_fused[{n}], {c}" for n in usable for c in checks}
    expected.add("torch._foreach_lerp_ (fp32 lists)")
    assert set(rows) == expected
    for r in rows.values():
        assert 0 < r["p20_us"] <= r["median_us"] <= r["p80_us"] and r["note"] == "500 tensors"
    assert "| ema_fused[foreach], python check |" in capsys.readouterr().out


def test_bandwidth_bench_times_both_layouts_against_the_copy(tmp_path, capsys):
    from benchmarks import bench_bandwidth
    model = bench_bandwidth.unaligned(models.SPECS["llama-tiny"], torch.device("cpu"))
    assert all(p.data_ptr() % 16 == 2 for p in model.parameters())  # 1 bf16 element off
    assert bench_bandwidth.main(["--models", "llama-tiny", "--repeats", "1",
                                 "--out", str(tmp_path)]) == 0
    result = json.loads(next(tmp_path.glob("bandwidth_cpu-*.json")).read_text())
    names = bench_bandwidth.backends(torch.device("cpu")) + ["copy"]
    assert {(r["layout"], r["backend"]) for r in result["rows"]} == {
        (layout, n) for layout in ("aligned", "unaligned") for n in names}
    for r in result["rows"]:
        assert r["median_ms"] > 0 and r["fraction_of_copy"] > 0
        assert r["params"] == models.SPECS["llama-tiny"].numel
    assert "| llama-tiny | unaligned |" in capsys.readouterr().out
