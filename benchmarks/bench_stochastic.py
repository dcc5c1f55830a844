"""bf16 shadows rounded stochastically against fp32 shadows, and against timm's stochastic
ModelEmaV3(dtype=torch.bfloat16), on the same bf16 model.

    python benchmarks/bench_stochastic.py --out benchmarks/results     # CPU: llama-200m, mix500
    python benchmarks/bench_stochastic.py --tiny --repeats 2           # CI smoke run

Providers, one EMA update each (round-robin in one run, ``timing.round_robin``):

* ``<backend> fp32 shadows``: ``EMA(model, dtype=torch.float32)`` (the default);
* ``<backend> bf16 stochastic``: ``EMA(model, dtype=torch.bfloat16, rounding="stochastic")``;
* ``<backend> bf16 nearest``: the same with nearest rounding (which freezes at high decay);
* ``timm ModelEmaV3 bf16``: its default stochastic rounding for bf16 shadows (a stateful
  generator; an fp32 copy of each chunk, a random int32 tensor and about ten passes).

Bytes per element: fp32 shadows 2 + 4 + 4 = 10, bf16 shadows 2 + 2 + 2 = 6 (0.6 of the
fp32 bytes).  Goals (issue 19): bf16 stochastic at most 0.8x the fp32-shadow time of the
same backend, and at least 8x faster than timm's stochastic path.  Writes
``stochastic_<device>_<date>[_<tag>].json`` and prints a table.
"""
from __future__ import annotations

import argparse
import importlib.util
import os
import sys
from pathlib import Path

if __package__ in (None, ""):  # run as a script: make the `benchmarks` package importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch

import ema_fused
from benchmarks.common import models, report, timing

DECAY = 0.999
BYTES = {"fp32 shadows": 10, "bf16 stochastic": 6, "bf16 nearest": 6, "timm": 6}


def backends(device: torch.device) -> list[str]:
    """Kernel backends that run natively here (not foreach, not Triton's interpreter)."""
    usable = [n for n, (ok, _) in ema_fused.available_backends(device).items() if ok]
    return [n for n in usable if n in (("cuda", "triton") if device.type == "cuda" else ("cpu",))]


def _ema_update(model, backend: str, **kw):
    ema = ema_fused.EMA(model, decay=DECAY, backend=backend, **kw)
    return ema.update


def _timm_update(model):
    from timm.utils.model_ema import ModelEmaV3
    ema = ModelEmaV3(model, decay=DECAY, dtype=torch.bfloat16)  # stochastic rounding: default
    return lambda: ema.update(model)


def providers(model, names: list[str], with_timm: bool) -> dict:
    fns = {}
    for name in names:
        fns[f"{name} fp32 shadows"] = [_ema_update(model, name)]
        fns[f"{name} bf16 stochastic"] = [_ema_update(model, name, dtype=torch.bfloat16,
                                                      rounding="stochastic", seed=0)]
        fns[f"{name} bf16 nearest"] = [_ema_update(model, name, dtype=torch.bfloat16)]
    if with_timm:
        fns["timm ModelEmaV3 bf16"] = [_timm_update(model)]
    return fns


def _bytes(label: str) -> int:
    return next(v for k, v in BYTES.items() if k in label)


def run(model_names: list[str], device: torch.device, repeats: int, warmup: int,
        with_timm: bool) -> dict:
    names = backends(device)
    load_at_start = os.getloadavg()  # the machine is shared: how busy it was
    rows, ratios = [], []
    for model_name in model_names:
        spec = models.SPECS[model_name]
        model = models.build(spec, torch.bfloat16, device)
        fns = providers(model, names, with_timm)
        for f in fns.values():
            f[0]()  # tables, first touches
        samples = timing.round_robin(fns, device, repeats, warmup)
        med = {label: timing.percentile(s.times_ms, 0.5) for label, s in samples.items()}
        for label, s in samples.items():
            moved = spec.numel * _bytes(label)
            rows.append({"model": model_name, "params": spec.numel, "tensors": spec.tensors,
                         "provider": label, "median_ms": med[label],
                         "p20_ms": timing.percentile(s.times_ms, 0.2),
                         "p80_ms": timing.percentile(s.times_ms, 0.8), "times_ms": s.times_ms,
                         "cpu_ms": timing.percentile(s.cpu_ms, 0.5), "bytes": moved,
                         "gb_per_s": moved / med[label] / 1e6})
        for name in names:
            sr, fp32 = samples[f"{name} bf16 stochastic"].times_ms, samples[f"{name} fp32 shadows"].times_ms
            ratio = med[f"{name} bf16 stochastic"] / med[f"{name} fp32 shadows"]
            entry = {"model": model_name, "backend": name, "stochastic_over_fp32": ratio,
                     "median_of_round_ratios": timing.percentile(
                         [a / b for a, b in zip(sr, fp32)], 0.5),
                     "byte_ratio": 0.6, "goal_0.8": ratio <= 0.8}
            if with_timm:
                entry["timm_over_stochastic"] = (med["timm ModelEmaV3 bf16"] /
                                                 med[f"{name} bf16 stochastic"])
                entry["goal_8x"] = entry["timm_over_stochastic"] >= 8
            ratios.append(entry)
        del fns, samples, model
        timing.release(device)
    return {"schema": "ema_fused-stochastic/1", "machine": report.machine_info(device),
            "config": {"models": model_names, "repeats": repeats, "warmup": warmup,
                       "decay": DECAY, "param_dtype": "bf16", "backends": names,
                       "timm": with_timm},
            "goal": "bf16 stochastic <= 0.8x fp32 shadows (same backend); timm's stochastic "
                    "ModelEmaV3(dtype=bf16) >= 8x ours",
            "load_avg_at_start": load_at_start, "load_avg_at_end": os.getloadavg(),
            "rows": rows, "ratios": ratios}


def table(result: dict) -> str:
    lines = [f"Device: {result['machine']['device_name']}", "",
             "| model | provider | median ms | p20-p80 ms | GB/s |", "|---|---|---:|---:|---:|"]
    for r in result["rows"]:
        lines.append(f"| {r['model']} | {r['provider']} | {r['median_ms']:.2f} | "
                     f"{r['p20_ms']:.2f}-{r['p80_ms']:.2f} | {r['gb_per_s']:.1f} |")
    lines += ["", "| model | backend | stochastic / fp32 | per-round median | timm / stochastic |",
              "|---|---|---:|---:|---:|"]
    for r in result["ratios"]:
        timm = r.get("timm_over_stochastic")
        lines.append(f"| {r['model']} | {r['backend']} | {r['stochastic_over_fp32']:.3f} | "
                     f"{r['median_of_round_ratios']:.3f} | "
                     f"{'n/a' if timm is None else f'{timm:.1f}x'} |")
    return "\n".join(lines)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    gpu = torch.cuda.is_available()
    parser.add_argument("--models", nargs="+", default=None, choices=sorted(models.SPECS))
    parser.add_argument("--tiny", action="store_true", help="toy widths (CI smoke run)")
    parser.add_argument("--repeats", type=int, default=20 if gpu else 9)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--no-timm", action="store_true", help="leave timm out")
    parser.add_argument("--device", default="cuda" if gpu else "cpu")
    parser.add_argument("--tag", default="")
    parser.add_argument("--out", default=str(Path(__file__).resolve().parent / "out"))
    args = parser.parse_args(argv)
    model_names = args.models or (list(models.TINY) if args.tiny else
                                  ["llama-1.1b", "mix500"] if gpu else ["llama-200m", "mix500"])
    with_timm = not args.no_timm and importlib.util.find_spec("timm") is not None
    device = torch.device(args.device)
    result = run(model_names, device, args.repeats, args.warmup, with_timm)
    report.save_json(result, args.out, "stochastic", args.tag or ("tiny" if args.tiny else ""),
                     table(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
