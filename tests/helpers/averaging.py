"""Shared by the averaging tests: the float64 reference of a weighted average and the
bound of fp32 accumulation against it."""
from __future__ import annotations

import torch


def reference(states: list[dict], coeffs: list[float]) -> dict:
    """sum_j c_j * x_j in float64 for every floating tensor (states have plain names)."""
    return {n: sum(c * s[n].double() for s, c in zip(states, coeffs))
            for n, t in states[0].items() if t.is_floating_point()}


def assert_close_to(result: dict, exact: dict, states: list[dict], coeffs: list[float]):
    """fp32 accumulation: each of the k additions rounds once (twice without an FMA)."""
    k = len(states)
    for n, e in exact.items():
        mags = sum(abs(c) * s[n].double().abs() for s, c in zip(states, coeffs))
        err = (result[n].double() - e).abs()
        assert result[n].dtype == torch.float32 and result[n].shape == e.shape, n
        assert bool((err <= 2 * k * 2 ** -24 * mags + 1e-38).all()), (n, float(err.max()))
