"""Numerical helpers shared by the tests: fresh seeded data, float64 references, and the
error bound of one rounding."""
from __future__ import annotations

import zlib

import pytest
import torch

ALL_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


def requires_gpu():
    return pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


def seeded(*key) -> torch.Generator:
    """A CPU generator seeded from ``key`` (a test's parameters): fresh data per case,
    the same on every run."""
    return torch.Generator().manual_seed(zlib.crc32(repr(key).encode()))


def rand(shape, dtype, gen: torch.Generator, device="cpu", scale=1.0) -> torch.Tensor:
    """Fresh normal data, made in float64 and rounded once to ``dtype``."""
    return (torch.randn(shape, generator=gen, dtype=torch.float64) * scale).to(device, dtype)


def compute_dtype(*dtypes: torch.dtype) -> torch.dtype:
    out = torch.float32
    for d in dtypes:
        out = torch.promote_types(out, d)
    return out


def lerp_reference(shadow: torch.Tensor, param: torch.Tensor, weight: float) -> torch.Tensor:
    """``shadow + weight * (param - shadow)`` in float64."""
    s = shadow.double()
    return s + weight * (param.double() - s)


def assert_rounded_close(result: torch.Tensor, exact: torch.Tensor, inputs_abs: torch.Tensor,
                         compute: torch.dtype) -> None:
    """``result`` is ``exact`` rounded once into ``result.dtype``, computed in ``compute``.

    Bound: one ulp of the result's dtype (the final rounding), plus a few ulps of the
    compute dtype relative to the inputs' magnitude (the arithmetic before it).
    """
    out = torch.finfo(result.dtype)
    comp = torch.finfo(compute)
    bound = out.eps * exact.abs() + 4 * comp.eps * inputs_abs + out.tiny
    err = (result.double() - exact).abs()
    assert result.shape == exact.shape
    if err.numel():
        worst = (err - bound).argmax()
        assert bool((err <= bound).all()), (
            f"{result.dtype}: error {err.flatten()[worst].item():.3g} > bound "
            f"{bound.flatten()[worst].item():.3g} at flat index {worst.item()}")
