"""ema_fused.compat's classes next to their peers: one update each, the same shadow dtype.

    python benchmarks/bench_compat.py --out benchmarks/results  # CPU: llama-200m, mix500; bf16, fp32
    python benchmarks/bench_compat.py --tiny --repeats 2         # CI smoke run

For each model (``common/models.py``), each param dtype and each pair
(``common/compat_pairs.py``), the peer and the compat class are built on the same
model and timed round-robin (``timing.round_robin``), the pair on its own (one pair's
state in memory at a time).  The speed-up is peer median / compat median, and the
median of the per-round ratios (steadier on a shared machine).  Goals (issue 21): at
least 0.95 in every row; at least 1.5 against the per-tensor paths; at least 5 against
timm ModelEmaV3's stochastic bf16 path.  Writes ``compat_<device>_<date>[_<tag>].json``
with the load average at the start and end, and prints a table.
"""
from __future__ import annotations

import argparse
import importlib
import os
import sys
from pathlib import Path

if __package__ in (None, ""):  # run as a script: make the `benchmarks` package importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch

from benchmarks.common import models, report, timing
from benchmarks.common.compat_pairs import PAIRS, Pair

DECAY = 0.999
GOAL_ALL, GOAL_PER_TENSOR, GOAL_STOCHASTIC = 0.95, 1.5, 5.0


def goal(pair: Pair) -> float:
    if pair.bf16_only:
        return GOAL_STOCHASTIC
    return GOAL_PER_TENSOR if pair.per_tensor else GOAL_ALL


def _missing(pair: Pair) -> str | None:
    if pair.module is None:
        return None
    try:
        importlib.import_module(pair.module)
    except Exception as exc:
        return f"{pair.module} is not importable ({type(exc).__name__}: {exc})"
    return None


def measure(pair: Pair, model, device, repeats: int, warmup: int) -> dict:
    """``{"peer": Samples, "compat": Samples}``, or ``{"pending": reason}``."""
    peer = pair.make_peer(model, DECAY)
    try:
        ours = pair.make_ours(model, DECAY)
    except NotImplementedError as exc:
        return {"pending": str(exc), **timing.round_robin({"peer": [peer]}, device, repeats,
                                                          warmup)}
    return timing.round_robin({"peer": [peer], "compat": [ours]}, device, repeats, warmup)


def run(model_names: list[str], dtypes: list[str], device: torch.device, repeats: int,
        warmup: int) -> dict:
    load_at_start = os.getloadavg()  # the machine is shared: how busy it was
    rows = []
    for model_name in model_names:
        spec = models.SPECS[model_name]
        for dtype_name in dtypes:
            dtype = models.DTYPES[dtype_name]
            for pair in PAIRS:
                if pair.bf16_only and dtype != torch.bfloat16:
                    continue
                row = {"model": model_name, "params": spec.numel, "tensors": spec.tensors,
                       "dtype": dtype_name, "pair": pair.name, "about": pair.about,
                       "shadow_dtype": "fp32" if pair.fp32_shadows else dtype_name,
                       "per_tensor": pair.per_tensor, "goal": goal(pair),
                       "bytes": pair.bytes_moved(spec.numel, dtype)}
                why = _missing(pair)
                if why:
                    rows.append(dict(row, skipped=why))
                    continue
                model = models.build(spec, dtype, device)
                samples = measure(pair, model, device, repeats, warmup)
                for side in ("peer", "compat"):
                    if side in samples:
                        t = samples[side].times_ms
                        row[side] = {"median_ms": timing.percentile(t, 0.5),
                                     "p20_ms": timing.percentile(t, 0.2),
                                     "p80_ms": timing.percentile(t, 0.8), "times_ms": t,
                                     "cpu_ms": timing.percentile(samples[side].cpu_ms, 0.5)}
                if "pending" in samples:
                    row["pending"] = samples["pending"]
                else:
                    p, c = samples["peer"].times_ms, samples["compat"].times_ms
                    row["speedup"] = row["peer"]["median_ms"] / row["compat"]["median_ms"]
                    row["median_of_round_ratios"] = timing.percentile(
                        [a / b for a, b in zip(p, c)], 0.5)
                    row["meets_goal"] = row["speedup"] >= row["goal"]
                rows.append(row)
                del model, samples
                timing.release(device)
    return {"schema": "ema_fused-compat/1", "machine": report.machine_info(device),
            "config": {"models": model_names, "dtypes": dtypes, "repeats": repeats,
                       "warmup": warmup, "decay": DECAY},
            "goals": {"every row": GOAL_ALL, "per-tensor peers": GOAL_PER_TENSOR,
                      "timm V3 stochastic bf16": GOAL_STOCHASTIC},
            "load_avg_at_start": load_at_start, "load_avg_at_end": os.getloadavg(),
            "rows": rows}


def table(result: dict) -> str:
    lines = [f"Device: {result['machine']['device_name']}; load average "
             f"{result['load_avg_at_start'][0]:.1f} at the start, "
             f"{result['load_avg_at_end'][0]:.1f} at the end", "",
             "| model | dtype | peer | shadows | peer ms | compat ms | speed-up | per-round "
             "| goal |",
             "|---|---|---|---|---:|---:|---:|---:|---|"]
    for r in result["rows"]:
        head = f"| {r['model']} | {r['dtype']} | {r['pair']} | {r['shadow_dtype']} |"
        if "skipped" in r:
            lines.append(f"{head} - | - | - | - | skipped: {r['skipped']} |")
        elif "pending" in r:
            lines.append(f"{head} {r['peer']['median_ms']:.1f} | pending | - | - | "
                         f">= {r['goal']}: pending |")
        else:
            ok = "yes" if r["meets_goal"] else "**no**"
            lines.append(f"{head} {r['peer']['median_ms']:.1f} | {r['compat']['median_ms']:.1f} | "
                         f"{r['speedup']:.2f}x | {r['median_of_round_ratios']:.2f}x | "
                         f">= {r['goal']}: {ok} |")
    return "\n".join(lines)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    gpu = torch.cuda.is_available()
    parser.add_argument("--models", nargs="+", default=None, choices=sorted(models.SPECS))
    parser.add_argument("--dtypes", nargs="+", default=["bf16", "fp32"], choices=["bf16", "fp32"])
    parser.add_argument("--tiny", action="store_true", help="toy widths (CI smoke run)")
    parser.add_argument("--repeats", type=int, default=20 if gpu else 11)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--device", default="cuda" if gpu else "cpu")
    parser.add_argument("--tag", default="")
    parser.add_argument("--out", default=str(Path(__file__).resolve().parent / "out"))
    args = parser.parse_args(argv)
    model_names = args.models or (list(models.TINY) if args.tiny else list(models.QUICK))
    result = run(model_names, args.dtypes, torch.device(args.device), args.repeats, args.warmup)
    report.save_json(result, args.out, "compat", args.tag or ("tiny" if args.tiny else ""),
                     table(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
