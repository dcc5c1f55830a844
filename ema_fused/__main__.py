"""``python -m ema_fused``: versions, the device, and every backend with why it is usable or not."""
from __future__ import annotations

import platform
import sys

import torch

from . import __version__, available_backends
from ._backend import ENV_VAR


def _triton_version() -> str:
    try:
        import triton
    except Exception as exc:  # any import failure is worth reporting, not raising
        return f"not importable ({type(exc).__name__}: {exc})"
    return triton.__version__


def report() -> str:
    """The text printed by ``python -m ema_fused``."""
    lines = [
        f"ema_fused {__version__}",
        f"python    {platform.python_version()} ({sys.executable})",
        f"torch     {torch.__version__} (CUDA build: {torch.version.cuda or 'no'})",
        f"triton    {_triton_version()}",
    ]
    if torch.cuda.is_available():
        for i in range(torch.cuda.device_count()):
            p = torch.cuda.get_device_properties(i)
            lines.append(f"device    cuda:{i} {p.name}, compute capability {p.major}.{p.minor}, "
                         f"{p.total_memory / 2**30:.1f} GiB")
    else:
        lines.append("device    cpu only (torch.cuda.is_available() is False)")
    devices = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
    lines.append(f"backends  (auto takes the first usable; {ENV_VAR} overrides 'auto')")
    for dev in devices:
        for name, (ok, why) in available_backends(dev).items():
            lines.append(f"  {dev:<5} {name:<8} {'usable' if ok else 'not usable'}: {why}")
    return "\n".join(lines)


def main(argv: list[str]) -> int:
    if argv and argv[0] in ("-h", "--help"):
        print(__doc__)
        return 0
    if argv:
        print(f"unknown command {argv[0]!r}; run without arguments for the report", file=sys.stderr)
        return 2
    print(report())
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
