"""``python -m ema_fused``: versions, the device, and every backend with why it is usable or not.

``python -m ema_fused build [--cpu-only] [--verbose]``: build the C++/CUDA extension just
in time (with ninja, into torch's extension cache) unless an AOT build is installed.
The CUDA kernels are built when a CUDA toolkit (``CUDA_HOME``/nvcc) and a CUDA build
of torch are present; ``TORCH_CUDA_ARCH_LIST`` picks the GPU arches (default: the
visible GPUs, or 8.0, 9.0 and the newest the toolkit knows when none is visible).
"""
from __future__ import annotations

import platform
import sys

import torch

from . import __version__, available_backends
from .backends import extension as _extension
from .backends.selection import ENV_VAR


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
    if _extension.loaded():
        kernels = ", ".join(k for k in ("CPU", "CUDA") if _extension.has_kernels(k))
        lines.append(f"extension {_extension.loaded()}; kernels for {kernels}")
    else:
        lines.append(f"extension {_extension.error()}")
    return "\n".join(lines)


def main(argv: list[str]) -> int:
    if argv and argv[0] in ("-h", "--help"):
        print(__doc__)
        return 0
    if argv and argv[0] == "build":
        return _build(argv[1:])
    if argv:
        print(f"unknown command {argv[0]!r}; run without arguments for the report, or "
              "'build'", file=sys.stderr)
        return 2
    print(report())
    return 0


def _build(args: list[str]) -> int:
    unknown = [a for a in args if a not in ("--cpu-only", "--verbose")]
    if unknown:
        print(f"unknown option(s) for build: {' '.join(unknown)}", file=sys.stderr)
        return 2
    try:
        how = _extension.build(with_cuda=False if "--cpu-only" in args else None,
                               verbose="--verbose" in args)
    except Exception as exc:  # report any build failure as one clear line
        print(f"ema_fused: the build failed: {type(exc).__name__}: {exc}", file=sys.stderr)
        return 1
    kernels = [k for k in ("CPU", "CUDA") if _extension.has_kernels(k)]
    print(f"ema_fused: extension loaded, {how}; kernels for {', '.join(kernels)}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
