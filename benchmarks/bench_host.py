"""Host cost of one ``EMA.update()``: CPU time per call on a model of ~500 small tensors.

On a GPU an update only queues kernels, so its cost to the training loop is the host
time it takes; for a model of many small tensors that is what bounds it.  This times
``ema.update()`` per usable ema_fused backend on the built-in ``mix500-tiny`` model
(505 tensors, toy widths, so the kernels themselves cost little), plus, as a floor, one
direct ``torch._foreach_lerp_`` call on the same fp32 lists.  With the C++ extension
loaded, each backend is also timed with the extension's plan check switched off
("python check"), to show what it saves.

CPU time is ``time.process_time`` (all threads of this process) over a batch of calls,
divided by the batch size; on a GPU each batch ends with a synchronize (outside the
timed region).  Median and p20/p80 over rounds.  On a CPU the kernel work is part of
the time (small here).

    python benchmarks/bench_host.py                    # whatever device is present
    python benchmarks/bench_host.py --out benchmarks/results/
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import sys
import time
from pathlib import Path

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch

from ema_fused import EMA
from ema_fused.ema import host_path as _host_path
from ema_fused.backends import extension as _extension
from benchmarks.common import models, providers, report
from benchmarks.common.timing import percentile

MODEL = "250 x Linear(8, 8)"


def _model(dtype: torch.dtype, device: torch.device) -> torch.nn.Module:
    torch.manual_seed(0)
    layers = [torch.nn.Linear(8, 8) for _ in range(250)]
    return torch.nn.Sequential(*layers).to(device, dtype)


def _time_cpu(fn, device: torch.device, rounds: int, batch: int) -> list[float]:
    """CPU microseconds per call, one figure per round."""
    out = []
    for _ in range(rounds):
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        t0 = time.process_time()
        for _ in range(batch):
            fn()
        out.append((time.process_time() - t0) / batch * 1e6)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return out


def cases(device: torch.device, dtype: torch.dtype):
    """(label, zero-argument update, note) per case."""
    found, _ = providers.discover(device)  # not Triton's interpreter on a CPU
    usable = [p.name[len("ema_fused["):-1] for p in found if p.kind == "ema_fused"]
    has_snapshot = _extension.load(build=False)
    for name in usable:
        for check in (["snapshot", "python check"] if has_snapshot else ["python check"]):
            model = _model(dtype, device)
            if check == "python check":
                real = _host_path.snapshot
                _host_path.snapshot = lambda *args: None
            try:
                ema = EMA(model, decay=0.999, backend=name)
                ema.update()  # builds the plan
            finally:
                if check == "python check":
                    _host_path.snapshot = real
            yield f"ema_fused[{name}], {check}", ema.update, f"{len(ema._shadows)} tensors"
    model = _model(torch.float32, device)
    params = [p.detach() for p in model.parameters()]
    shadows = [p.clone() for p in params]
    yield "torch._foreach_lerp_ (fp32 lists)", lambda: torch._foreach_lerp_(shadows, params, 1e-3), \
        f"{len(params)} tensors"


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--dtype", default="bf16", choices=sorted(models.DTYPES),
                    help="param dtype (shadows are fp32)")
    ap.add_argument("--rounds", type=int, default=15)
    ap.add_argument("--batch", type=int, default=200)
    ap.add_argument("--out", help="folder for host_<device>_<date>.json (default: print only)")
    args = ap.parse_args(argv)
    device = torch.device(args.device)
    dtype = models.DTYPES[args.dtype]
    info = report.machine_info(device)
    print(f"host cost of ema.update() on {info['device_name']}, {MODEL} {args.dtype} params, "
          f"{args.rounds} rounds x {args.batch} calls")
    rows = []
    for label, fn, note in cases(device, dtype):
        for _ in range(20):
            fn()  # warm-up (compiles, tables)
        us = _time_cpu(fn, device, args.rounds, args.batch)
        rows.append({"case": label, "note": note, "median_us": percentile(us, 0.5),
                     "p20_us": percentile(us, 0.2), "p80_us": percentile(us, 0.8)})
        print(f"  {label:44s} {rows[-1]['median_us']:9.1f} us CPU/call "
              f"(p20-p80 {rows[-1]['p20_us']:.1f}-{rows[-1]['p80_us']:.1f})  {note}")
    lines = ["| case | CPU us/call (median) | p20-p80 |", "|---|---:|---:|"]
    lines += [f"| {r['case']} | {r['median_us']:.1f} | {r['p20_us']:.1f}-{r['p80_us']:.1f} |"
              for r in rows]
    print("\n".join(lines))
    if args.out:
        os.makedirs(args.out, exist_ok=True)
        date = datetime.date.today().isoformat()
        path = Path(args.out) / f"host_{info['device_slug']}_{date}.json"
        path.write_text(json.dumps({"machine": info, "model": MODEL, "dtype": args.dtype,
                                    "rounds": args.rounds, "batch": args.batch,
                                    "extension": _extension.loaded(), "rows": rows}, indent=1))
        print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
