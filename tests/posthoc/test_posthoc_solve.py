"""ema_fused.posthoc_solve against references written here from EDM2's equations in other
formulations: quadrature of the Eq. 1 profiles (mpmath for single inner products, a
graded Gauss-Legendre rule for whole Gram matrices), and the discrete per-step weights
that ema_fused.EMA itself produces (read off a one-hot trajectory)."""
from __future__ import annotations

import math

import mpmath
import numpy as np
import pytest
import torch

from ema_fused import EMA
from ema_fused import posthoc_solve as P
from ema_fused.schedules import karras_power, sigma_rel_to_gamma

F64 = torch.float64
G05, G10, G075 = (sigma_rel_to_gamma(s) for s in (0.05, 0.10, 0.075))


def _two(every: int, last: int, gammas=(G05, G10)) -> tuple[list, list]:
    steps = [s for s in range(every, last + 1, every) for _ in gammas]
    return steps, [g for _ in range(every, last + 1, every) for g in gammas]


LAYOUTS = {  # name: (snapshot steps, snapshot gammas, target step, target gamma)
    "two_profiles_every_100": (*_two(100, 2000), 2000, G075),
    "irregular_mixed_gammas": ([37, 120, 121, 500, 733, 1000, 1500, 1501, 2900],
                               [G05, G10, 0.3, G05, -0.3, G10, G05, 0.3, G10], 2900, 4.0),
    "target_before_the_last": (*_two(250, 3000), 1800, G075),
    "one_profile_wider_target": ([100 * k for k in range(1, 31)], [G05] * 30, 3000, 2.0),
    "unit_of_time_is_images": ([s * 256 for s in _two(100, 2000)[0]], _two(100, 2000)[1],
                               2000 * 256, G075),
}


def _profile(t, g, tau):
    """Eq. 1's profile p_{t,g}(tau) = (g + 1) tau^g / t^(g+1) on (0, t], literally."""
    return torch.where(tau <= t, (g + 1) * tau ** g / t ** (g + 1), torch.zeros_like(tau))


_NODES, _WEIGHTS = (torch.tensor(v, dtype=F64) for v in np.polynomial.legendre.leggauss(20))


def _quadrature_inner(ta, ga, tb, gb, levels: int = 140) -> torch.Tensor:
    """The integral of p_a p_b over their common support (0, min(ta, tb)], by 20-point
    Gauss-Legendre on the graded intervals [m 2^-(j+1), m 2^-j] (the integrand is smooth
    on each; with ga + gb >= -0.6 here, 140 levels leave out < 1e-16 of it near 0)."""
    ta, ga, tb, gb = (v[..., None] for v in torch.broadcast_tensors(
        *(torch.as_tensor(v, dtype=F64) for v in (ta, ga, tb, gb))))
    hi = torch.minimum(ta, tb) * 2.0 ** -torch.arange(levels, dtype=F64)
    lo = hi / 2
    tau = ((lo + hi) / 2)[..., None] + ((hi - lo) / 2)[..., None] * _NODES
    f = _profile(ta[..., None], ga[..., None], tau) * _profile(tb[..., None], gb[..., None], tau)
    return (f * _WEIGHTS * ((hi - lo) / 2)[..., None]).sum((-1, -2))


def _reference(steps, gammas, target_step, target_gamma, gram: bool = False):
    """Normalised coefficients from quadrature inner products (and the Gram matrix)."""
    t, g = torch.tensor(steps, dtype=F64), torch.tensor(gammas, dtype=F64)
    a = _quadrature_inner(t[:, None], g[:, None], t[None, :], g[None, :])
    x = torch.linalg.solve(a, _quadrature_inner(t, g, target_step, target_gamma))
    return (x / x.sum(), a) if gram else x / x.sum()


@pytest.mark.parametrize("ta, ga, tb, gb", [
    (1000, G05, 1000, G05), (300, G10, 2000, G05), (2000, G05, 300, G10), (1, 0.0, 7, 0.0),
    (5e5, 50.0, 4e5, 3.0), (12, -0.3, 4097, -0.45), (4097, 1e-9, 12, 80.0)])
def test_profile_inner_is_the_integral_of_the_product(ta, ga, tb, gb):
    mpmath.mp.dps = 30
    ta_, ga_, tb_, gb_ = (mpmath.mpf(v) for v in (ta, ga, tb, gb))
    m = min(ta_, tb_)

    def product(u):  # p_a(u) p_b(u), Eq. 1 twice
        return (ga_ + 1) * u ** ga_ / ta_ ** (ga_ + 1) * (gb_ + 1) * u ** gb_ / tb_ ** (gb_ + 1)
    # u = m v^16 smooths the u^(ga+gb) singularity at 0, which tanh-sinh alone misses
    exact = mpmath.quad(lambda v: product(m * v ** 16) * 16 * m * v ** 15, [0, 1])
    got = P.profile_inner(ta, ga, tb, gb)
    assert got == pytest.approx(float(exact), rel=1e-12)
    assert P.profile_inner(tb, gb, ta, ga) == pytest.approx(got, rel=1e-14)  # symmetric
    # times in other units (images instead of steps) scale every product by 1/c
    assert P.profile_inner(ta * 256, ga, tb * 256, gb) == pytest.approx(got / 256, rel=1e-12)
    # the profile has unit mass: <p, p> = (g+1)^2 / ((2g+1) t)
    assert P.profile_inner(ta, ga, ta, ga) == pytest.approx(
        (ga + 1) ** 2 / ((2 * ga + 1) * ta), rel=1e-13)


@pytest.mark.parametrize("name", sorted(LAYOUTS))
def test_coefficients_match_the_quadrature_reference(name):
    steps, gammas, tr, gr = LAYOUTS[name]
    x = P.solve_coefficients(steps, gammas, tr, gr)
    assert x.dtype == F64 and x.shape == (len(steps),)
    assert float(x.sum()) == pytest.approx(1.0, abs=1e-14)
    # the Gram matrices here have condition numbers <= 1e4 after scaling: 1e-11 is
    # float64 rounding times that, with margin (measured: <= 2e-14)
    want, gram = _reference(steps, gammas, tr, gr, gram=True)
    torch.testing.assert_close(x, want, rtol=0, atol=1e-11)
    torch.testing.assert_close(P.profile_gram(steps, gammas), gram, rtol=1e-12, atol=0)


def _one_hot_weights(gammas, snap_every: int, last: int) -> dict:
    """Run ema_fused.EMA(schedule=karras_power(g)) for each g on the trajectory theta_k = e_k
    (the k-th unit vector at step k): after n updates the shadow *is* the vector of the
    per-step weights w_k of its average.  Returns {(n, g): weights} every ``snap_every``."""
    p = torch.zeros(last, dtype=F64)
    emas = {g: EMA([p], schedule=karras_power(gamma=g), dtype=None) for g in gammas}
    out = {}
    for n in range(1, last + 1):
        p.zero_()
        p[n - 1] = 1.0
        for g, ema in emas.items():
            ema.update()
            if n % snap_every == 0:
                out[(n, g)] = next(iter(ema.named_shadows()))[1].clone()
    return out


def test_karras_power_ema_is_eq1_at_t_equal_to_n():
    """The convention: n updates of decay (1 - 1/n)^(g+1), decay(1) = 0, weigh step k by the
    integral of p_{n,g} over (k-1, k], exactly (no offset)."""
    w = _one_hot_weights((G05, G10, -0.3), 150, 600)
    k = torch.arange(1, 601, dtype=F64)
    for (n, g), got in w.items():
        want = torch.where(k <= n, (k.clamp(max=n) ** (g + 1) - (k.clamp(max=n) - 1) ** (g + 1))
                           / n ** (g + 1), torch.zeros_like(k))
        torch.testing.assert_close(got, want, rtol=0, atol=1e-13)
        assert float(got.sum()) == pytest.approx(1.0, abs=1e-12)


def test_coefficients_fit_the_discrete_weights_as_well_as_their_own_least_squares():
    """Against the discrete formulation: the l2 least-squares fit of the target's per-step
    weights by the snapshots' per-step weights (all read off ema_fused.EMA)."""
    w = _one_hot_weights((G05, G10, G075), 100, 2000)
    keys = [k for k in w if k[1] != G075]
    cols = torch.stack([w[k] for k in keys], 1)
    target = w[(2000, G075)]
    xd = torch.linalg.lstsq(cols, target[:, None]).solution[:, 0]
    x = P.solve_coefficients([k[0] for k in keys], [k[1] for k in keys], 2000, G075)
    # the two objectives differ by the per-step discretisation, O(1/t) with t >= 100:
    # measured 1.6e-6 apart
    torch.testing.assert_close(x, xd / xd.sum(), rtol=0, atol=2e-5)
    # and ours fits the per-step weights almost as well as their own optimum (measured
    # 1.0001 times its residual, the normalisation included)
    best = (cols @ xd - target).norm()
    assert (cols @ x - target).norm() <= best * (1 + 1e-3)
    assert best / target.norm() < 3e-3  # and the fit itself is good


@pytest.mark.parametrize("name", sorted(LAYOUTS))
def test_a_target_that_is_a_snapshot_gives_the_one_hot_vector(name):
    steps, gammas, _, _ = LAYOUTS[name]
    for j in sorted({0, len(steps) // 2, len(steps) - 1}):
        x = P.solve_coefficients(steps, gammas, steps[j], gammas[j])
        torch.testing.assert_close(x, torch.eye(len(steps), dtype=F64)[j], rtol=0, atol=1e-9)
        assert P.reconstruction_error(steps, gammas, steps[j], gammas[j], x) < 1e-6


def test_repeated_snapshot_splits_its_weight_and_the_fit_is_unchanged():
    steps, gammas, tr, gr = LAYOUTS["two_profiles_every_100"]
    x = P.solve_coefficients(steps, gammas, tr, gr)
    x2 = P.solve_coefficients(steps + [steps[10]], gammas + [gammas[10]], tr, gr)
    # the Gram matrix is singular now; the minimum-norm solution halves the repeated one
    torch.testing.assert_close(x2[10], x2[-1], rtol=0, atol=1e-9)
    merged = x2[:-1].clone()
    merged[10] += x2[-1]
    torch.testing.assert_close(merged, x, rtol=0, atol=1e-8)


@pytest.mark.parametrize("name", sorted(LAYOUTS))
def test_normalisation_changes_the_fit_by_its_own_error(name):
    steps, gammas, tr, gr = LAYOUTS[name]
    raw = P.solve_coefficients(steps, gammas, tr, gr, normalize=False)
    x = P.solve_coefficients(steps, gammas, tr, gr)
    torch.testing.assert_close(x, raw / raw.sum(), rtol=1e-14, atol=0)
    err = P.reconstruction_error(steps, gammas, tr, gr, raw)
    bound = err * (gr + 1) / math.sqrt(2 * gr + 1) * math.sqrt(max(steps) / tr)
    assert abs(1 - float(raw.sum())) <= bound * (1 + 1e-6) + 1e-12
    # the raw solution is the least-squares optimum: rescaling never fits better
    assert err <= P.reconstruction_error(steps, gammas, tr, gr, x) + 1e-12


def test_sigma_rel_forms_match_the_gamma_form():
    steps, gammas, tr, _ = LAYOUTS["two_profiles_every_100"]
    sig = [0.05 if g == G05 else 0.10 for g in gammas]
    want = P.solve_coefficients(steps, gammas, tr, G075)
    assert torch.equal(P.solve_coefficients_sigma(steps, sig, tr, 0.075), want)
    pairs = list(zip(steps, gammas))
    assert torch.equal(P.synthesis_coefficients(pairs, sigma_rel=0.075), want)
    assert torch.equal(P.synthesis_coefficients(pairs, gamma=G075, step=tr), want)


def test_synthesis_coefficients_uses_only_snapshots_up_to_the_step():
    steps, gammas = _two(100, 2000)
    order = torch.randperm(len(steps), generator=torch.Generator().manual_seed(3)).tolist()
    pairs = [(steps[i], gammas[i]) for i in order]  # any order, profiles mixed
    x = P.synthesis_coefficients(pairs, sigma_rel=0.075, step=1200)
    used = [i for i, (s, _) in enumerate(pairs) if s <= 1200]
    assert len(used) == 24 and torch.all(x[[i for i in range(len(pairs)) if i not in used]] == 0)
    want = _reference([pairs[i][0] for i in used], [pairs[i][1] for i in used], 1200, G075)
    torch.testing.assert_close(x[used], want, rtol=0, atol=1e-11)
    # between two snapshot steps: no snapshot it may use has seen steps 1201..1234
    with pytest.raises(ValueError, match="step 1234 comes after the last snapshot.*1200"):
        P.synthesis_coefficients(pairs, sigma_rel=0.075, step=1234)


@pytest.mark.parametrize("call, match", [
    (lambda: P.solve_coefficients([], [], 10, 1.0), "no snapshots"),
    (lambda: P.solve_coefficients([10, 20], [1.0], 10, 1.0), "2 snapshot steps but 1 gammas"),
    (lambda: P.solve_coefficients([10, 20], [1.0, 2.0], 21, 1.0), "outside the snapshots"),
    (lambda: P.solve_coefficients([10, 20], [1.0, 2.0], 9, 1.0), "outside the snapshots"),
    (lambda: P.solve_coefficients([10, 20], [1.0, -1.0], 15, 1.0), r"snapshot_gammas\[1\].*> -1"),
    (lambda: P.solve_coefficients([10, 20], [1.0, 2.0], 15, -1.5), "target_gamma.*> -1"),
    (lambda: P.solve_coefficients([10, 20], [1.0, -0.7], 15, 1.0), "not square-integrable"),
    (lambda: P.solve_coefficients([10, 0], [1.0, 2.0], 5, 1.0), r"snapshot_steps\[1\] must be > 0"),
    (lambda: P.solve_coefficients([10, float("nan")], [1.0, 2.0], 5, 1.0), r"snapshot_steps\[1\]"),
    (lambda: P.solve_coefficients([10, 20], [1.0, 2.0], "15", 1.0), "target_step must be a real"),
    (lambda: P.solve_coefficients([10, 20], [1.0, 1e200], 10, 1.0), "not finite.*ill-conditioned"),
    (lambda: P.profile_inner(1, 1.0, 2, True), "gamma_b must be a real"),
    (lambda: P.synthesis_coefficients([(10, 1.0)], gamma=1.0, sigma_rel=0.1), "exactly one"),
    (lambda: P.synthesis_coefficients([], gamma=1.0), "no snapshots"),
    (lambda: P.synthesis_coefficients([(10, 1.0), (20,)], gamma=1.0), r"snapshots\[1\]"),
    (lambda: P.synthesis_coefficients([(10, 1.0), (20, 2.0)], gamma=1.0, step=5), "before the first"),
    (lambda: P.synthesis_coefficients([(10, 1.0), (20, -2.0)], gamma=1.0, step=15), r"snapshots\[1\] gamma"),
    (lambda: P.reconstruction_error([10, 20], [1.0, 2.0], 15, 1.0, [1.0]), "1 coefficients for 2"),
])
def test_bad_input_raises_a_clear_error(call, match):
    with pytest.raises((ValueError, TypeError), match=match):
        call()
