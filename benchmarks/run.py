"""The ema_fused benchmark suite: one EMA update of built-in models, every provider, one run.

    python benchmarks/run.py --quick --out DIR     # 194M + 69M-parameter models, minutes on a CPU
    python benchmarks/run.py --out DIR             # + 1.1B and 7B (where memory allows)
    python benchmarks/run.py --models llama-tiny mix500-tiny --dtypes bf16 --repeats 2

For each model (``models.py``) and param dtype (bf16, fp16, fp32; shadows fp32) it
times every provider (``providers.py``) on the same tensors and reports the median
and 20th/80th percentile time, GB/s from the bytes an update must move (10 per
element for a bf16/fp16 param with an fp32 shadow, 12 for fp32, 6 for peers that
keep bf16/fp16 shadows), the fraction of the measured copy bandwidth, ema_fused's
speed-up against each peer, CPU time per call, extra peak memory, and on a GPU the
kernel launches per update and whether it synchronized with the host
(``timing.py`` says how).  Writes ``bench_<device>_<date>[_tag].{json,md,png}``.

Memory: when every provider's state fits beside the model they run round-robin;
otherwise one provider at a time, freed after it, and a provider (or a whole case)
that would not fit in free memory is skipped with the estimate.
"""
from __future__ import annotations

import argparse
import math
import os
import sys
import time
from pathlib import Path

if __package__ in (None, ""):  # run as a script: make the `benchmarks` package importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch

from benchmarks.common import models, providers, report, timing

GiB = 2**30
DECAY = 0.999
MAX_COPIES = 8
MEMORY_SHARE = 0.85  # of the free memory a case may plan to use (allocator slack, fragmentation)


def _log(msg: str) -> None:
    print(msg, flush=True)


def _dot(_round: int) -> None:
    print(".", end="", flush=True)


def plan(usable: list, spec: models.ModelSpec, dtype: torch.dtype, copies: int,
         free: int) -> tuple[str, list, dict]:
    """``(schedule, providers that fit, {name: why skipped})`` for one case."""
    budget = free * MEMORY_SHARE
    model_bytes = copies * spec.numel * torch.empty((), dtype=dtype).element_size()
    need = {p.name: copies * p.memory_estimate(spec.numel, spec.largest, dtype) for p in usable}
    if model_bytes + sum(need.values()) <= budget:
        return "round-robin", list(usable), {}
    fits, skipped = [], {}
    for p in usable:
        if model_bytes + need[p.name] <= budget:
            fits.append(p)
        else:
            skipped[p.name] = (f"needs about {(model_bytes + need[p.name]) / GiB:.1f} GiB with the "
                               f"model; {free / GiB:.1f} GiB free")
    return "one at a time", fits, skipped


def _make(p, model_copies: list, decay: float):
    """The provider's update per model copy, each called once (its first call may only copy)."""
    fns = [p.make(m, decay) for m in model_copies]
    for fn in fns:
        fn()
    return fns


def _figures(p, samples: timing.Samples, numel: int, dtype: torch.dtype) -> dict:
    med = timing.percentile(samples.times_ms, 0.5)
    moved = p.bytes_moved(numel, dtype)
    shadow = p.shadow_dtype(dtype)
    return {
        "kind": p.kind,
        "shadow_dtype": None if shadow is None else str(shadow).replace("torch.", ""),
        "bytes_moved": moved, "median_ms": med,
        "p20_ms": timing.percentile(samples.times_ms, 0.2),
        "p80_ms": timing.percentile(samples.times_ms, 0.8),
        "gb_per_s": moved / (med * 1e-3) / 1e9 if med > 0 else None,
        "cpu_ms": timing.percentile(samples.cpu_ms, 0.5),
        "host_ms": timing.percentile(samples.host_ms, 0.5),
        "times_ms": samples.times_ms,
    }


def _measure_extras(fn, device: torch.device) -> dict:
    out = {}
    # host_sync last: a sync error aborts that update part-way.
    for key, measure in (("peak_extra_bytes", timing.peak_extra_bytes),
                         ("launches", timing.device_launches), ("host_sync", timing.host_sync)):
        try:
            out[key] = measure(fn, device)
        except Exception as exc:  # a figure that cannot be had is reported as missing
            _log(f"    ({key} failed: {type(exc).__name__}: {exc})")
            out[key] = None
    return out


def run_case(spec: models.ModelSpec, dtype_name: str, device: torch.device, usable: list,
             repeats: int, warmup: int, decay: float = DECAY, max_copies: int = MAX_COPIES) -> dict:
    """Time every usable provider on one model in one param dtype."""
    dtype = models.DTYPES[dtype_name]
    layout_bytes = spec.numel * (dtype.itemsize + 8)
    copies = min(max_copies, max(1, math.ceil(2 * timing.cache_bytes(device) / layout_bytes)))
    schedule, fits, skipped = plan(usable, spec, dtype, copies, timing.free_bytes(device))
    case = {"model": spec.name, "description": spec.description, "dtype": dtype_name,
            "params": spec.numel, "tensors": spec.tensors, "largest_tensor": spec.largest,
            "input_copies": copies, "schedule": schedule, "results": {}, "skipped": skipped}
    _log(f"  {spec.numel / 1e6:.1f}M params in {spec.tensors} tensors, {copies} input "
         f"cop{'y' if copies == 1 else 'ies'}, {len(fits)} providers {schedule}")
    if not fits:
        return case
    model_copies = [models.build(spec, dtype, device) for _ in range(copies)]
    groups = [fits] if schedule == "round-robin" else [[p] for p in fits]
    for group in groups:
        fns = {}
        for p in group:
            try:
                fns[p.name] = _make(p, model_copies, decay)
            except Exception as exc:  # a peer's API drift must not end the run
                case["skipped"][p.name] = f"failed: {type(exc).__name__}: {exc}"
                _log(f"    {p.name}: FAILED ({type(exc).__name__}: {exc})")
        if not fns:
            continue
        samples = _time(fns, device, repeats, warmup, case["skipped"])
        for p in group:
            if p.name not in samples:
                continue
            row = _figures(p, samples[p.name], spec.numel, dtype)
            row.update(_measure_extras(fns[p.name][0], device))
            case["results"][p.name] = row
            _log(f"    {p.name:<22} {row['median_ms']:9.3f} ms  "
                 f"(p20-p80 {row['p20_ms']:.3f}-{row['p80_ms']:.3f})  "
                 f"{row['gb_per_s'] or 0:7.1f} GB/s")
        del fns, samples
        timing.release(device)
    del model_copies
    timing.release(device)
    _derive(case)
    return case


def _time(fns: dict, device: torch.device, repeats: int, warmup: int, skipped: dict) -> dict:
    """Round-robin timing; if that fails (e.g. out of memory), each provider alone."""
    print(f"    timing {', '.join(fns) if len(fns) == 1 else f'{len(fns)} providers'}, "
          f"{warmup} + {repeats} rounds ", end="", flush=True)
    try:
        samples = timing.round_robin(fns, device, repeats, warmup, _dot)
    except Exception as exc:
        print(f" failed: {type(exc).__name__}: {exc}", flush=True)
        if len(fns) == 1:
            skipped.update({n: f"failed while timed: {type(exc).__name__}: {exc}" for n in fns})
            return {}
        timing.release(device)
        samples = {}
        for name, fn in fns.items():
            samples.update(_time({name: fn}, device, repeats, warmup, skipped))
        return samples
    print(flush=True)
    return samples


def _derive(case: dict) -> None:
    """Fraction of the copy bandwidth per provider, and each ema_fused backend's speed-ups."""
    res = case["results"]
    copy = res.get(providers.COPY.name)
    for row in res.values():
        row["frac_of_copy"] = (row["gb_per_s"] / copy["gb_per_s"]
                               if copy and copy["gb_per_s"] and row["gb_per_s"] else None)
    ours = {n: r for n, r in res.items() if r["kind"] == "ema_fused"}
    peers = {n: r for n, r in res.items() if r["kind"] == "peer"}
    case["speedup"] = {o: {n: r["median_ms"] / ro["median_ms"] for n, r in peers.items()}
                       for o, ro in ours.items()}


def parse_args(argv):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true",
                    help=f"only {', '.join(models.QUICK)} (minutes on a 2-core CPU)")
    ap.add_argument("--out", default=str(Path(__file__).resolve().parent / "out"),
                    help="folder for the JSON, table and plot (default: benchmarks/out)")
    ap.add_argument("--models", nargs="+", choices=sorted(models.SPECS),
                    help=f"default: {' '.join(models.FULL)} "
                    f"({' '.join(models.QUICK)} with --quick)")
    ap.add_argument("--dtypes", nargs="+", choices=sorted(models.DTYPES),
                    default=["bf16", "fp16", "fp32"], help="param dtypes (shadows are fp32)")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--repeats", type=int,
                    help="timed rounds (default: 20 on a GPU, 11 on the CPU)")
    ap.add_argument("--warmup", type=int, default=3,
                    help="untimed rounds after each provider's first update")
    ap.add_argument("--decay", type=float, default=DECAY)
    ap.add_argument("--max-copies", type=int, default=MAX_COPIES,
                    help="most input copies a small model is rotated through (cache flushing)")
    ap.add_argument("--tag", help="added to the file names (default: 'quick' with --quick)")
    return ap.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    device = torch.device(args.device)
    if device.type == "cuda":
        if not torch.cuda.is_available():
            _log("error: --device cuda but torch.cuda.is_available() is False")
            return 2
        if device.index is None:
            device = torch.device("cuda", torch.cuda.current_device())
        torch.cuda.set_device(device)
    gpu = device.type == "cuda"
    names = args.models or list(models.QUICK if args.quick else models.FULL)
    repeats = args.repeats or (20 if gpu else 11)
    warmup = args.warmup
    usable, skipped = providers.discover(device)
    machine = report.machine_info(device)
    config = {"models": names, "dtypes": args.dtypes, "device": str(device), "quick": args.quick,
              "repeats": repeats, "warmup": warmup, "decay": args.decay,
              "timer": "CUDA events" if gpu else "time.perf_counter",
              "cache_bytes": timing.cache_bytes(device), "max_input_copies": args.max_copies,
              "shadow_dtype": "float32"}
    _log(f"ema_fused benchmark on {machine['device_name']} | torch {machine['torch']} | "
         f"{len(names)} models x {len(args.dtypes)} dtypes, {repeats} timed rounds after "
         f"{warmup} warm-up")
    _log("providers: " + ", ".join(p.name for p in usable))
    if machine["load_avg_start"][0] > 0.5:
        _log(f"note: load average {machine['load_avg_start'][0]:.2f} before the run: other "
             "processes share the machine, so timings may be noisy")
    for name, why in skipped.items():
        _log(f"skipped: {name}: {why}")
    cases, t_start = [], time.perf_counter()
    total = len(names) * len(args.dtypes)
    for i, (name, dtype_name) in enumerate(((m, d) for m in names for d in args.dtypes), 1):
        t0 = time.perf_counter()
        _log(f"[{i}/{total}] {name}, {dtype_name} params ...")
        cases.append(run_case(models.SPECS[name], dtype_name, device, usable, repeats, warmup,
                              args.decay, args.max_copies))
        _log(f"  done in {time.perf_counter() - t0:.0f} s "
             f"(elapsed {time.perf_counter() - t_start:.0f} s)")
    machine["load_avg_end"] = os.getloadavg()
    result = {"schema": report.SCHEMA, "machine": machine, "config": config,
              "providers": {p.name: {"kind": p.kind, "about": p.about} for p in usable},
              "skipped_providers": skipped, "cases": cases,
              "elapsed_s": time.perf_counter() - t_start}
    tag = args.tag if args.tag is not None else ("quick" if args.quick else "")
    paths = report.write(result, args.out, tag)
    print("\n" + paths["table"])
    for kind in ("json", "md", "png"):
        if paths.get(kind):
            _log(f"wrote {paths[kind]}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
