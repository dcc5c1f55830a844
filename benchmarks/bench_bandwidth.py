"""Fraction of the copy bandwidth one EMA update reaches, per backend, aligned and not.

    python benchmarks/bench_bandwidth.py --out DIR                 # GPU: llama-1.1b + mix500
    python benchmarks/bench_bandwidth.py --models llama-tiny --repeats 3

For each model (``models.py``, bf16 params, fp32 shadows) and two layouts, it times
``ema.update()`` of every usable ema_fused kernel backend (and ``foreach``) against a
device-to-device copy of the same number of bytes, all round-robin in one run
(``timing.round_robin``: CUDA events on a GPU):

* ``aligned``: every param its own allocation (16-byte aligned, as a plain model is);
* ``unaligned``: every param a view into one flat buffer starting 1 element (2 bytes)
  off the 16-byte grid, as in models packed into one buffer.  The shadows EMA makes are
  aligned, so the two sides of a pair start at different offsets: the kernels' vector
  path for the shadow side, element accesses for the param side (``csrc/multi_tensor.h``).

Bytes of an update: 2 (param) + 4 + 4 (shadow read and written) = 10 per element; the
copy moves the same bytes (half read, half written).  ``fraction`` = copy time / update
time.  Writes ``bandwidth_<device>_<date>.json`` and prints a table.
"""
from __future__ import annotations

import argparse
import math
import sys
from pathlib import Path

if __package__ in (None, ""):  # run as a script: make the `benchmarks` package importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch
from torch import nn

import ema_fused
from benchmarks.common import models, providers, report, timing

BYTES_PER_ELEMENT = 10  # bf16 param + fp32 shadow read + written
DECAY = 0.999


def unaligned(spec: models.ModelSpec, device: torch.device, seed: int = 0) -> nn.Module:
    """``spec``'s params as views into one bf16 buffer, each 1 element off the 16-byte grid."""
    sizes = [math.prod(shape) for _, shape in spec.shapes]
    starts, at = [], 0
    for n in sizes:
        at += (1 - at) % 8  # next offset = 1 mod 8 elements: 2 bytes past a 16-byte boundary
        starts.append(at)
        at += n
    flat = torch.empty(at, dtype=torch.bfloat16, device=device)
    flat.normal_(0.0, 0.02, generator=torch.Generator(device=device).manual_seed(seed))
    root = nn.Module()
    for (name, shape), start, n in zip(spec.shapes, starts, sizes):
        *path, leaf = name.split(".")
        mod = root
        for part in path:
            if not hasattr(mod, part):
                mod.add_module(part, nn.Module())
            mod = getattr(mod, part)
        mod.register_parameter(leaf, nn.Parameter(flat[start:start + n].view(shape)))
    return root


def backends(device: torch.device) -> list[str]:
    """The ema_fused backends timed here: kernel backends that run natively, and foreach."""
    usable = [n for n, (ok, _) in ema_fused.available_backends(device).items() if ok]
    return [n for n in usable if not (n == "triton" and device.type == "cpu")]


def measure(model: nn.Module, device: torch.device, names: list[str], repeats: int) -> dict:
    """``{backend or "copy": Samples}`` for one model, all interleaved."""
    fns = {name: [ema_fused.EMA(model, DECAY, backend=name).update] for name in names}
    fns["copy"] = [providers.COPY.make(model, DECAY)]
    for f in fns.values():
        f[0]()  # first call: tables, compilation
    return timing.round_robin(fns, device, repeats, warmup=2)


def run(model_names: list[str], device: torch.device, repeats: int) -> dict:
    names = backends(device)
    rows = []
    for model_name in model_names:
        spec = models.SPECS[model_name]
        for layout in ("aligned", "unaligned"):
            model = (models.build(spec, torch.bfloat16, device) if layout == "aligned"
                     else unaligned(spec, device))
            samples = measure(model, device, names, repeats)
            copy_ms = timing.percentile(samples["copy"].times_ms, 0.5)
            moved = spec.numel * BYTES_PER_ELEMENT
            for name in names + ["copy"]:
                t = samples[name].times_ms
                med = timing.percentile(t, 0.5)
                rows.append({"model": model_name, "params": spec.numel, "tensors": spec.tensors,
                             "layout": layout, "backend": name, "median_ms": med,
                             "p20_ms": timing.percentile(t, 0.2), "p80_ms": timing.percentile(t, 0.8),
                             "gb_per_s": moved / med / 1e6, "fraction_of_copy": copy_ms / med})
            del model, samples
            timing.release(device)
    return {"schema": "ema_fused-bandwidth/1", "machine": report.machine_info(device),
            "config": {"models": model_names, "repeats": repeats, "decay": DECAY,
                       "bytes_per_element": BYTES_PER_ELEMENT, "param_dtype": "bf16",
                       "shadow_dtype": "fp32"}, "rows": rows}


def table(result: dict) -> str:
    lines = [f"Device: {result['machine']['device_name']}", "",
             "| model | layout | backend | median ms | p20-p80 ms | GB/s | fraction of copy |",
             "|---|---|---|---:|---:|---:|---:|"]
    for r in result["rows"]:
        lines.append(f"| {r['model']} | {r['layout']} | {r['backend']} | {r['median_ms']:.3f} | "
                     f"{r['p20_ms']:.3f}-{r['p80_ms']:.3f} | {r['gb_per_s']:.0f} | "
                     f"{r['fraction_of_copy']:.2f} |")
    return "\n".join(lines)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    gpu = torch.cuda.is_available()
    parser.add_argument("--models", nargs="+", default=["llama-1.1b", "mix500"] if gpu
                        else ["llama-200m", "mix500"], choices=sorted(models.SPECS))
    parser.add_argument("--repeats", type=int, default=20 if gpu else 7)
    parser.add_argument("--device", default="cuda" if gpu else "cpu")
    parser.add_argument("--out", default=str(Path(__file__).resolve().parent / "out"))
    args = parser.parse_args(argv)
    device = torch.device(args.device)
    result = run(args.models, device, args.repeats)
    report.save_json(result, args.out, "bandwidth", table=table(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
