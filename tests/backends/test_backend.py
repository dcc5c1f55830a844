"""Backend choice: auto falls back quietly, a name fails loudly, the env var steers auto."""
from __future__ import annotations

import logging
import re
import subprocess
import sys

import pytest
import torch

from ema_fused import BackendUnavailableError, EMA, available_backends, ema_update_
from ema_fused.backends import selection as _backend


def test_available_backends_lists_all_four_with_reasons():
    info = available_backends()
    assert list(info) == ["cuda", "triton", "cpu", "foreach"]
    for name, (usable, reason) in info.items():
        assert isinstance(usable, bool) and isinstance(reason, str) and reason
    assert info["foreach"][0] is True


def test_auto_picks_the_first_usable_and_logs_once(caplog):
    # auto never takes a GPU backend (nor the Triton interpreter) for CPU tensors
    first = "cpu" if available_backends("cpu")["cpu"][0] else "foreach"
    _backend._logged.clear()
    with caplog.at_level(logging.INFO, logger="ema_fused"):
        assert _backend.select("auto", torch.device("cpu")).name == first
        assert _backend.select("auto", torch.device("cpu")).name == first
    lines = [r.getMessage() for r in caplog.records if "using backend" in r.getMessage()]
    assert len(lines) == 1
    assert f"'{first}'" in lines[0] and "triton:" in lines[0]  # says why the others were skipped


@pytest.mark.parametrize("name", ["cuda", "triton", "cpu"])
def test_named_unusable_backend_fails_loudly_with_the_reason(name):
    usable, reason = available_backends("cpu")[name]
    if usable:
        pytest.skip(f"{name} is usable here")
    with pytest.raises(BackendUnavailableError, match=re.escape(reason.split(";")[0][:40])):
        ema_update_([torch.zeros(2)], [torch.ones(2)], 0.5, backend=name)
    with pytest.raises(BackendUnavailableError):
        EMA(torch.nn.Linear(2, 2), backend=name)


def test_env_var_replaces_auto(monkeypatch):
    monkeypatch.setenv("EMA_FUSED_BACKEND", "foreach")
    s = torch.zeros(3)
    ema_update_([s], [torch.ones(3)], 0.5)
    assert torch.equal(s, torch.full((3,), 0.5))
    monkeypatch.setenv("EMA_FUSED_BACKEND", "bogus")
    with pytest.raises(ValueError, match="EMA_FUSED_BACKEND"):
        ema_update_([s], [torch.ones(3)], 0.5)
    if not available_backends("cpu")["triton"][0]:
        monkeypatch.setenv("EMA_FUSED_BACKEND", "triton")
        with pytest.raises(BackendUnavailableError):
            ema_update_([s], [torch.ones(3)], 0.5)
    # an explicit name wins over the environment
    ema_update_([s], [torch.ones(3)], 0.5, backend="foreach")
    assert torch.equal(s, torch.full((3,), 0.75))


def test_registering_an_unknown_name_is_refused():
    with pytest.raises(ValueError, match="unknown backend name"):
        _backend.register_backend(_backend.Backend("fast", "", None, None, lambda d: []))


def test_python_m_ema_fused_reports_every_backend():
    out = subprocess.run([sys.executable, "-m", "ema_fused"], capture_output=True, text=True,
                         check=True).stdout
    assert f"torch     {torch.__version__}" in out
    for name, (usable, reason) in available_backends("cpu").items():
        assert f"cpu   {name:<8} {'usable' if usable else 'not usable'}: {reason}" in out


def test_available_backends_without_a_device_is_the_default_devices():
    """No device: the device a model would be on here (the current CUDA device, else the
    CPU), so the answer agrees with available_backends(that device) and the CLI."""
    here = "cuda" if torch.cuda.is_available() else "cpu"
    assert available_backends() == available_backends(here)


def test_jit_build_dir_is_torchs_default_root(monkeypatch):
    import os
    from torch.utils.cpp_extension import get_default_build_root
    from ema_fused.backends import extension
    monkeypatch.delenv("TORCH_EXTENSIONS_DIR", raising=False)
    where = extension.jit_build_dir(False)
    assert where.parent.parent.parent == __import__("pathlib").Path(get_default_build_root())


def test_loading_the_extension_imports_no_cpp_extension():
    """Loading the extension (AOT here; the cached JIT build: test_cpp_backend) and
    updating never import torch.utils.cpp_extension, whose import warns "No CUDA
    runtime is found" on CPU-only machines."""
    code = (
        "import sys, torch, ema_fused\n"
        "from ema_fused.backends import extension\n"
        "extension._cached_jit_library()\n"
        "extension.load(build=False)\n"
        "from ema_fused import EMA\n"
        "EMA(torch.nn.Linear(3, 3)).update()\n"
        "print('torch.utils.cpp_extension' in sys.modules)\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "False"
    assert "No CUDA runtime" not in out.stderr


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA")
def test_cuda_without_a_driver_gets_a_clean_answer():
    """No driver: available_backends("cuda") says so for every backend, and an EMA asked
    for device="cuda" says so too, not torch's raw error (issue 20, item 8)."""
    info = available_backends("cuda")
    assert not any(usable for usable, _ in info.values())
    for usable, reason in info.values():
        assert "torch.cuda.is_available() is False" in reason
    for name in ("auto", "cuda", "triton"):
        with pytest.raises(BackendUnavailableError, match="torch.cuda.is_available"):
            _backend.select(name, torch.device("cuda"))
    with pytest.raises(RuntimeError, match=r"EMA: device='cuda'.*torch.cuda.is_available\(\) "
                                           r"is False"):
        EMA([torch.zeros(3)], device="cuda")
