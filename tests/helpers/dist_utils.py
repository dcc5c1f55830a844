"""Multi-process tests on the CPU: spawn ranks with the gloo backend, with a deadline.

``spawn(fn, world_size, *args)`` starts ``world_size`` fresh processes
(``torch.multiprocessing`` spawn), each joining a gloo process group on
``127.0.0.1`` and a free port, runs ``fn(rank, world_size, *args)`` in each, and
raises the first rank's error (with its traceback).  A run that outlives ``timeout``
seconds is killed and fails the test instead of blocking CI.  ``fn`` must be a
module-level function of an importable module (the children import it).
"""
from __future__ import annotations

import copy
import faulthandler
import os
import pickle
import socket
import sys
import time
import warnings
from typing import Callable

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

DEFAULT_TIMEOUT = 120.0


def free_port() -> int:
    """A TCP port that was free a moment ago (bound to port 0, then released)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _entry(rank: int, fn: Callable, world_size: int, port: int, args: tuple,
           pg_backend: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    faulthandler.enable(all_threads=True)  # a rank that aborts prints every thread's stack
    torch.set_num_threads(1)  # two ranks on two cores: no oversubscription
    if pg_backend == "nccl":
        torch.cuda.set_device(rank)
    dist.init_process_group(pg_backend, rank=rank, world_size=world_size)
    try:
        fn(rank, world_size, *args)
        dist.barrier()  # no rank leaves while another still needs it
    finally:
        dist.destroy_process_group()
    # The rank passed.  Leave before the interpreter's teardown: there, about one rank exit
    # in a hundred on this 2-core VM aborted inside torch ("terminate called without an
    # active exception", the main thread with no Python frame left; seen in the FSDP test,
    # which has no ema_fused thread), the exit-time abort of pytorch/pytorch#190489 and
    # PR 179291.  A failure of ``fn`` still raises above, with its traceback.
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


def _every_error(ctx) -> str:
    """The traceback each failed rank left (torch.multiprocessing writes one per rank)."""
    out = []
    for rank, path in enumerate(ctx.error_files):
        if path and os.path.exists(path) and os.path.getsize(path):
            with open(path, "rb") as fh:
                out.append(f"-- rank {rank}:\n{pickle.load(fh)}")
    return "\n".join(out)


def spawn(fn: Callable, world_size: int, *args, timeout: float = DEFAULT_TIMEOUT,
          pg_backend: str = "gloo") -> None:
    """Run ``fn(rank, world_size, *args)`` on ``world_size`` ranks (gloo; ``"nccl"``
    for one GPU per rank), or fail."""
    ctx = mp.start_processes(_entry, args=(fn, world_size, free_port(), args, pg_backend),
                             nprocs=world_size, join=False, start_method="spawn")
    deadline = time.monotonic() + timeout
    try:
        while not ctx.join(timeout=max(0.1, deadline - time.monotonic())):
            if time.monotonic() > deadline:
                raise TimeoutError(f"{fn.__name__} on {world_size} ranks did not finish "
                                   f"within {timeout:.0f} s (a hang?)")
    except (mp.ProcessRaisedException, mp.ProcessExitedException) as first:
        # join reports the first failed rank it looks at, which may be one that only
        # lost its peer (a reset connection): report every rank's own error
        raise RuntimeError(_every_error(ctx) or str(first)) from None
    finally:
        for p in ctx.processes:
            if p.is_alive():
                p.kill()
                p.join(5)


# ---------------------------------------------------------------- models and trajectories
def make_model(dtype: torch.dtype = torch.float32) -> torch.nn.Module:
    """Uneven shapes: 13 rows split 7 + 6 over two ranks, and a 1-row weight and a
    1-element bias that leave rank 1 with zero elements; a float and an integer buffer
    (FSDP2 leaves buffers as plain tensors)."""
    from torch import nn
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(7, 13), nn.LayerNorm(13), nn.Linear(13, 1))
    model.register_buffer("scale", torch.randn(13))
    model.register_buffer("seen", torch.zeros((), dtype=torch.int64))
    return model.to(dtype)


def full(t: torch.Tensor) -> torch.Tensor:
    """The whole tensor: a DTensor gathered (a collective), a plain tensor as it is."""
    from torch.distributed.tensor import DTensor
    return t.full_tensor() if isinstance(t, DTensor) else t


def set_value(t: torch.Tensor, value: torch.Tensor) -> None:
    """Write the full ``value`` into ``t``; a DTensor takes its own shard of it (cut by
    torch's ``distribute_tensor`` with no source rank: no communication)."""
    from torch.distributed.tensor import DTensor, distribute_tensor
    with torch.no_grad():
        if isinstance(t, DTensor):
            shard = distribute_tensor(value, t.device_mesh, t.placements, src_data_rank=None)
            t._local_tensor.copy_(shard._local_tensor)
        else:
            t.copy_(value)


def new_values(model: torch.nn.Module, step: int) -> dict[str, torch.Tensor]:
    """Fresh full values for every tensor of ``model`` at ``step``, the same on every rank
    (a stand-in for an optimizer step that every rank agrees on)."""
    from helpers.numerics import rand, seeded
    out = {}
    for name, t in model.state_dict(keep_vars=True).items():
        if t.is_floating_point():
            out[name] = rand(t.shape, t.dtype, seeded(name, step))
        else:
            out[name] = torch.full(t.shape, step, dtype=t.dtype)
    return out


def step_models(models, step: int) -> dict[str, torch.Tensor]:
    """Give every model (plain or sharded, same names) the values of ``step``."""
    values = new_values(models[0], step)
    for model in models:
        for name, t in model.state_dict(keep_vars=True).items():
            set_value(t, values[name])
    return values


def local(t: torch.Tensor) -> torch.Tensor:
    """A DTensor's local shard (no communication), a plain tensor as it is."""
    from torch.distributed.tensor import DTensor
    return t.to_local() if isinstance(t, DTensor) else t


def dcp_module():
    """``torch.distributed.checkpoint``, with its one-process warning silenced (a test
    that loads a checkpoint without a process group)."""
    import torch.distributed.checkpoint as dcp
    warnings.filterwarnings("ignore", message=".*assuming the intent is to")
    return dcp


def sharded_model() -> torch.nn.Module:
    """A copy of :func:`make_model` under FSDP2: its first layer, then the whole."""
    from torch.distributed.fsdp import fully_shard
    model = copy.deepcopy(make_model())
    fully_shard(model[0])
    fully_shard(model)
    return model
