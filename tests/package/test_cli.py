"""``python -m ema_fused``: the report, ``--help`` of every command, and ``average`` end to
end in a subprocess (float64 reference, progress lines, errors, no partial output)."""
from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch

from ema_fused import __main__ as cli
from ema_fused import average_checkpoints

from helpers.numerics import rand, seeded
from helpers.paths import ROOT



def python_m(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "ema_fused", *args], capture_output=True,
                          text=True, cwd=ROOT, timeout=300)


@pytest.mark.parametrize("command,options", [
    ([], ["report", "build", "average"]),
    (["report"], []),
    (["build"], ["--cpu-only", "--verbose"]),
    (["average"], ["--out", "--format", "--weights", "--key", "--no-strict", "--dtype",
                   "--map-location"]),
])
def test_every_command_has_help(capsys, command, options):
    assert cli.main([*command, "--help"]) == 0
    text = capsys.readouterr().out
    assert text.startswith("usage: python -m ema_fused " + " ".join(command))
    for option in options:
        assert option in text, (option, text)


def test_no_arguments_print_the_report(capsys):
    assert cli.main([]) == 0
    assert capsys.readouterr().out.strip() == cli.report()


def test_usage_errors_exit_2_naming_the_problem(capsys):
    assert cli.main(["build", "--bogus"]) == 2
    assert "--bogus" in capsys.readouterr().err
    assert cli.main(["average", "a.pt"]) == 2  # --out is required
    assert "--out" in capsys.readouterr().err
    assert cli.main(["frobnicate"]) == 2
    assert "frobnicate" in capsys.readouterr().err


def _checkpoints(tmp_path, k: int):
    gen = seeded("cli", k)
    states = [{"embed.weight": rand((33, 5), torch.bfloat16, gen),
               "fc.bias": rand(7, torch.float32, gen), "steps": torch.tensor(j)}
              for j in range(k)]
    paths = []
    for j, s in enumerate(states):
        paths.append(str(tmp_path / f"ckpt{j}.pt"))
        torch.save({"model": {"module." + n: t for n, t in s.items()}, "epoch": j}, paths[-1])
    return states, paths


def test_average_end_to_end(tmp_path):
    states, paths = _checkpoints(tmp_path, 3)
    out = str(tmp_path / "avg.pt")
    proc = python_m("average", *paths, "--weights", "1", "2", "-1", "--key", "model",
                    "--out", out)
    assert proc.returncode == 0, proc.stderr
    lines = proc.stderr.strip().splitlines()
    # not a terminal: a progress line per tenth of the bytes at most, the last one full
    assert 1 <= len(lines) - 1 <= 11, lines
    assert all(line.startswith("ema_fused average: [") for line in lines[:-1]), lines
    assert "] 3/3 tensors, " in lines[-2] and lines[-2].count("#") == 30, lines
    assert lines[-1].startswith(f"ema_fused average: wrote 3 tensors to {out} "
                                "(torch.save file); read "), lines
    result = torch.load(out, weights_only=True)
    assert list(result) == ["embed.weight", "fc.bias", "steps"]
    coeffs = [0.5, 1.0, -0.5]  # 1, 2, -1 over their sum
    for name in ("embed.weight", "fc.bias"):
        exact = sum(c * s[name].double() for c, s in zip(coeffs, states))
        mags = sum(abs(c) * s[name].double().abs() for c, s in zip(coeffs, states))
        assert result[name].dtype == torch.float32
        assert bool(((result[name].double() - exact).abs() <= 6 * 2 ** -24 * mags).all())
    assert int(result["steps"]) == 2  # the last source's


def test_average_float64_and_no_strict(tmp_path):
    states, paths = _checkpoints(tmp_path, 2)
    extra = torch.load(paths[1], weights_only=True)
    extra["model"]["module.new.weight"] = torch.ones(2)
    torch.save(extra, paths[1])
    out = str(tmp_path / "avg.pt")
    proc = python_m("average", *paths, "--key", "model", "--no-strict", "--dtype", "float64",
                    "--out", out)
    assert proc.returncode == 0, proc.stderr
    assert "1 tensors not in every source are left out: 'new.weight'" in proc.stderr
    result = torch.load(out, weights_only=True)
    assert "new.weight" not in result and result["fc.bias"].dtype == torch.float64
    exact = (states[0]["fc.bias"].double() + states[1]["fc.bias"].double()) / 2
    assert torch.allclose(result["fc.bias"], exact, rtol=1e-15, atol=0)


def test_average_errors_list_the_names_and_write_no_file(tmp_path):
    _, paths = _checkpoints(tmp_path, 2)
    out = str(tmp_path / "avg.pt")
    proc = python_m("average", *paths, "--out", out)  # no --key: the top level has 'epoch'
    assert proc.returncode == 1
    assert "entry 'model' is a dict, not a tensor (pick the state dict inside" in proc.stderr
    other = torch.load(paths[1], weights_only=True)
    del other["model"]["module.fc.bias"]
    torch.save(other, paths[1])
    proc = python_m("average", *paths, "--key", "model", "--out", out)
    assert proc.returncode == 1
    assert "strict=True" in proc.stderr and "missing 'fc.bias'" in proc.stderr
    assert not os.listdir(tmp_path) or sorted(os.listdir(tmp_path)) == ["ckpt0.pt", "ckpt1.pt"]


def test_average_dcp_directories_into_a_safetensors_file(tmp_path):
    pytest.importorskip("safetensors")
    import warnings
    import torch.distributed.checkpoint as dcp
    from safetensors.torch import load_file
    states, _ = _checkpoints(tmp_path, 3)
    dirs = []
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*assuming the intent is to")
        for j, s in enumerate(states):
            dirs.append(str(tmp_path / f"dcp{j}"))
            dcp.save({"model": s, "epoch": j}, checkpoint_id=dirs[-1], no_dist=True)
    out = str(tmp_path / "avg.safetensors")
    proc = python_m("average", *dirs, "--key", "model", "--out", out)
    assert proc.returncode == 0, proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert "] 3/3 tensors, " in lines[-2] and " GiB read, " in lines[-2], lines
    assert lines[-1].startswith(f"ema_fused average: wrote 3 tensors to {out} "
                                "(safetensors file)"), lines
    result = load_file(out)
    assert sorted(result) == ["embed.weight", "fc.bias", "steps"]
    exact = sum(s["fc.bias"].double() for s in states) / 3
    assert torch.allclose(result["fc.bias"].double(), exact, rtol=1e-6, atol=0)
    assert int(result["steps"]) == 2
    proc = python_m("average", *dirs, "--key", "model", "--out", str(tmp_path / "avg_dir") + "/")
    assert proc.returncode == 0 and "(DCP checkpoint)" in proc.stderr, proc.stderr
    back = average_checkpoints([str(tmp_path / "avg_dir")])
    assert torch.equal(back["fc.bias"], result["fc.bias"])
