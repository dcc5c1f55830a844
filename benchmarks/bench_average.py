"""CPU benchmark of ``average_checkpoints``: k bf16 checkpoints of a LLaMA-shaped model,
against the usual loop (load every checkpoint, sum per tensor in the checkpoint's dtype).

Each run is a fresh subprocess, so its peak RSS (``VmHWM``, reset by writing 5 to
``/proc/self/clear_refs`` after the imports) is the averaging's own: it counts the
memory-mapped pages of a source once they are touched, and the anonymous memory of the
output.  Runs alternate between the two providers; the median, min and max of the wall
times are reported.  The files are written just before, so they are in the page cache:
this measures the averaging, not the disk.  The max error against a float64 average of
the same checkpoints is reported for both.

    python benchmarks/bench_average.py --quick
    python benchmarks/bench_average.py --out benchmarks/results/
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import statistics
import subprocess
import sys
import tempfile
import textwrap

import torch

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(HERE))
from benchmarks.common.report import machine_info  # noqa: E402

MiB = 2 ** 20
#: vocab, hidden, mlp, layers
SIZES = {"quick": (4000, 512, 1376, 2), "default": (32000, 1024, 2816, 8)}

CHILD = textwrap.dedent("""
    import json, sys, time, torch, ema_fused
    how, out, paths = sys.argv[1], sys.argv[2], sys.argv[3:]
    def status(key):
        for line in open("/proc/self/status"):
            if line.startswith(key):
                return int(line.split()[1]) * 1024
    ema_fused.average_checkpoints([{"w": torch.ones(3)}] * 2)  # imports, backend choice
    open("/proc/self/clear_refs", "w").write("5")
    base = status("VmRSS:")
    start = time.perf_counter()
    if how == "ema_fused":
        avg = ema_fused.average_checkpoints(paths)
    else:  # the usual loop: all loaded, summed in the checkpoints' dtype
        states = [torch.load(p, weights_only=True) for p in paths]
        avg = {n: sum(s[n] for s in states) / len(states) for n in states[0]}
    seconds = time.perf_counter() - start
    peak = status("VmHWM:") - base
    exact = {n: sum(torch.load(p, mmap=True, weights_only=True)[n].double() for p in paths)
             / len(paths) for n in avg}
    err = max(float((avg[n].double() - exact[n]).abs().max()) for n in avg)
    json.dump({"seconds": seconds, "peak_bytes": peak, "max_abs_error": err}, open(out, "w"))
""")


def llama_state(vocab: int, hidden: int, mlp: int, layers: int, gen) -> dict:
    shapes = {"embed.weight": (vocab, hidden), "norm.weight": (hidden,),
              "head.weight": (vocab, hidden)}
    for i in range(layers):
        for n in ("q", "k", "v", "o"):
            shapes[f"layers.{i}.attn.{n}.weight"] = (hidden, hidden)
        shapes[f"layers.{i}.mlp.gate.weight"] = (mlp, hidden)
        shapes[f"layers.{i}.mlp.up.weight"] = (mlp, hidden)
        shapes[f"layers.{i}.mlp.down.weight"] = (hidden, mlp)
        shapes[f"layers.{i}.norm.weight"] = (hidden,)
    return {n: torch.randn(s, generator=gen).to(torch.bfloat16) for n, s in shapes.items()}


def run_once(how: str, paths: list[str], work: str) -> dict:
    out = os.path.join(work, f"{how}.json")
    subprocess.run([sys.executable, "-c", CHILD, how, out, *paths], check=True, timeout=1800)
    with open(out) as f:
        return json.load(f)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="a ~10M-parameter model")
    ap.add_argument("-k", type=int, default=7, help="checkpoints averaged (default 7)")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--out", default=None, help="folder for the JSON (default: print only)")
    args = ap.parse_args(argv)
    size = SIZES["quick" if args.quick else "default"]
    gen = torch.Generator().manual_seed(0)
    result = {"benchmark": "average_checkpoints", "machine": machine_info(torch.device("cpu")),
              "config": {"k": args.k, "dtype": "bfloat16", "repeats": args.repeats,
                         "model": dict(zip(("vocab", "hidden", "mlp", "layers"), size))}}
    with tempfile.TemporaryDirectory() as work:
        paths = []
        for j in range(args.k):
            state = llama_state(*size, gen)
            paths.append(os.path.join(work, f"ckpt{j}.pt"))
            torch.save(state, paths[-1])
        params = sum(t.numel() for t in state.values())
        result["config"].update(parameters=params, source_bytes=os.path.getsize(paths[0]),
                                output_bytes=4 * params)
        runs: dict[str, list] = {"ema_fused": [], "naive_loop": []}
        for r in range(args.repeats):
            order = list(runs) if r % 2 == 0 else list(runs)[::-1]
            for how in order:
                runs[how].append(run_once(how, paths, work))
    result["results"] = {}
    for how, rs in runs.items():
        times = [x["seconds"] for x in rs]
        result["results"][how] = {
            "median_s": statistics.median(times), "min_s": min(times), "max_s": max(times),
            "peak_rss_MiB": statistics.median(x["peak_bytes"] for x in rs) / MiB,
            "max_abs_error_vs_float64": rs[0]["max_abs_error"]}
    cfg = result["config"]
    print(f"k={args.k}, {cfg['parameters'] / 1e6:.1f}M bf16 parameters, source "
          f"{cfg['source_bytes'] / MiB:.0f} MiB, fp32 output {cfg['output_bytes'] / MiB:.0f} MiB")
    for how, r in result["results"].items():
        print(f"  {how:<11} {r['median_s']:.2f} s (min {r['min_s']:.2f}, max {r['max_s']:.2f}), "
              f"peak RSS {r['peak_rss_MiB']:.0f} MiB, "
              f"max error {r['max_abs_error_vs_float64']:.3g}")
    if args.out:
        os.makedirs(args.out, exist_ok=True)
        day = datetime.date.today().isoformat()
        path = os.path.join(args.out, f"average_{result['machine']['device_slug']}_{day}.json")
        with open(path, "w") as f:
            json.dump(result, f, indent=1)
        print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
