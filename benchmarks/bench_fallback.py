"""CPU benchmark of the ``foreach`` fallback: one EMA update of a LLaMA-shaped model.

Two cases, each timed on identical tensors in one run (shadows start as copies of
the weights; the weights do not change between updates):

* bf16 model, fp32 shadows: ema_fused ``EMA(model).update()`` with
  ``backend="foreach"``; timm ``ModelEmaV3(dtype=torch.float32)``; and a plain
  per-tensor loop ``s.lerp_(p.float(), w)``.
* fp32 model: ema_fused ``EMA``; ``torch._foreach_lerp_`` called directly on the
  tensor lists; timm ``ModelEmaV3``.

CPU timings are noisy, so providers run round-robin (the starting provider
rotates each round) after one warm-up round, and the median, p20 and p80 of the
``time.perf_counter`` times are reported.  GB/s counts the bytes one update must
move: 10 per element for a bf16 weight with an fp32 shadow (read 2 + 4, write 4)
and 12 for fp32.  "time / ema_fused" is a provider's median over ema_fused's
(above 1: ema_fused is faster).  The load average is recorded: other processes
on the same cores show up as noise.

Peak extra memory of one update (bytes allocated during it, beyond what existed
before) is measured twice: exactly, from the CPU allocator's allocation/free
events recorded by ``torch.profiler(profile_memory=True)`` (running sum in time
order; every tensor allocation on the CPU goes through that allocator); and as a
cross-check from the kernel's peak RSS (``VmHWM``, reset by writing 5 to
``/proc/self/clear_refs``), which is page-granular and also counts memory malloc
keeps after a free (reads high), or reads low when malloc reuses such memory.

    python benchmarks/bench_fallback.py --quick
    python benchmarks/bench_fallback.py --out benchmarks/results/
"""
from __future__ import annotations

import argparse
import contextlib
import ctypes
import datetime
import gc
import json
import os
import platform
import re
import subprocess
import sys
import time

import torch
from torch import nn

from ema_fused import EMA

DECAY = 0.999
MiB = 2**20
SIZES = {  # vocab, hidden, intermediate, layers
    "quick": (8000, 512, 1376, 2),       # ~14.5M parameters
    "default": (32000, 2048, 5632, 4),   # ~336M parameters (TinyLlama widths, 4 layers)
}


def _module(**children) -> nn.Module:
    m = nn.Module()
    for name, child in children.items():
        setattr(m, name, child)
    return m


def llama_shaped(vocab: int, hidden: int, inter: int, layers: int, dtype: torch.dtype) -> nn.Module:
    """Embedding, per-layer q/k/v/o and gate/up/down projections, RMSNorm weights, lm_head."""
    gen = torch.Generator().manual_seed(0)

    def linear(out_f, in_f):
        return _module(weight=nn.Parameter(
            torch.empty(out_f, in_f, dtype=dtype).normal_(0, 0.02, generator=gen)))

    def norm():
        return _module(weight=nn.Parameter(torch.ones(hidden, dtype=dtype)))

    blocks = nn.ModuleList(_module(
        input_layernorm=norm(),
        self_attn=_module(**{n: linear(hidden, hidden)
                             for n in ("q_proj", "k_proj", "v_proj", "o_proj")}),
        post_attention_layernorm=norm(),
        mlp=_module(gate_proj=linear(inter, hidden), up_proj=linear(inter, hidden),
                    down_proj=linear(hidden, inter)),
    ) for _ in range(layers))
    return _module(embed_tokens=linear(vocab, hidden), layers=blocks, norm=norm(),
                   lm_head=linear(vocab, hidden))


def providers(model: nn.Module) -> dict:
    """name -> zero-argument callable doing one EMA update of ``model``."""
    from timm.utils import ModelEmaV3
    params = [p.detach() for p in model.parameters()]
    w = 1.0 - DECAY
    ours = EMA(model, decay=DECAY, backend="foreach")
    timm_ema = ModelEmaV3(model, decay=DECAY, dtype=torch.float32)
    shadows = [p.float() if p.dtype != torch.float32 else p.clone() for p in params]
    out = {"ema_fused EMA (foreach)": ours.update,
           "timm ModelEmaV3 fp32": lambda: timm_ema.update(model)}
    if params[0].dtype == torch.float32:
        out["torch._foreach_lerp_"] = lambda: torch._foreach_lerp_(shadows, params, w)
    else:
        def loop():
            for s, p in zip(shadows, params):
                s.lerp_(p.float(), w)
        out["per-tensor lerp_ loop"] = loop
    return out


def time_round_robin(fns: dict, repeats: int, warmup: int = 1) -> dict:
    names = list(fns)
    times = {n: [] for n in names}
    gc.disable()
    try:
        for r in range(warmup + repeats):
            k = r % len(names)
            for n in names[k:] + names[:k]:
                t0 = time.perf_counter()
                fns[n]()
                dt = time.perf_counter() - t0
                if r >= warmup:
                    times[n].append(dt)
    finally:
        gc.enable()
    return times


def percentile(xs: list, q: float) -> float:
    xs = sorted(xs)
    pos = (len(xs) - 1) * q
    lo = int(pos)
    hi = min(lo + 1, len(xs) - 1)
    return xs[lo] + (xs[hi] - xs[lo]) * (pos - lo)


@contextlib.contextmanager
def _quiet_stderr():
    """Hide the profiler's C++ log lines (they go to file descriptor 2)."""
    saved, null = os.dup(2), os.open(os.devnull, os.O_WRONLY)
    os.dup2(null, 2)
    try:
        yield
    finally:
        try:
            ctypes.CDLL(None).fflush(None)
        except (OSError, AttributeError):
            pass
        os.dup2(saved, 2)
        os.close(saved)
        os.close(null)


def peak_extra_profiler(fn) -> int | None:
    """Peak of (bytes allocated - bytes freed) during ``fn()``, from profiler memory events."""
    from torch.profiler import ProfilerActivity, profile
    try:
        with _quiet_stderr(), profile(activities=[ProfilerActivity.CPU],
                                      profile_memory=True) as prof:
            fn()
        events = [(e.start_ns(), e.nbytes()) for e in prof.profiler.kineto_results.events()
                  if e.name() == "[memory]"]
    except Exception as exc:  # private API: report the failure instead of a number
        print(f"profiler memory measurement failed: {exc!r}", file=sys.stderr)
        return None
    peak = live = 0
    for _, nbytes in sorted(events):
        live += nbytes
        peak = max(peak, live)
    return peak


def _status_kib(key: str) -> int:
    with open("/proc/self/status") as f:
        return int(re.search(rf"{key}:\s+(\d+)", f.read()).group(1))


def peak_extra_rss(fn) -> int | None:
    """Peak RSS during ``fn()`` minus RSS before it (Linux only)."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")  # reset VmHWM to the current RSS
        before = _status_kib("VmRSS")
        fn()
        return (_status_kib("VmHWM") - before) * 1024
    except OSError:
        return None


def run_case(label: str, dtype: torch.dtype, size: tuple, repeats: int) -> dict:
    model = llama_shaped(*size, dtype=dtype)
    params = list(model.parameters())
    numel = sum(p.numel() for p in params)
    bytes_moved = numel * (10 if dtype == torch.bfloat16 else 12)
    bound = max(64 * MiB, max(p.numel() for p in params) * 4)
    fns = providers(model)
    times = time_round_robin(fns, repeats)
    rows = {}
    for name, fn in fns.items():
        ts = times[name]
        med = percentile(ts, 0.5)
        rows[name] = {
            "median_ms": med * 1e3, "p20_ms": percentile(ts, 0.2) * 1e3,
            "p80_ms": percentile(ts, 0.8) * 1e3, "gb_per_s": bytes_moved / med / 1e9,
            "times_ms": [t * 1e3 for t in ts],
            "peak_extra_bytes_profiler": peak_extra_profiler(fn),
            "peak_extra_bytes_rss": peak_extra_rss(fn),
        }
    return {"case": label, "params": numel, "tensors": len(params), "bytes_moved": bytes_moved,
            "largest_tensor_fp32_bytes": max(p.numel() for p in params) * 4,
            "memory_bound_bytes": bound, "providers": rows}


def machine_info() -> dict:
    try:
        commit = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True,
                                cwd=os.path.dirname(os.path.abspath(__file__)),
                                check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        commit = None
    cpu = platform.processor()
    try:
        with open("/proc/cpuinfo") as f:
            cpu = re.search(r"model name\s*:\s*(.*)", f.read()).group(1)
    except (OSError, AttributeError):
        pass
    return {"platform": platform.platform(), "cpu": cpu, "cpu_count": os.cpu_count(),
            "torch_threads": torch.get_num_threads(), "python": platform.python_version(),
            "torch": torch.__version__, "git_commit": commit, "load_avg_start": os.getloadavg(),
            "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")}


def markdown(cases: list) -> str:
    lines = ["| case | provider | median ms | p20-p80 ms | GB/s | time / ema_fused "
             "| peak extra MiB (profiler / RSS) |", "|---|---|---:|---:|---:|---:|---:|"]
    for c in cases:
        ours = c["providers"]["ema_fused EMA (foreach)"]["median_ms"]
        for name, r in c["providers"].items():
            mem = [r["peak_extra_bytes_profiler"], r["peak_extra_bytes_rss"]]
            mem = " / ".join("n/a" if m is None else f"{m / MiB:.1f}" for m in mem)
            lines.append(f"| {c['case']} | {name} | {r['median_ms']:.1f} | {r['p20_ms']:.1f}-"
                         f"{r['p80_ms']:.1f} | {r['gb_per_s']:.2f} | {r['median_ms'] / ours:.2f} "
                         f"| {mem} |")
    return "\n".join(lines)


def summary(cases: list) -> list:
    out = []
    for c, other in zip(cases, ("timm ModelEmaV3 fp32", "torch._foreach_lerp_")):
        p = c["providers"]
        ours, theirs = p["ema_fused EMA (foreach)"]["median_ms"], p[other]["median_ms"]
        out.append(f"{c['case']}: ema_fused {ours:.1f} ms vs {other} {theirs:.1f} ms "
                   f"(median of {len(p[other]['times_ms'])}) -> speed-up {theirs / ours:.2f}x")
    mem = cases[0]["providers"]["ema_fused EMA (foreach)"]["peak_extra_bytes_profiler"]
    bound = cases[0]["memory_bound_bytes"]
    if mem is not None:
        out.append(f"{cases[0]['case']}: ema_fused peak extra memory {mem / MiB:.1f} MiB, bound "
                   f"max(64 MiB, largest tensor in fp32) = {bound / MiB:.1f} MiB -> "
                   f"{'within' if mem <= bound else 'OVER'}")
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="small model (~15M parameters)")
    ap.add_argument("--repeats", type=int, default=7, help="timed updates per provider")
    ap.add_argument("--out", help="directory for a JSON file with the results")
    args = ap.parse_args(argv)
    size = SIZES["quick" if args.quick else "default"]
    config = dict(zip(("vocab", "hidden", "intermediate", "layers"), size), decay=DECAY,
                  repeats=args.repeats, warmup=1, quick=args.quick, device="cpu")
    info = machine_info()
    print(f"{info['cpu']} ({info['cpu_count']} CPUs, {info['torch_threads']} torch threads), "
          f"torch {info['torch']}; config {config}", flush=True)
    if info["load_avg_start"][0] > 0.5:
        print(f"note: load average {info['load_avg_start'][0]:.2f} before the run; other "
              "processes share these cores, so timings may be noisy", flush=True)
    cases = []
    for label, dtype in (("bf16 model, fp32 shadows", torch.bfloat16),
                         ("fp32 model", torch.float32)):
        t0 = time.perf_counter()
        cases.append(run_case(label, dtype, size, args.repeats))
        gc.collect()
        print(f"{label}: {cases[-1]['params'] / 1e6:.1f}M parameters in {cases[-1]['tensors']} "
              f"tensors, {time.perf_counter() - t0:.0f} s", flush=True)
    print("\n" + markdown(cases) + "\n")
    lines = summary(cases)
    info["load_avg_end"] = os.getloadavg()
    print("\n".join(lines))
    if args.out:
        os.makedirs(args.out, exist_ok=True)
        name = (f"fallback_cpu-{os.cpu_count()}core_{info['date'][:10]}"
                f"{'_quick' if args.quick else ''}.json")
        path = os.path.join(args.out, name)
        with open(path, "w") as f:
            json.dump({"machine": info, "config": config, "cases": cases, "summary": lines},
                      f, indent=1)
        print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
