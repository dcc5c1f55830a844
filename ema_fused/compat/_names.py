"""Reading modules by name for the compat classes: which tensors are floating, the
tensors two modules hold under the same names, and exact names as ``EMA(exclude=...)``
patterns."""
from __future__ import annotations

from typing import Iterable

import torch
from torch import nn


def named_tensors(module: nn.Module) -> dict[str, torch.Tensor]:
    """Every parameter and buffer of ``module`` by name (``named_parameters`` /
    ``named_buffers``: shared ones under their first name)."""
    out = dict(module.named_parameters())
    out.update(module.named_buffers())
    return out


def float_names(module: nn.Module) -> set[str]:
    """The names of the floating (and complex) parameters and buffers."""
    return {n for n, t in named_tensors(module).items()
            if torch.is_floating_point(t) or torch.is_complex(t)}


def pairs_by_name(dst: nn.Module, src: nn.Module, names: Iterable[str]
                  ) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """``(dst tensor, src tensor)`` for each of ``names`` both modules hold (detached)."""
    a, b = named_tensors(dst), named_tensors(src)
    return [(a[n].detach(), b[n].detach()) for n in sorted(names) if n in a and n in b]


def exact_patterns(names: Iterable[str]) -> list[str]:
    """fnmatch patterns that match exactly these names (``*``, ``?`` and ``[`` escaped)."""
    return ["".join(f"[{c}]" if c in "*?[" else c for c in name) for name in names]
