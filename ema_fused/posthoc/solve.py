"""Post-hoc EMA synthesis math: power-function EMA profiles and the least-squares fit.

Karras et al., "Analyzing and Improving the Training Dynamics of Diffusion Models"
(EDM2, arXiv:2312.02696), Section 3 and Appendix C.  Pure float64; nothing here knows
about files or tensors of a model.

**Profiles.**  The power-function EMA at time ``t`` (Eq. 1) is the average of the
trajectory theta(tau) under the profile ``p_{t,g}(tau) = (g + 1) tau**g / t**(g + 1)`` on
``0 < tau <= t`` (zero after ``t``); it integrates to 1.  Its relative width is Eq. 2,
``sigma_rel**2 = (g + 1) / ((g + 2)**2 (g + 3))``, inverted by
:func:`ema_fused.schedules.sigma_rel_to_gamma`.

**The time of a snapshot is the schedule's n.**  ``schedules.karras_power`` decays with
``decay(n) = (1 - 1/n)**(g + 1)`` (Eq. 3 at t = n) and ``decay(1) = 0``.  After ``N`` such
updates the shadow is ``sum_k w_k theta_k`` with ``w_k = (1 - decay(k)) prod_{j>k} decay(j)``,
and as ``prod_{j=k+1..N} (j - 1)/j = k/N`` telescopes,
``w_k = (k**(g+1) - (k-1)**(g+1)) / N**(g+1)``: the integral of ``p_{N,g}`` over
``(k-1, k]``.  So the shadow after ``N`` updates is *exactly* Eq. 1 at ``t = N`` for the
trajectory that holds ``theta_k`` on ``(k-1, k]``, with no offset.  Every "step" below is
that ``n``: for ``EMA(schedule=karras_power(...))`` updated at every step, ``n = step -
update_after_step``.  (An update only every ``u`` steps with ``n`` counted in steps is
*not* a power function of ``g``: its decays ``(1 - 1/(ju))**(g+1)`` at the j-th update
make an exponent near ``(g + 1)/u - 1``; count ``n`` in updates instead.)  The inner
products scale as ``1/c`` when all times are multiplied by ``c``, so the coefficients do
not depend on the unit of time (steps, updates or images).

**Synthesis** (Appendix C, Algorithm 3): the target profile ``p_r`` is approximated by
``sum_i x_i p_i`` over the snapshots' profiles, minimising ``||p_r - sum_i x_i p_i||``
in L2(0, inf): the normal equations ``A x = b`` with ``A_ij = <p_i, p_j>`` and
``b_i = <p_i, p_r>`` (:func:`profile_inner`).

**ema-pytorch** (``PostHocEMA``, 0.8.3) solves the same equations with the same inner
product, and agrees to ~1e-13 given the same times and gammas.  It differs in: the time
(its checkpoint ``step`` K holds the profile ending at n = K + 1 here, its first call
counting the model twice); no normalisation; gammas rounded to float32 before the solve
(``torch.tensor`` of floats; ~1e-7 relative in the coefficients); every checkpoint in
its folder enters the fit, also those after the step asked for; and with its default
``update_every=100`` its profiles are not those of the gammas it solves for (see above).
"""
from __future__ import annotations

import math
from typing import Optional, Sequence

import torch

from ..checks import as_real
from ..schedules import sigma_rel_to_gamma

__all__ = ["profile_inner", "profile_gram", "solve_coefficients", "solve_coefficients_sigma",
           "synthesis_coefficients", "reconstruction_error"]

_F64 = torch.float64


def _time(what: str, t: object) -> float:
    t = as_real(what, t, 0.0, math.inf)
    if t == 0.0:
        raise ValueError(f"{what} must be > 0 (the number n of updates in the profile), got 0")
    return t


def _gamma(what: str, g: object) -> float:
    g = as_real(what, g, -math.inf, math.inf)
    if g <= -1.0:
        raise ValueError(f"{what} must be > -1, got {g}: t**-(g+1) tau**g does not "
                         "integrate to 1 on (0, t], it is no power-function EMA")
    if g <= -0.5:
        raise ValueError(f"{what} = {g} is in (-1, -1/2]: that profile is not square-"
                         "integrable, so the least-squares inner products diverge "
                         "(every sigma_rel gives g > -0.39)")
    return g


def _inner(t_a: torch.Tensor, g_a: torch.Tensor, t_b: torch.Tensor, g_b: torch.Tensor
           ) -> torch.Tensor:
    """<p_{t_a,g_a}, p_{t_b,g_b}>, broadcast.  The integral of the product of two Eq. 1
    profiles over (0, min(t_a, t_b)] is
    ``(g_a+1)(g_b+1) min**(g_a+g_b+1) / ((g_a+g_b+1) t_a**(g_a+1) t_b**(g_b+1))``;
    written with the ratio of the times (raised to g_b if t_a < t_b, else to -g_a) over
    the larger time, as in Algorithm 3, so that no t**g is ever formed (1e6**52
    overflows float64)."""
    ratio = t_a / t_b
    power = torch.where(t_a < t_b, g_b, -g_a)
    return ((g_a + 1) * (g_b + 1) * ratio ** power
            / ((g_a + g_b + 1) * torch.maximum(t_a, t_b)))


def profile_inner(t_a: float, gamma_a: float, t_b: float, gamma_b: float) -> float:
    """The L2 inner product ``<p_{t_a,gamma_a}, p_{t_b,gamma_b}>`` of two power-function EMA
    profiles (Eq. 1) ending at times ``t_a`` and ``t_b``: ``p_dot_p`` of Algorithm 3.
    Times are the schedule's ``n`` (see the module docstring)."""
    t = [_time("profile_inner: t_a", t_a), _time("profile_inner: t_b", t_b)]
    g = [_gamma("profile_inner: gamma_a", gamma_a), _gamma("profile_inner: gamma_b", gamma_b)]
    t, g = torch.tensor(t, dtype=_F64), torch.tensor(g, dtype=_F64)
    return float(_inner(t[0], g[0], t[1], g[1]))


def _profiles(where: str, steps: Sequence[float], gammas: Sequence[float]
              ) -> tuple[torch.Tensor, torch.Tensor]:
    steps, gammas = list(steps), list(gammas)
    if len(steps) != len(gammas):
        raise ValueError(f"{where}: {len(steps)} snapshot steps but {len(gammas)} gammas")
    if not steps:
        raise ValueError(f"{where}: no snapshots to synthesize from")
    t = [_time(f"{where}: snapshot_steps[{i}]", s) for i, s in enumerate(steps)]
    g = [_gamma(f"{where}: snapshot_gammas[{i}]", x) for i, x in enumerate(gammas)]
    return torch.tensor(t, dtype=_F64), torch.tensor(g, dtype=_F64)


def _system(where: str, steps: Sequence[float], gammas: Sequence[float], target_step: float,
            target_gamma: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Checked inputs -> (A, b, <p_r, p_r>, snapshot times) of the normal equations."""
    t, g = _profiles(where, steps, gammas)
    tr = torch.tensor(_time(f"{where}: target_step", target_step), dtype=_F64)
    gr = torch.tensor(_gamma(f"{where}: target_gamma", target_gamma), dtype=_F64)
    return (_inner(t[:, None], g[:, None], t[None, :], g[None, :]), _inner(t, g, tr, gr),
            _inner(tr, gr, tr, gr), t)


def profile_gram(steps: Sequence[float], gammas: Sequence[float]) -> torch.Tensor:
    """The Gram matrix ``A_ij = <p_i, p_j>`` of the profiles ``(steps[i], gammas[i])``
    (float64, symmetric positive semi-definite)."""
    t, g = _profiles("profile_gram", steps, gammas)
    return _inner(t[:, None], g[:, None], t[None, :], g[None, :])


def solve_coefficients(snapshot_steps: Sequence[float], snapshot_gammas: Sequence[float],
                       target_step: float, target_gamma: float, *, normalize: bool = True
                       ) -> torch.Tensor:
    """Coefficients ``x`` (float64, one per snapshot) such that ``sum_i x_i snapshot_i`` is
    the power-function EMA ``(target_step, target_gamma)``: Appendix C / Algorithm 3.

    Solves ``A x = b`` (Gram matrix of the snapshots' profiles, ``b_i = <p_i, p_target>``).
    The solve: ``A`` is scaled to unit diagonal (``D^-1 A D^-1``, ``D = sqrt(diag A)``: the
    snapshots' norms differ as ``1/sqrt(t)``, and the scaling removes that part of the
    condition number at no cost), then ``torch.linalg.lstsq`` with the SVD driver
    ``gelsd``.  Profiles of neighbouring snapshots are nearly parallel, so ``A`` is badly
    conditioned, and exactly singular when a snapshot repeats: an LU solve then fails or
    returns garbage, while the SVD gives the minimum-norm solution.  Every solution of the
    normal equations gives the same fitted profile (the projection of ``p_target`` is
    unique), and the minimum-norm one keeps the coefficients small, which keeps the
    rounding of fp16 snapshots from being amplified.

    ``normalize=True`` (default) divides ``x`` by ``sum(x)``.  Why: each exact profile
    integrates to 1, and so does every snapshot's discrete weighting, so ``sum(x)`` is
    the total weight the synthesized average gives the trajectory.  The least-squares
    ``x`` does not constrain it; a sum of ``1 + e`` scales the whole result by ``1 + e``,
    an error proportional to the parameters' size rather than to their change (a model
    that never changes would not be returned unchanged).  Normalizing makes constant
    trajectories exact and rescales the fitted profile by ``1/sum(x)``; ``|1 - sum(x)|``
    is at most ``rel_err * (g + 1)/sqrt(2g + 1) * sqrt(T/target_step)`` (Cauchy-Schwarz on
    ``(0, T]``, ``T`` the last time, ``rel_err`` from :func:`reconstruction_error`), so the
    change is of the order of the fit's own error.  ``normalize=False`` returns the
    least-squares solution itself (what Algorithm 3 and ema-pytorch return).

    Raises ``ValueError``: no snapshots, mismatched lengths, a step <= 0, a gamma <= -1
    (or <= -1/2: not square-integrable), ``target_step`` before the first or after the
    last snapshot, a non-finite solution or a sum of coefficients that is not a positive
    finite number (the system is too ill-conditioned for float64 or the snapshots cannot
    represent the target).
    """
    where = "solve_coefficients"
    a, b, _, t = _system(where, snapshot_steps, snapshot_gammas, target_step, target_gamma)
    if not float(t.min()) <= float(target_step) <= float(t.max()):
        raise ValueError(f"{where}: target_step {target_step:g} is outside the snapshots' "
                         f"steps [{float(t.min()):g}, {float(t.max()):g}]; a profile cannot be "
                         "synthesized before the first snapshot or after the last")
    if not (bool(torch.isfinite(a).all()) and bool(torch.isfinite(b).all())):
        raise ValueError(f"{where}: the profiles' inner products are not finite in float64 "
                         "(a gamma or a ratio of steps too large): the system is too "
                         "ill-conditioned to solve")
    d = a.diagonal().sqrt()
    y = torch.linalg.lstsq(a / d[:, None] / d[None, :], (b / d)[:, None], driver="gelsd")
    x = y.solution[:, 0] / d
    if not bool(torch.isfinite(x).all()):
        raise ValueError(f"{where}: the least-squares solution is not finite: the Gram "
                         f"matrix of {len(t)} snapshots is too ill-conditioned")
    if normalize:
        total = float(x.sum())
        if not (math.isfinite(total) and total > 0.0):
            raise ValueError(f"{where}: the coefficients sum to {total}, so they cannot be "
                             "normalised: the snapshots cannot represent the target (ill-"
                             "conditioned or far from it)")
        x = x / total
    return x


def solve_coefficients_sigma(snapshot_steps: Sequence[float],
                             snapshot_sigma_rels: Sequence[float], target_step: float,
                             target_sigma_rel: float, *, normalize: bool = True
                             ) -> torch.Tensor:
    """:func:`solve_coefficients` with every profile given by its ``sigma_rel`` (Eq. 2),
    converted by :func:`ema_fused.schedules.sigma_rel_to_gamma`."""
    gammas = [sigma_rel_to_gamma(s) for s in snapshot_sigma_rels]
    return solve_coefficients(snapshot_steps, gammas, target_step,
                              sigma_rel_to_gamma(target_sigma_rel), normalize=normalize)


def synthesis_coefficients(snapshots: Sequence[tuple[float, float]], *,
                           gamma: Optional[float] = None, sigma_rel: Optional[float] = None,
                           step: Optional[float] = None) -> torch.Tensor:
    """Weights for the weighted sum over snapshots that synthesizes the profile ``gamma``
    (or ``sigma_rel``, exactly one) at ``step`` (default: the last snapshot's step).

    ``snapshots`` lists ``(step, gamma)`` of every snapshot taken, in any order, all
    profiles mixed.  Only those with ``step <= step`` enter the fit (a later snapshot
    averages updates the target has not seen), so ``step`` must be a snapshot's step.
    Returns one float64 weight per snapshot in the given order, exactly 0 for those left
    out (skip reading them), summing to 1 (see :func:`solve_coefficients`).
    """
    if (gamma is None) == (sigma_rel is None):
        raise ValueError("synthesis_coefficients: give exactly one of gamma or sigma_rel")
    if sigma_rel is not None:
        gamma = sigma_rel_to_gamma(sigma_rel)
    pairs = list(snapshots)
    if not pairs:
        raise ValueError("synthesis_coefficients: no snapshots to synthesize from")
    for i, p in enumerate(pairs):
        if not isinstance(p, (tuple, list)) or len(p) != 2:
            raise TypeError(f"synthesis_coefficients: snapshots[{i}] must be a (step, gamma) "
                            f"pair, got {p!r}")
    steps = [_time(f"synthesis_coefficients: snapshots[{i}] step", p[0])
             for i, p in enumerate(pairs)]
    for i, p in enumerate(pairs):  # all of them, not only those the fit uses
        _gamma(f"synthesis_coefficients: snapshots[{i}] gamma", p[1])
    step = max(steps) if step is None else _time("synthesis_coefficients: step", step)
    used = [i for i, s in enumerate(steps) if s <= step]
    if not used:
        raise ValueError(f"synthesis_coefficients: step {step:g} comes before the first "
                         f"snapshot (step {min(steps):g})")
    last = max(steps[i] for i in used)
    if last < step:
        raise ValueError(f"synthesis_coefficients: step {step:g} comes after the last "
                         f"snapshot at or before it (step {last:g}): none of those has seen "
                         "the updates in between; ask for a snapshot's step")
    x = solve_coefficients([steps[i] for i in used], [pairs[i][1] for i in used], step, gamma)
    out = torch.zeros(len(pairs), dtype=_F64)
    out[used] = x
    return out


def reconstruction_error(snapshot_steps: Sequence[float], snapshot_gammas: Sequence[float],
                         target_step: float, target_gamma: float,
                         coefficients: torch.Tensor) -> float:
    """``||p_target - sum_i x_i p_i|| / ||p_target||`` in L2: how far the synthesized
    profile is from the one asked for (0 is exact), from the same inner products."""
    a, b, rr, t = _system("reconstruction_error", snapshot_steps, snapshot_gammas,
                          target_step, target_gamma)
    x = torch.as_tensor(coefficients, dtype=_F64).reshape(-1)
    if x.numel() != t.numel():
        raise ValueError(f"reconstruction_error: {x.numel()} coefficients for {t.numel()} "
                         "snapshots")
    # the three terms nearly cancel for a good fit: clamp the rounding below zero
    sq = float((rr - 2 * (x @ b) + x @ a @ x).clamp(min=0.0))
    return math.sqrt(sq / float(rr))
