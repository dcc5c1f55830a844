"""Per-rank time of ``ema.update()`` on an FSDP2-sharded model (2 gloo processes, CPU).

An EMA is elementwise, so a sharded EMA should cost what a plain EMA of the local
shards costs, and communicate nothing.  Three cases on each rank, interleaved round
by round, each call started together on every rank (a barrier, not timed):

* ``sharded``: ``EMA(model)`` on the FSDP2 model (``fully_shard`` per layer and root):
  fp32 DTensor shadows of each rank's shards, updated in place.
* ``local-size plain``: ``EMA`` of a plain model whose tensors have the shapes of this
  rank's local shards: the same kernel work with no DTensor involved.  Goal: the
  sharded case within 10% of it.
* ``gather``: what peers do (Lightning's ``summon_full_params``, DeepSpeed's per-param
  gather): FSDP2's own ``unshard()`` all-gathers every param, a full-size fp32 shadow
  on every rank is updated from the full params, the local slice is written back into
  the shards (``writeback=True``), then ``reshard()``.  Goal: the sharded case faster
  by at least the world size (each rank then does 1/world of the work, and no gather).

Params are bf16 (``--dtype``), shadows fp32, one thread per rank (2 ranks on 2 cores).

    python benchmarks/bench_distributed.py [--rounds 15] [--out benchmarks/results/]
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import socket
import sys
import time
from pathlib import Path

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from benchmarks.common import models, report
from benchmarks.common.timing import percentile


def _spec(tiny: bool) -> models.ModelSpec:
    if tiny:
        return models.llama("llama-tiny-dist", vocab=96, hidden=32, inter=88, layers=2)
    return models.llama("llama-110m", vocab=16000, hidden=1024, inter=2816, layers=6)


def _shard(model: torch.nn.Module) -> torch.nn.Module:
    from torch.distributed.fsdp import fully_shard
    for layer in model.model.layers.children():
        fully_shard(layer)
    fully_shard(model)
    return model


def _each_unit(model: torch.nn.Module, method: str) -> None:
    """FSDP2's ``unshard()`` / ``reshard()`` act on one unit each: call it on all."""
    from torch.distributed.fsdp import FSDPModule
    for m in model.modules():
        if isinstance(m, FSDPModule):
            getattr(m, method)()


def _gather_case(model: torch.nn.Module, backend: str):
    """Full gather + update of a full-size shadow + write-back of the local slice."""
    from ema_fused import ema_update_
    _each_unit(model, "unshard")
    full = [p.detach().float().clone() for p in model.parameters()]  # full-size shadows
    _each_unit(model, "reshard")
    shards = [p.to_local() for p in model.parameters()]
    world, rank = dist.get_world_size(), dist.get_rank()

    def update() -> None:
        _each_unit(model, "unshard")  # all-gathers every param, unit by unit
        params = [p.detach() for p in model.parameters()]
        ema_update_(full, params, 1e-3, backend=backend)
        with torch.no_grad():  # writeback: this rank's rows back into its shard
            for p, s in zip(params, shards):
                s.copy_(p.chunk(world)[rank] if s.numel() else s)
        _each_unit(model, "reshard")
    return update


def _worker(rank: int, world: int, port: int, args: argparse.Namespace, queue) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world)
    from ema_fused import EMA
    dtype = models.DTYPES[args.dtype]
    spec = _spec(args.tiny)
    sharded = _shard(models.build(spec, dtype, "cpu"))
    local_spec = models.ModelSpec("local", "local shards",
                                  tuple((n, tuple(p.to_local().shape))
                                        for n, p in sharded.named_parameters()))
    plain = models.build(local_spec, dtype, "cpu", seed=rank)
    cases = {"sharded": EMA(sharded, decay=0.999, backend=args.backend).update,
             "local-size plain": EMA(plain, decay=0.999, backend=args.backend).update,
             "gather": _gather_case(_shard(models.build(spec, dtype, "cpu")), args.backend)}
    times: dict[str, list[float]] = {name: [] for name in cases}
    names = list(cases)
    for r in range(args.warmup + args.rounds):
        k = r % len(names)
        for name in names[k:] + names[:k]:
            dist.barrier()
            t0 = time.perf_counter()
            cases[name]()
            elapsed = (time.perf_counter() - t0) * 1e3
            if r >= args.warmup:
                times[name].append(elapsed)
    local = sum(p.to_local().numel() for p in sharded.parameters())
    queue.put((rank, {"local_elements": local, "times_ms": times}))
    dist.barrier()
    dist.destroy_process_group()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--world", type=int, default=2)
    ap.add_argument("--dtype", default="bf16", choices=sorted(models.DTYPES))
    ap.add_argument("--backend", default="auto")
    ap.add_argument("--rounds", type=int, default=15)
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--tiny", action="store_true", help="toy widths (a smoke run)")
    ap.add_argument("--out", help="folder for distributed_<machine>_<date>.json")
    args = ap.parse_args(argv)
    spec = _spec(args.tiny)
    ctx = mp.get_context("spawn")
    queue = ctx.SimpleQueue()
    procs = mp.start_processes(_worker, args=(args.world, _free_port(), args, queue),
                               nprocs=args.world, start_method="spawn", join=False)
    ranks = {}
    while len(ranks) < args.world:  # read as results come (a full pipe would block a rank)
        if not queue.empty():
            rank, result = queue.get()
            ranks[rank] = result
        elif procs.join(timeout=0.5):  # raises with the rank's error if one failed
            break
    while not procs.join():
        pass
    ranks.update(queue.get() for _ in range(args.world - len(ranks)))
    rows = {}
    for name in ranks[0]["times_ms"]:
        per_rank = [{"median_ms": percentile(ranks[r]["times_ms"][name], 0.5),
                     "p20_ms": percentile(ranks[r]["times_ms"][name], 0.2),
                     "p80_ms": percentile(ranks[r]["times_ms"][name], 0.8)}
                    for r in sorted(ranks)]
        rows[name] = {"per_rank": per_rank, "slowest_rank_median_ms":
                      max(x["median_ms"] for x in per_rank)}
    med = {name: row["slowest_rank_median_ms"] for name, row in rows.items()}
    ratios = {"sharded / local-size plain": med["sharded"] / med["local-size plain"],
              "gather / sharded": med["gather"] / med["sharded"]}
    info = report.machine_info(torch.device("cpu"))
    print(f"ema.update() per rank on {info['device_name']}: {spec.name} ({spec.numel / 1e6:.1f}M "
          f"params in {spec.tensors} tensors, {args.dtype}, fp32 shadows), {args.world} ranks, "
          f"gloo, {args.rounds} rounds")
    print("| case | " + " | ".join(f"rank {r} median (p20-p80)" for r in sorted(ranks)) + " |")
    print("|---|" + "---:|" * len(ranks))
    for name, row in rows.items():
        print(f"| {name} | " + " | ".join(f"{x['median_ms']:.2f} ms ({x['p20_ms']:.2f}-"
                                          f"{x['p80_ms']:.2f})" for x in row["per_rank"]) + " |")
    for what, value in ratios.items():
        print(f"{what}: {value:.3f}")
    if args.out:
        os.makedirs(args.out, exist_ok=True)
        date = datetime.date.today().isoformat()
        path = Path(args.out) / f"distributed_{info['device_slug']}_{date}{'_tiny' * args.tiny}.json"
        path.write_text(json.dumps({
            "machine": info, "model": {"name": spec.name, "description": spec.description,
                                       "params": spec.numel, "tensors": spec.tensors},
            "config": {k: v for k, v in vars(args).items() if k != "out"},
            "local_elements": [ranks[r]["local_elements"] for r in sorted(ranks)],
            "rows": rows, "ratios": ratios,
            "goals": {"sharded / local-size plain": "<= 1.10",
                      "gather / sharded": f">= {args.world}"}}, indent=1))
        print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
