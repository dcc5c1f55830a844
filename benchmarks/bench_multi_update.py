"""K profiles in one pass (ema_multi_update_) against K separate ema_update_ calls.

    python benchmarks/bench_multi_update.py --out benchmarks/results     # CPU: llama-200m, mix500
    python benchmarks/bench_multi_update.py --tiny --repeats 2           # CI smoke run

For each model (``models.py``; bf16 params, fp32 shadows), each K (2 and 4) and each
backend timed here (``cpu`` and ``foreach`` on the CPU; ``cuda``, ``triton`` and
``foreach`` on a GPU), it times one ``ema_multi_update_`` of the K profiles against K
``ema_update_`` calls on the same backend, the two round-robin (``timing.round_robin``)
in one run, on the same shadows (the weights keep them finite).

Bytes per element: one pass moves 2 (param) + 8K (each shadow read and written), K
separate updates 10K, so the time ratio cannot beat (2 + 8K) / (10K): 0.9 for K = 2,
0.85 for K = 4.  The goal (issue 14) is a measured ratio within 10% of that bound.
Writes ``multi_update_<device>_<date>[_<tag>].json`` and prints a table.
"""
from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

if __package__ in (None, ""):  # run as a script: make the `benchmarks` package importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch

import ema_fused
from benchmarks.common import models, report, timing

WEIGHT = 1e-3  # 1 - decay: keeps the shadows normal numbers however often they run


def byte_ratio(k: int) -> float:
    """The bound on one pass's time over K separate updates': (2 + 8K) / (10K)."""
    return (2 + 8 * k) / (10 * k)


def backends(device: torch.device) -> list[str]:
    """Backends that run natively here (Triton on the CPU is its interpreter: not timed)."""
    usable = [n for n, (ok, _) in ema_fused.available_backends(device).items() if ok]
    return [n for n in usable if not (n == "triton" and device.type == "cpu")]


def measure(params: list, k: int, device: torch.device, names: list[str], repeats: int,
            warmup: int) -> dict:
    """``{"<backend> one pass" | "<backend> separate": Samples}``, each backend's two
    interleaved round-robin on their own: a foreach call leaves torch's OpenMP threads
    spinning for a while, which would slow whatever ran next on this 2-core machine."""
    shadows = [[p.detach().float() for p in params] for _ in range(k)]
    weights = [WEIGHT * (q + 1) for q in range(k)]

    def one_pass(name):
        return lambda: ema_fused.ema_multi_update_(shadows, params, weights, backend=name)

    def separate(name):
        def run():
            for profile, w in zip(shadows, weights):
                ema_fused.ema_update_(profile, params, w, backend=name)
        return run

    out = {}
    for name in names:
        fns = {f"{name} one pass": [one_pass(name)], f"{name} separate": [separate(name)]}
        for f in fns.values():
            f[0]()  # tables, first touches
        out.update(timing.round_robin(fns, device, repeats, warmup))
    return out


def run(model_names: list[str], ks: list[int], device: torch.device, repeats: int,
        warmup: int) -> dict:
    names = backends(device)
    load_at_start = os.getloadavg()  # the machine is shared: how busy it was
    rows, ratios = [], []
    for model_name in model_names:
        spec = models.SPECS[model_name]
        model = models.build(spec, torch.bfloat16, device)
        params = [p.detach() for p in model.parameters()]
        for k in ks:
            samples = measure(params, k, device, names, repeats, warmup)
            medians = {}
            for label, s in samples.items():
                med = timing.percentile(s.times_ms, 0.5)
                medians[label] = med
                moved = spec.numel * ((2 + 8 * k) if label.endswith("one pass") else 10 * k)
                rows.append({"model": model_name, "params": spec.numel, "tensors": spec.tensors,
                             "k": k, "provider": label, "median_ms": med,
                             "p20_ms": timing.percentile(s.times_ms, 0.2),
                             "p80_ms": timing.percentile(s.times_ms, 0.8),
                             "times_ms": s.times_ms, "cpu_ms": timing.percentile(s.cpu_ms, 0.5),
                             "bytes": moved,
                             "gb_per_s": moved / med / 1e6})
            for name in names:
                measured = medians[f"{name} one pass"] / medians[f"{name} separate"]
                one, sep = samples[f"{name} one pass"].times_ms, samples[f"{name} separate"].times_ms
                # the same round's two calls: steadier than the medians on a shared machine
                paired = timing.percentile([a / b for a, b in zip(one, sep)], 0.5)
                bound = byte_ratio(k)
                ratios.append({"model": model_name, "k": k, "backend": name,
                               "one_pass_over_separate": measured,
                               "median_of_round_ratios": paired, "byte_ratio": bound,
                               "over_byte_ratio": measured / bound,
                               "within_10pct": measured <= 1.1 * bound})
            del samples
            timing.release(device)
        del model, params
        timing.release(device)
    return {"schema": "ema_fused-multi-update/1", "machine": report.machine_info(device),
            "config": {"models": model_names, "ks": ks, "repeats": repeats, "warmup": warmup,
                       "weights": f"{WEIGHT} * (k + 1)", "param_dtype": "bf16",
                       "shadow_dtype": "fp32", "backends": names},
            "goal": "one pass / K separate updates <= 1.1 * (2 + 8K) / (10K)",
            "load_avg_at_start": load_at_start, "load_avg_at_end": os.getloadavg(),
            "rows": rows, "ratios": ratios}


def table(result: dict) -> str:
    lines = [f"Device: {result['machine']['device_name']}", "",
             "| model | K | provider | median ms | p20-p80 ms | GB/s |", "|---|---:|---|---:|---:|---:|"]
    for r in result["rows"]:
        lines.append(f"| {r['model']} | {r['k']} | {r['provider']} | {r['median_ms']:.2f} | "
                     f"{r['p20_ms']:.2f}-{r['p80_ms']:.2f} | {r['gb_per_s']:.1f} |")
    lines += ["", "| model | K | backend | one pass / separate (medians) | per-round median | "
              "byte ratio | within 10% |", "|---|---:|---|---:|---:|---:|---|"]
    for r in result["ratios"]:
        lines.append(f"| {r['model']} | {r['k']} | {r['backend']} | "
                     f"{r['one_pass_over_separate']:.3f} | {r['median_of_round_ratios']:.3f} | "
                     f"{r['byte_ratio']:.3f} | {'yes' if r['within_10pct'] else 'no'} |")
    return "\n".join(lines)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    gpu = torch.cuda.is_available()
    parser.add_argument("--models", nargs="+", default=None, choices=sorted(models.SPECS))
    parser.add_argument("--tiny", action="store_true", help="toy widths (CI smoke run)")
    parser.add_argument("--ks", nargs="+", type=int, default=[2, 4])
    parser.add_argument("--repeats", type=int, default=20 if gpu else 9)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--device", default="cuda" if gpu else "cpu")
    parser.add_argument("--tag", default="")
    parser.add_argument("--out", default=str(Path(__file__).resolve().parent / "out"))
    args = parser.parse_args(argv)
    model_names = args.models or (list(models.TINY) if args.tiny else
                                  ["llama-1.1b", "mix500"] if gpu else ["llama-200m", "mix500"])
    device = torch.device(args.device)
    result = run(model_names, args.ks, device, args.repeats, args.warmup)
    report.save_json(result, args.out, "multi_update", args.tag or ("tiny" if args.tiny else ""),
                     table(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
