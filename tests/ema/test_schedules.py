"""Each schedule against its documented formula, and its argument checks."""
from __future__ import annotations

import math
import pickle

import pytest

from ema_fused import schedules as S

NS = [1, 2, 3, 10, 57, 1000, 123457]


@pytest.mark.parametrize("sched,formula", [
    (S.constant(0.999), lambda n: 0.999),
    (S.num_updates_warmup(0.9999), lambda n: min(0.9999, (1 + n) / (10 + n))),
    (S.tau_ramp(0.9999, tau=2000), lambda n: 0.9999 * (1 - math.exp(-n / 2000))),
    (S.power_warmup(0.9999), lambda n: 0.0 if n <= 1 else
     min(0.9999, max(0.0, 1 - (1 + (n - 1)) ** (-2 / 3)))),
    (S.power_warmup(0.999, inv_gamma=10, power=0.75, min_decay=0.5), lambda n: 0.0 if n <= 1 else
     min(0.999, max(0.5, 1 - (1 + (n - 1) / 10) ** -0.75))),
    (S.half_life(100), lambda n: 0.5 ** (1 / 100)),
    (S.karras_power(gamma=16.97), lambda n: (1 - 1 / n) ** 17.97),
    (S.swa(), lambda n: (n - 1) / n),
])
def test_formula(sched, formula):
    for n in NS:
        assert sched(n) == pytest.approx(formula(n), rel=1e-15, abs=1e-15), (sched, n)
        assert 0.0 <= sched(n) <= 1.0


def test_first_update_copies_for_warmup_schedules():
    for sched in (S.power_warmup(0.99), S.karras_power(gamma=7), S.swa()):
        assert sched(1) == 0.0


def test_half_life_halves_the_weight_of_old_samples():
    d = S.half_life(37)(1)
    assert d ** 37 == pytest.approx(0.5, rel=1e-12)


@pytest.mark.parametrize("sigma_rel", [0.01, 0.05, 0.1, 0.2, 0.28])
def test_sigma_rel_to_gamma_solves_the_edm2_relation(sigma_rel):
    g = S.sigma_rel_to_gamma(sigma_rel)
    assert g > -1
    assert (g + 1) / ((g + 2) ** 2 * (g + 3)) == pytest.approx(sigma_rel ** 2, rel=1e-10)
    assert S.karras_power(sigma_rel=sigma_rel).gamma == g


@pytest.mark.parametrize("make", [
    lambda: S.constant(1.01), lambda: S.constant(float("nan")), lambda: S.num_updates_warmup(-0.1),
    lambda: S.tau_ramp(0.9, tau=0), lambda: S.power_warmup(0.9, inv_gamma=-1),
    lambda: S.power_warmup(0.9, min_decay=0.95), lambda: S.half_life(0),
    lambda: S.half_life(float("inf")), lambda: S.karras_power(), lambda: S.karras_power(1, 0.1),
    lambda: S.karras_power(gamma=-1), lambda: S.sigma_rel_to_gamma(0.0),
    lambda: S.sigma_rel_to_gamma(5.0),
])
def test_bad_arguments_raise(make):
    with pytest.raises(ValueError):
        make()


def test_repr_equality_and_pickling():
    a = S.power_warmup(0.999, power=0.75)
    assert repr(a) == "power_warmup(d=0.999, inv_gamma=1.0, power=0.75, min_decay=0.0)"
    assert a == S.power_warmup(0.999, power=0.75) and a != S.power_warmup(0.999)
    assert hash(a) == hash(S.power_warmup(0.999, power=0.75))
    b = pickle.loads(pickle.dumps(a))
    assert b == a and b(50) == a(50)


@pytest.mark.parametrize("sched", [
    S.constant(0.999), S.num_updates_warmup(0.9999), S.tau_ramp(0.9999, tau=20),
    S.power_warmup(0.999, inv_gamma=10, power=0.75, min_decay=0.5), S.power_warmup(0.9),
    S.half_life(100), S.karras_power(gamma=16.97), S.swa(),
], ids=repr)
def test_tensor_form_matches_the_python_form(sched):
    import torch
    n = torch.tensor([float(x) for x in [1, 2, 3, 10, 57, 1000, 123457]], dtype=torch.float64)
    got = sched.decay_tensor(n)
    assert got.dtype == torch.float64 and got.shape == n.shape
    for value, k in zip(got.tolist(), [1, 2, 3, 10, 57, 1000, 123457]):
        assert value == pytest.approx(sched(k), rel=1e-14, abs=1e-15)
