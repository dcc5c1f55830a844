"""CPU benchmark of ``average_checkpoints``: k bf16 checkpoints of a LLaMA-shaped model, as
``torch.save`` files and as DCP checkpoint directories, averaged into a dict or streamed
(``out=``) into a safetensors file or a DCP directory, against the load-everything loop
(every checkpoint loaded, then summed per tensor in the checkpoint's dtype).

Each run is a fresh subprocess, so its peak RSS (``VmHWM``, reset by writing 5 to
``/proc/self/clear_refs`` after the imports) is the averaging's own: it counts the
memory-mapped pages of a source once they are touched and the anonymous memory of the
output.  ``MALLOC_MMAP_THRESHOLD_`` is fixed in the children, so that glibc maps every
large block and unmaps it when freed (its dynamic threshold would keep blocks of up to
32 MiB in the heap, unseen by the next measurement).  Runs of all cases alternate; the
median, min and max wall times are reported, and GB/s of source tensors read (k x the
checkpoint's bytes / median time).  The files are written just before, so they are in
the page cache: this measures the averaging, not the disk, but an ``out=`` file is
fsynced.  The DCP checkpoints are saved by one process (one chunk per tensor: the
largest chunk DCP reads).  The max error against a float64 average is reported.

    python benchmarks/bench_average.py --quick
    python benchmarks/bench_average.py --ks 5 7 --out benchmarks/results/
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
import warnings

import torch

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(HERE))
from benchmarks.common.report import machine_info  # noqa: E402

MiB = 2 ** 20
#: vocab, hidden, mlp, layers
SIZES = {"tiny": (256, 64, 176, 1), "quick": (4000, 512, 1376, 2),
         "default": (32000, 1024, 2816, 8)}
#: case -> (sources, output)
CASES = {"loop, torch.save files": ("torch", "loop"), "loop, DCP dirs": ("dcp", "loop"),
         "ema_fused, torch.save -> dict": ("torch", "dict"),
         "ema_fused, torch.save -> safetensors": ("torch", "safetensors"),
         "ema_fused, DCP -> safetensors": ("dcp", "safetensors"),
         "ema_fused, DCP -> DCP dir": ("dcp", "dcp")}

CHILD = textwrap.dedent("""
    import json, os, shutil, sys, time, warnings, torch, ema_fused
    import torch.distributed.checkpoint as dcp
    warnings.filterwarnings("ignore", message=".*assuming the intent is to")
    output, check, out_json, work = sys.argv[1:5]
    paths = sys.argv[5:]
    def status(key):
        for line in open("/proc/self/status"):
            if line.startswith(key):
                return int(line.split()[1]) * 1024
    tiny = os.path.join(work, "tiny")
    if not os.path.exists(tiny):
        dcp.save({"w": torch.ones(3)}, checkpoint_id=tiny, no_dist=True)
    ema_fused.average_checkpoints([tiny, tiny], out=os.path.join(work, "tiny.safetensors"))
    target = {"safetensors": os.path.join(work, "avg.safetensors"),
              "dcp": os.path.join(work, "avg_dcp")}.get(output)
    shutil.rmtree(os.path.join(work, "avg_dcp"), ignore_errors=True)
    open("/proc/self/clear_refs", "w").write("5")
    base = status("VmRSS:")
    start = time.perf_counter()
    def load_all(p, mmap=False):
        if os.path.isdir(p):
            meta = dcp.FileSystemReader(p).read_metadata().state_dict_metadata
            sd = {n: torch.empty(m.size, dtype=m.properties.dtype) for n, m in meta.items()}
            dcp.load(sd, checkpoint_id=p, no_dist=True)
            return sd
        return torch.load(p, mmap=mmap, weights_only=True)
    if output == "loop":  # the usual loop: all loaded, summed in the checkpoints' dtype
        states = [load_all(p) for p in paths]
        avg = {n: sum(s[n] for s in states) / len(states) for n in states[0]}
        del states
    else:
        avg = ema_fused.average_checkpoints(paths, out=target)
    seconds = time.perf_counter() - start
    peak = status("VmHWM:") - base
    if check != "check":
        json.dump({"seconds": seconds, "peak_bytes": peak, "max_abs_error": None},
                  open(out_json, "w"))
        sys.exit()
    if avg is None:  # read back what was written
        avg = ema_fused.average_checkpoints([target])
    exact = {}
    for p in paths:  # the float64 reference, one source at a time
        for n, t in load_all(p, mmap=True).items():
            exact[n] = exact[n] + t.double() if n in exact else t.double()
    err = max(float((avg[n].double() - exact[n] / len(paths)).abs().max()) for n in exact)
    json.dump({"seconds": seconds, "peak_bytes": peak, "max_abs_error": err}, open(out_json, "w"))
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


def run_once(output: str, paths: list[str], work: str, check: bool) -> dict:
    out = os.path.join(work, "run.json")
    env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": str(1 << 17)}
    subprocess.run([sys.executable, "-c", CHILD, output, "check" if check else "time", out,
                    work, *paths], check=True, timeout=1800, env=env)
    with open(out) as f:
        return json.load(f)


def bench_k(k: int, size, repeats: int, work: str, gen, cases: list[str]) -> dict:
    """Every case on k fresh checkpoints (written as both kinds), runs alternating."""
    import torch.distributed.checkpoint as dcp
    files, dirs = [], []
    for j in range(k):
        state = llama_state(*size, gen)
        files.append(os.path.join(work, f"ckpt{j}.pt"))
        dirs.append(os.path.join(work, f"dcp{j}"))
        torch.save(state, files[-1])
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=".*assuming the intent is to")
            dcp.save(state, checkpoint_id=dirs[-1], no_dist=True)
    params = sum(t.numel() for t in state.values())
    largest = max(t.numel() for t in state.values())
    runs: dict[str, list] = {c: [] for c in cases}
    for r in range(repeats):  # the error against float64 is taken on the first run
        for case in (cases if r % 2 == 0 else cases[::-1]):
            kind, output = CASES[case]
            runs[case].append(run_once(output, files if kind == "torch" else dirs, work, r == 0))
    read = k * 2 * params  # bf16 bytes of the sources' tensors
    out = {"k": k, "parameters": params, "source_bytes_read": read,
           "largest_fp32_tensor_MiB": 4 * largest / MiB, "output_fp32_MiB": 4 * params / MiB,
           "cases": {}}
    for case, rs in runs.items():
        times = [x["seconds"] for x in rs]
        med = statistics.median(times)
        out["cases"][case] = {
            "median_s": med, "min_s": min(times), "max_s": max(times),
            "GB_per_s_of_sources": read / med / 1e9,
            "peak_rss_MiB": statistics.median(x["peak_bytes"] for x in rs) / MiB,
            "max_abs_error_vs_float64": rs[0]["max_abs_error"]}
    for f in files:
        os.remove(f)
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--size", choices=list(SIZES), default="default",
                    help="tiny, quick (~10M parameters) or default (168M)")
    ap.add_argument("--quick", action="store_true", help="same as --size quick")
    ap.add_argument("--ks", type=int, nargs="+", default=[5, 7], help="checkpoints averaged")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--out", default=None, help="folder for the JSON (default: print only)")
    ap.add_argument("--tag", default="", help="appended to the JSON's name")
    ap.add_argument("--cases", nargs="+", choices=list(CASES), default=list(CASES),
                    metavar="CASE", help=f"cases to run (default: all of {list(CASES)})")
    args = ap.parse_args(argv)
    size = SIZES["quick" if args.quick else args.size]
    gen = torch.Generator().manual_seed(0)
    result = {"benchmark": "average_checkpoints", "machine": machine_info(torch.device("cpu")),
              "config": {"ks": args.ks, "dtype": "bfloat16", "repeats": args.repeats,
                         "malloc_mmap_threshold": 1 << 17,
                         "model": dict(zip(("vocab", "hidden", "mlp", "layers"), size))},
              "results": []}
    for k in args.ks:
        with tempfile.TemporaryDirectory() as work:
            result["results"].append(bench_k(k, size, args.repeats, work, gen, args.cases))
    result["load_avg_end"] = os.getloadavg()
    for res in result["results"]:
        print(f"k={res['k']}, {res['parameters'] / 1e6:.1f}M bf16 parameters, "
              f"{res['source_bytes_read'] / 1e9:.2f} GB of sources, largest fp32 tensor "
              f"{res['largest_fp32_tensor_MiB']:.0f} MiB, fp32 output "
              f"{res['output_fp32_MiB']:.0f} MiB")
        for case, r in res["cases"].items():
            print(f"  {case:<38} {r['median_s']:6.2f} s (min {r['min_s']:.2f}, max "
                  f"{r['max_s']:.2f}), {r['GB_per_s_of_sources']:.2f} GB/s, peak RSS "
                  f"{r['peak_rss_MiB']:6.0f} MiB, max error {r['max_abs_error_vs_float64']:.3g}")
    if args.out:
        os.makedirs(args.out, exist_ok=True)
        day = datetime.date.today().isoformat()
        tag = f"_{args.tag}" if args.tag else ""
        path = os.path.join(args.out,
                            f"average_{result['machine']['device_slug']}_{day}{tag}.json")
        with open(path, "w") as f:
            json.dump(result, f, indent=1)
        print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
