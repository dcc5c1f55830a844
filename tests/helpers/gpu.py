"""GPU tests' shared steps: a kernel backend that must run on this GPU machine, and a
CUDA graph captured after a warm-up on a side stream."""
from __future__ import annotations

from typing import Callable

import pytest
import torch

from ema_fused import available_backends
from ema_fused.backends import extension


def gpu_backend(name: str) -> str:
    """``name``, after building the extension for ``cuda`` if needed; a failure (not a
    skip) where it cannot run: on a GPU machine every kernel backend must."""
    if name == "cuda":
        extension.load(build=True)
    usable, why = available_backends("cuda")[name]
    if not usable:
        pytest.fail(f"backend {name!r} not usable on this GPU machine: {why}")
    return name


def warm_up_and_capture(step: Callable[[], None]) -> torch.cuda.CUDAGraph:
    """Run ``step`` once on a side stream (compiles kernels, builds tables), then capture
    one call of it into a graph, which is returned (not replayed)."""
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        step()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        step()
    return graph
