"""The offloaded EMA (``EMA(device="cpu", non_blocking=True)``, issue 23) against the
synchronous offload and the peers' offloads, on the LLaMA-shaped 200M bf16 model.

CPU (params on the host too; what this machine can measure): for each case, the time
the calling thread spends inside ``update()`` and the background time per update (the
worker's own clock), medians over interleaved rounds.  Between two updates the previous
background update is waited for outside the timed region, as a training step longer
than the update would.  Cases: ``device="cpu"`` synchronous (``non_blocking=False``: the
fused kernel on the calling thread), ``non_blocking=True`` (the calling thread copies
the bf16 params into the staging, 6 bytes an element with the write-allocate read, 4
with the streaming stores used; the fused update moves 10), timm
``ModelEmaV3(device="cpu", dtype=torch.float32)`` (its docs' offload, with fp32 shadows
like ours) and diffusers ``EMAModel``
kept on the host as its training scripts do with ``--offload_ema`` (``foreach=True``;
``pin_memory()`` and the ``.to("cuda")`` / ``.to("cpu")`` moves around ``step()`` need a
GPU, so on a CPU only the host step remains; its shadows keep the model's dtype).  Also
measured: how much Python the calling thread runs while a background update is in
flight, as a fraction of its idle rate (the GIL is released by the kernels).

GPU (``--device cuda``; not measured on the project's CPU machines): a synthetic training
loop (matmuls sized so that a step outlasts the offload pipeline) on the 1.1B bf16
model: step time with no EMA, with the offloaded EMA attached (stream wait before the
optimizer step), with a plain ``update()`` after the step (stream wait at its end), host
time inside ``update()``, and the EMA's GPU memory.

The machine may be shared: the load average is recorded at the start and the end;
compare ratios within one run only.

    python benchmarks/bench_offload.py --out benchmarks/results/
"""
from __future__ import annotations

import argparse
import gc
import json
import os
import statistics
import sys
import threading
import time
from pathlib import Path

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch

from ema_fused import EMA
from benchmarks.common import models, report
from benchmarks.common.timing import percentile

DECAY = 0.999
GOAL = 0.6  # the calling thread's time over the synchronous update's, on llama-200m (CPU)
SYNC, OURS = "ema_fused device=cpu (sync)", "ema_fused device=cpu non_blocking=True"


def _stats(xs: list) -> dict:
    return {"median_ms": statistics.median(xs), "p20_ms": percentile(xs, 0.2),
            "p80_ms": percentile(xs, 0.8), "n": len(xs)}


def _nudge(params: list) -> None:
    """A stand-in for an optimizer step: every param changes in place."""
    with torch.no_grad():
        torch._foreach_mul_(params, 1.0001)


def _ours(model, non_blocking: bool):
    ema = EMA(model, decay=DECAY, device="cpu", non_blocking=non_blocking)

    def update():
        ema.update()

    def background() -> float:
        ema.wait()
        return ema._offload.last_seconds * 1e3 if non_blocking else 0.0
    return update, background


def _timm(model):
    from timm.utils import ModelEmaV3
    ema = ModelEmaV3(model, decay=DECAY, device="cpu", dtype=torch.float32)  # fp32 like ours
    return (lambda: ema.update(model)), (lambda: 0.0)


def _diffusers(model):
    from diffusers.training_utils import EMAModel
    params = list(model.parameters())
    ema = EMAModel(params, decay=DECAY, foreach=True)
    if torch.cuda.is_available():
        ema.pin_memory()
    return (lambda: ema.step(params)), (lambda: 0.0)


def cpu_cases(model) -> dict:
    cases = {SYNC: _ours(model, False), OURS: _ours(model, True)}
    for name, make in (("timm ModelEmaV3(device=cpu, fp32)", _timm),
                       ("diffusers EMAModel (offload_ema, foreach)", _diffusers)):
        try:
            cases[name] = make(model)
        except ImportError as exc:
            print(f"skipping {name}: {exc}", file=sys.stderr)
    return cases


def gil_share(model) -> float:
    """Python iterations per second on the calling thread while a background update runs,
    over the idle rate."""
    ema = EMA(model, decay=DECAY, device="cpu", non_blocking=True)
    ema.update()
    ema.wait()

    def spin(until) -> tuple[int, float]:
        n, t0 = 0, time.perf_counter()
        while not until():
            n += 1
        return n, time.perf_counter() - t0

    idle, busy = [], []
    for _ in range(3):  # interleaved: the machine's load moves both alike
        window = threading.Event()  # the same predicate as below: an Event's is_set
        threading.Timer(0.1, window.set).start()
        n, dt = spin(window.is_set)
        idle.append(n / dt)
        ema.update()
        n, dt = spin(ema._offload._job.done.is_set)
        busy.append(n / max(dt, 1e-9))
        ema.wait()
    return statistics.median(busy) / statistics.median(idle)


def run_cpu(model_name: str, rounds: int, warmup: int) -> dict:
    spec = models.SPECS[model_name]
    model = models.build(spec, torch.bfloat16, "cpu")
    params = list(model.parameters())
    cases = cpu_cases(model)
    calling = {name: [] for name in cases}
    background = {name: [] for name in cases}
    gc.disable()
    try:
        for r in range(warmup + rounds):
            names = list(cases)
            names = names[r % len(names):] + names[:r % len(names)]
            for name in names:
                update, bg = cases[name]
                _nudge(params)
                t0 = time.perf_counter()
                update()
                t1 = time.perf_counter()
                done = bg()
                if r >= warmup:
                    calling[name].append((t1 - t0) * 1e3)
                    background[name].append(done)
    finally:
        gc.enable()
    sync = statistics.median(calling[SYNC])
    out = {}
    for name in cases:
        out[name] = {"calling_thread": _stats(calling[name]),
                     "background": _stats(background[name]),
                     "calling_over_sync": statistics.median(calling[name]) / sync}
    ratio = out[OURS]["calling_over_sync"]
    return {"model": spec.name, "params": spec.numel, "tensors": spec.tensors,
            "param_dtype": "bf16", "cases": out, "goal_calling_over_sync": GOAL,
            "goal_met": ratio <= GOAL if spec.name == "llama-200m" else None,
            "gil_share_while_background": gil_share(model)}


def _timed(fn, sink: list):
    """``fn`` that appends its host time (ms) to ``sink``."""
    def call(*args, **kwargs):
        t0 = time.perf_counter()
        fn(*args, **kwargs)
        sink.append((time.perf_counter() - t0) * 1e3)
    return call


def run_cuda(model_name: str, steps: int) -> dict:
    """The synthetic training loop on the GPU (see the module docstring)."""
    dev = torch.device("cuda")
    spec = models.SPECS[model_name]
    model = models.build(spec, torch.bfloat16, dev)
    params = list(model.parameters())
    for p in params:
        p.grad = torch.zeros_like(p)
    opt = torch.optim.SGD(params, lr=1e-6)
    work = torch.randn(8192, 8192, device=dev, dtype=torch.bfloat16)

    def step() -> None:
        y = work
        for _ in range(24):  # a step that outlasts the offload pipeline
            y = y @ work * 1e-3
        opt.step()

    def time_loop(after_step, host: list) -> dict:
        for _ in range(3):
            step()
            after_step()
        torch.cuda.synchronize()
        host.clear()
        t0 = time.perf_counter()
        for _ in range(steps):
            step()
            after_step()
        torch.cuda.synchronize()
        return {"step_ms": (time.perf_counter() - t0) / steps * 1e3,
                "host_in_update": _stats(host) if host else None}

    out, host = {}, []
    out["no EMA"] = time_loop(lambda: None, host)
    before = torch.cuda.memory_allocated(dev)
    ema = EMA(model, decay=DECAY, device="cpu", non_blocking=True)
    ema.update = _timed(ema.update, host)  # attach's hook calls it after each step
    handle = ema.attach(opt)
    out["non_blocking, attached"] = time_loop(lambda: None, host)
    ema.wait()
    out["non_blocking, attached"]["ema_hbm_bytes"] = torch.cuda.memory_allocated(dev) - before
    handle.remove()
    out["non_blocking, plain update()"] = time_loop(ema.update, host)
    ema.wait()
    del ema
    sync = EMA(model, decay=DECAY, device="cpu")
    out["device=cpu synchronous"] = time_loop(_timed(sync.update, host), host)
    del sync
    try:
        from timm.utils import ModelEmaV3
        timm_ema = ModelEmaV3(model, decay=DECAY, device="cpu", dtype=torch.float32)
        out["timm ModelEmaV3(device=cpu, fp32)"] = time_loop(
            _timed(lambda: timm_ema.update(model), host), host)
        del timm_ema
    except ImportError as exc:
        print(f"skipping timm: {exc}", file=sys.stderr)
    try:
        from diffusers.training_utils import EMAModel
        d_ema = EMAModel(params, decay=DECAY, foreach=True)
        d_ema.pin_memory()

        def diffusers_offload() -> None:  # its train_text_to_image.py --offload_ema
            d_ema.to(device="cuda", non_blocking=True)
            d_ema.step(params)
            d_ema.to(device="cpu", non_blocking=True)
        out["diffusers EMAModel --offload_ema"] = time_loop(_timed(diffusers_offload, host),
                                                            host)
    except ImportError as exc:
        print(f"skipping diffusers: {exc}", file=sys.stderr)
    base = out["no EMA"]["step_ms"]
    for row in out.values():
        row["step_over_no_ema"] = row["step_ms"] / base
    return {"model": spec.name, "params": spec.numel, "param_dtype": "bf16", "cases": out}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    ap.add_argument("--model", default=None, choices=sorted(models.SPECS),
                    help="default: llama-200m on the CPU, llama-1.1b on a GPU")
    ap.add_argument("--rounds", type=int, default=9)
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--steps", type=int, default=20, help="GPU loop steps")
    ap.add_argument("--out", default=None, help="folder for offload_<device>_<date>.json")
    ap.add_argument("--tag", default="", help="appended to the file name")
    args = ap.parse_args(argv)
    device = torch.device(args.device)
    info = report.machine_info(device)
    if device.type == "cpu":
        result = run_cpu(args.model or "llama-200m", args.rounds, args.warmup)
    else:
        result = run_cuda(args.model or "llama-1.1b", args.steps)
    result.update(info, load_avg_end=os.getloadavg(), rounds=args.rounds,
                  threads=torch.get_num_threads())
    text = json.dumps(result, indent=2)
    print(text)
    if args.out:
        date = info["date"][:10]
        tag = f"_{args.tag}" if args.tag else ""
        path = Path(args.out) / f"offload_{info['device_slug']}_{date}{tag}.json"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text + "\n")
        print(f"wrote {path}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
