"""Shared by tests/compat: a small model with BatchNorm, a trajectory that moves every
float tensor, and the parity checks between a compat class and its real peer.

Tolerances.  FP32 shadows: the peers evaluate the update in another order (``lerp`` vs
``s - w (s - p)`` vs ``d s + (1 - d) p``), a few ulps per step, and the EMA contracts, so
after 50 steps the gap stays at tens of ulps of O(1) values: rtol=1e-5, atol=1e-6 is ~100x
that and ~1000x below the effect of any wrong decay.  16-bit shadows (peers that keep
the model's dtype): torch's ``lerp`` paths round once, as ours, and must agree to the bit
(``exact=True``); peers that round two or three times per step (torch_ema, diffusers,
timm V2) are compared with the float64 trajectory instead: ours must be as close to it
as theirs, within one ulp.
"""
from __future__ import annotations

import io
from typing import Mapping

import torch
from torch import nn

RTOL, ATOL = 1e-5, 1e-6
STEPS = 50


def model(dtype: torch.dtype = torch.float32, seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    m = nn.Sequential(nn.Linear(7, 13), nn.BatchNorm1d(13), nn.ReLU(), nn.Linear(13, 5))
    return m.to(dtype).train()


def perturb(m: nn.Module, gen: torch.Generator) -> None:
    """One simulated optimizer step, and a forward that moves BatchNorm's statistics."""
    dtype = next(m.parameters()).dtype
    with torch.no_grad():
        m(torch.randn(11, 7, generator=gen).to(dtype) * 2 + 0.5)
        for p in m.parameters():
            p.add_(torch.randn(p.shape, generator=gen).to(p.dtype) * 0.1)


def floats(state: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {k: v for k, v in state.items() if v.is_floating_point()}


def assert_parity(ours: Mapping[str, torch.Tensor], theirs: Mapping[str, torch.Tensor],
                  exact: bool = False) -> None:
    """Same names and dtypes; values within the tolerance of the module docstring (16-bit:
    to the bit when ``exact``, else use :func:`assert_as_close_to`)."""
    assert ours.keys() == theirs.keys() and ours
    for name, t in theirs.items():
        o = ours[name]
        assert o.dtype == t.dtype, (name, o.dtype, t.dtype)
        if exact or not t.is_floating_point():
            assert torch.equal(o, t), f"{name}: max diff {(o.double() - t.double()).abs().max()}"
        else:
            torch.testing.assert_close(o, t, rtol=RTOL, atol=ATOL,
                                       msg=lambda m, n=name: f"{n}: {m}")


def assert_as_close_to(reference: Mapping[str, torch.Tensor], ours: Mapping[str, torch.Tensor],
                       theirs: Mapping[str, torch.Tensor]) -> None:
    """For 16-bit shadows: ours is at least as close to the float64 ``reference`` as the
    peer's, within one ulp of the largest value."""
    for name, ref in reference.items():
        o, t = ours[name], theirs[name]
        assert o.dtype == t.dtype, name
        ulp = torch.finfo(o.dtype).eps * ref.abs().max().item()
        err_o = (o.double() - ref).abs().max().item()
        err_t = (t.double() - ref).abs().max().item()
        assert err_o <= err_t + ulp, f"{name}: ours {err_o:.3g} vs peer {err_t:.3g} (ulp {ulp:.3g})"


def assert_moved(live: nn.Module, average: Mapping[str, torch.Tensor]) -> None:
    """Guard against a vacuous comparison: the average differs from the live model."""
    state = live.state_dict()
    assert any(not torch.allclose(state[k].float(), v.float(), atol=1e-3)
               for k, v in floats(average).items() if k in state)


def saved_and_loaded(state):
    """``state`` through ``torch.save`` and ``torch.load(weights_only=True)``."""
    buf = io.BytesIO()
    torch.save(state, buf)
    buf.seek(0)
    return torch.load(buf, weights_only=True)
