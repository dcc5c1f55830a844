"""``python -m ema_fused``: versions, the device, and every backend with why it is usable or not.

``python -m ema_fused build [--cpu-only] [--verbose]``: build the C++/CUDA extension just
in time (with ninja, into torch's extension cache) unless an AOT build is installed.
The CUDA kernels are built when a CUDA toolkit (``CUDA_HOME``/nvcc) and a CUDA build
of torch are present; ``TORCH_CUDA_ARCH_LIST`` picks the GPU arches (default: the
visible GPUs, or 8.0, 9.0 and the newest the toolkit knows when none is visible).

``python -m ema_fused average CKPT_1 CKPT_2 ... [--weights ...] [--key model] [--no-strict]
[--dtype float32] --out avg.safetensors``: the weighted average of checkpoints
(:func:`ema_fused.average_checkpoints`; DCP checkpoint directories, torch.save files,
safetensors files), streamed tensor by tensor into a safetensors file or a DCP directory
(``--out DIR/``), or saved with torch.save (``--out avg.pt``), with a progress bar over
tensors and bytes on stderr.  Every command takes ``--help``.
"""
from __future__ import annotations

import argparse
import os
import platform
import sys
from typing import Optional

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


def _report(args: argparse.Namespace) -> int:
    print(report())
    return 0


def _build(args: argparse.Namespace) -> int:
    try:
        how = _extension.build(with_cuda=False if args.cpu_only else None, verbose=args.verbose)
    except Exception as exc:  # report any build failure as one clear line
        print(f"ema_fused: the build failed: {type(exc).__name__}: {exc}", file=sys.stderr)
        return 1
    kernels = [k for k in ("CPU", "CUDA") if _extension.has_kernels(k)]
    print(f"ema_fused: extension loaded, {how}; kernels for {', '.join(kernels)}")
    return 0


def _out_format(out: str, asked: str) -> str:
    if asked != "auto":
        return asked
    if out.endswith(".safetensors"):
        return "safetensors"
    return "dcp" if out.endswith(("/", os.sep)) or os.path.isdir(out) else "torch"


def _average(args: argparse.Namespace) -> int:
    from .averaging import ProgressBar
    from .averaging import average_with_progress as average

    bar = ProgressBar("ema_fused average")
    fmt = _out_format(args.out, args.format)
    out = args.out.rstrip("/" + os.sep) or args.out
    try:
        if fmt == "safetensors" and not out.endswith(".safetensors"):
            raise ValueError(f"--format safetensors: the output's name must end in "
                             f".safetensors, got {out!r}")
        result = average(args.sources, args.weights, key=args.key, strict=args.strict,
                         dtype=getattr(torch, args.dtype), map_location=args.map_location,
                         out=None if fmt == "torch" else out, on_tensor=bar)
        if fmt == "torch":
            # a partial file never takes the output's name: write aside, then rename
            tmp = f"{out}.tmp{os.getpid()}"
            torch.save(result, tmp)
            os.replace(tmp, out)
    except (OSError, ValueError, TypeError, KeyError, RuntimeError, ImportError) as exc:
        text = exc.args[0] if isinstance(exc, KeyError) and exc.args else exc
        print(f"ema_fused average: {type(exc).__name__}: {text}", file=sys.stderr)
        return 1
    what = {"torch": "torch.save file", "safetensors": "safetensors file",
            "dcp": "DCP checkpoint"}[fmt]
    print(f"ema_fused average: wrote {bar.tensors} tensors to {out} ({what}); read "
          f"{bar.bytes / 2**30:.2f} GiB in {bar.seconds():.1f} s ({bar.rate():.2f} GiB/s)",
          file=sys.stderr)
    return 0


def parser() -> argparse.ArgumentParser:
    """The command line: ``report`` (the default), ``build`` and ``average``."""
    top = argparse.ArgumentParser(
        prog="python -m ema_fused", formatter_class=argparse.RawDescriptionHelpFormatter,
        description=__doc__.replace("``", "`").replace(":func:", ""))
    commands = top.add_subparsers(dest="command", metavar="{report,build,average}")
    rep = commands.add_parser("report", help="versions, the device and every backend "
                              "(what `python -m ema_fused` prints)")
    rep.set_defaults(run=_report)
    build = commands.add_parser(
        "build", help="build the C++/CUDA extension just in time",
        description="Build the C++/CUDA extension just in time (ninja, into torch's extension "
                    "cache) unless an AOT build is installed. TORCH_CUDA_ARCH_LIST picks the "
                    "GPU arches.")
    build.add_argument("--cpu-only", action="store_true", help="leave the CUDA kernels out")
    build.add_argument("--verbose", action="store_true", help="show the compiler's output")
    build.set_defaults(run=_build)
    avg = commands.add_parser(
        "average", help="the weighted average of checkpoints (SWA)",
        description="Average the floating-point tensors of checkpoints (weights normalised by "
                    "their sum; integer tensors from the last source), tensor by tensor: "
                    "memory holds about one tensor per source and one output tensor.")
    avg.add_argument("sources", nargs="+",
                     help="DCP checkpoint directories, torch.save files or safetensors files")
    avg.add_argument("--out", required=True,
                     help="where to write the average: NAME.safetensors (streamed), DIR/ or an "
                          "existing directory (a DCP checkpoint, streamed), else a torch.save "
                          "file (made in memory)")
    avg.add_argument("--format", choices=("auto", "safetensors", "dcp", "torch"),
                     default="auto", help="the output's format (default: from --out's name)")
    avg.add_argument("--weights", nargs="+", type=float, metavar="W",
                     help="one weight per source, normalised by their sum (default: uniform)")
    avg.add_argument("--key", default=None,
                     help="the state dict inside each checkpoint, e.g. model, state_dict, "
                          "or a dotted path such as ema.shadows; in a DCP checkpoint or a "
                          "safetensors file, the prefix of the names (default: all)")
    avg.add_argument("--no-strict", dest="strict", action="store_false",
                     help="average the names every source holds and leave the rest out "
                          "(default: refuse, listing every missing and unexpected name)")
    avg.add_argument("--dtype", choices=("float32", "float64"), default="float32",
                     help="dtype the sums are made and saved in (default: float32)")
    avg.add_argument("--map-location", default="cpu",
                     help="torch.load's map_location for the sources (default: cpu)")
    avg.set_defaults(run=_average)
    return top


def main(argv: Optional[list[str]] = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    try:
        args = parser().parse_args(argv)
    except SystemExit as exc:  # --help (0) or a usage error (2, already explained on stderr)
        return exc.code if isinstance(exc.code, int) else 2
    return args.run(args) if args.command else _report(args)


if __name__ == "__main__":
    sys.exit(main())
