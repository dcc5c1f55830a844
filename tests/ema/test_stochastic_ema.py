"""``EMA(dtype=torch.bfloat16, rounding="stochastic")``: a 16-bit shadow that follows a
float64 EMA of the same trajectory where the nearest-rounded one freezes; reproducible
from (seed, step), resumable bit for bit, checkpointed with its seed."""
from __future__ import annotations

import io

import pytest
import torch

from ema_fused import EMA, PostHocEMA

from helpers.numerics import seeded

N = 2048  # elements of the trajectory test per scale, vectorised: one tensor per scale


def _trajectory(steps: int, gen: torch.Generator):
    """A bf16 model whose params drift slowly (about 16 ulps over the run) with noise of
    about two ulps, at three scales: the params at every step, made lazily."""
    base = [torch.rand(N, generator=gen, dtype=torch.float64) * 0.5 + 1.0, ]
    base = [b * scale for b in base for scale in (1.0, 37.0, 0.003)]
    drift = [torch.randn(N, generator=gen, dtype=torch.float64) * (0.16 / steps) * b for b in base]
    for t in range(steps):
        noise = [torch.randn(N, generator=gen, dtype=torch.float64) * 0.015 * b for b in base]
        yield [(b + d * t + z).to(torch.bfloat16) for b, d, z in zip(base, drift, noise)]


def _ulp(x: torch.Tensor) -> torch.Tensor:
    """One bf16 ulp at each value (the spacing of bf16 numbers there)."""
    return 2.0 ** (torch.floor(torch.log2(x.abs())) - 7)


@pytest.mark.parametrize("decay,steps", [(0.999, 4000), (0.9999, 10000)])
def test_stochastic_bf16_shadow_tracks_a_float64_ema_where_nearest_freezes(decay, steps):
    """Thousands of steps: the stochastically rounded shadow stays within a few bf16 ulps
    of the float64 EMA of the same bf16 params, with a mean error near zero; the
    nearest-rounded bf16 shadow never moves from its start (every step is under half an
    ulp) and falls behind by many ulps."""
    gen = seeded("trajectory", decay)
    traj = _trajectory(steps, gen)
    first = next(traj)
    model = [p.clone() for p in first]
    sr = EMA(model, decay=decay, dtype=torch.bfloat16, rounding="stochastic", seed=1234,
             backend="cpu")
    nearest = EMA(model, decay=decay, dtype=torch.bfloat16, backend="cpu")
    ref = [p.double() for p in first]
    start = [s.clone() for _, s in nearest.named_shadows()]
    for params in traj:
        for m, p in zip(model, params):
            m.copy_(p)
        sr.update()
        nearest.update()
        ref = [r + (1 - decay) * (p.double() - r) for r, p in zip(ref, params)]
    err = torch.cat([(s.double() - r) / _ulp(r) for (_, s), r in zip(sr.named_shadows(), ref)])
    # recorded (README): 0.999: |error| mean 1.34, rms 1.80, max 14.7, mean -0.019 ulps;
    # 0.9999: 1.68, 2.25, 13.3, 0.025 (the nearest shadow: 18.6 and 8.8 ulps behind)
    assert err.abs().mean() < 2 and err.pow(2).mean().sqrt() < 3 and err.abs().max() < 20
    assert abs(err.mean()) < 0.1  # unbiased
    frozen = [s for _, s in nearest.named_shadows()]
    assert all(torch.equal(f, s0) for f, s0 in zip(frozen, start))
    lag = torch.cat([(f.double() - r) / _ulp(r) for f, r in zip(frozen, ref)])
    assert lag.abs().mean() > 4 * err.abs().mean()


def _model(gen):
    return [torch.randn(n, generator=gen).to(torch.bfloat16) for n in (3, 4097, 10000)]


def _steps(model, gen, steps):
    for t in range(steps):
        for p in model:
            p.add_(torch.randn(p.shape, generator=gen).to(p.dtype), alpha=0.01)
        yield t + 1


def _shadows(ema):
    return [s.clone() for _, s in ema.named_shadows()]


def test_same_seed_same_run_other_seed_other_run_and_the_step_keys_the_bits():
    runs = {}
    for seed in (5, 5, 6):
        gen = seeded("runs")
        model = _model(gen)
        ema = EMA(model, decay=0.99, dtype=torch.bfloat16, rounding="stochastic", seed=seed,
                  backend="cpu")
        for step in _steps(model, gen, 20):
            ema.update()
        runs.setdefault(seed, []).append(_shadows(ema))
    assert all(torch.equal(a, b) for a, b in zip(*runs[5]))
    assert not all(torch.equal(a, b) for a, b in zip(runs[5][0], runs[6][0]))


@pytest.mark.parametrize("update_every", [1, 3])
def test_resume_mid_run_is_bit_identical(update_every):
    gen = seeded("resume", update_every)
    model = _model(gen)
    kw = dict(decay=0.995, dtype=torch.bfloat16, rounding="stochastic", update_every=update_every,
              update_after_step=2, backend="cpu")
    whole = EMA(model, seed=77, **kw)
    states = []
    for step in _steps(model, gen, 30):
        whole.update(step)
        states.append([p.clone() for p in model])
        if step == 13:
            buffer = io.BytesIO()
            torch.save(whole.state_dict(), buffer)
    buffer.seek(0)
    saved = torch.load(buffer, weights_only=True)
    assert saved["rounding"] == "stochastic" and saved["seed"] == 77
    resumed_model = [p.clone() for p in states[12]]
    resumed = EMA(resumed_model, **kw)  # seed=None: its own draw, replaced by the checkpoint's
    resumed.load_state_dict(saved)
    assert resumed.seed == 77
    for step, params in enumerate(states[13:], start=14):
        for m, p in zip(resumed_model, params):
            m.copy_(p)
        resumed.update(step)
    assert all(torch.equal(a, b) for a, b in zip(_shadows(resumed), _shadows(whole)))


def test_seed_none_draws_one_without_moving_torch_generator():
    torch.manual_seed(3)
    expected_next = torch.rand(1)
    torch.manual_seed(3)
    model = [torch.zeros(4, dtype=torch.bfloat16)]
    a = EMA(model, dtype=torch.bfloat16, rounding="stochastic")
    assert torch.equal(torch.rand(1), expected_next)  # the training's numbers are unchanged
    torch.manual_seed(3)
    b = EMA(model, dtype=torch.bfloat16, rounding="stochastic")
    assert isinstance(a.seed, int) and a.seed == b.seed  # reproducible under manual_seed
    assert EMA(model, dtype=torch.bfloat16).seed is None
    assert EMA(model, dtype=torch.bfloat16).state_dict()["rounding"] == "nearest"


def test_checkpoint_rounding_fields():
    """A nearest checkpoint (or one older than these fields) loads into a stochastic EMA,
    which keeps its seed; a stochastic one gives its seed to a stochastic EMA only."""
    model = [torch.randn(10).to(torch.bfloat16)]
    sr = EMA(model, dtype=torch.bfloat16, rounding="stochastic", seed=1)
    nearest = EMA(model, dtype=torch.bfloat16)
    old = nearest.state_dict()
    for key in ("rounding", "seed"):
        del old[key]
    sr.load_state_dict(old)
    sr.load_state_dict(nearest.state_dict())
    assert sr.seed == 1 and sr.rounding == "stochastic"
    other = EMA(model, dtype=torch.bfloat16, rounding="stochastic", seed=2)
    sr.load_state_dict(other.state_dict())
    assert sr.seed == 2
    nearest.load_state_dict(other.state_dict())
    assert nearest.seed is None and nearest.rounding == "nearest"
    bad = other.state_dict()
    bad["seed"] = -1
    with pytest.raises(ValueError, match=r"seed must be an integer in \[0, 2\*\*64\)"):
        sr.load_state_dict(bad)
    bad = nearest.state_dict()
    bad["rounding"] = "down"
    with pytest.raises(ValueError, match="rounding must be 'nearest' or 'stochastic'"):
        sr.load_state_dict(bad)
    assert sr.seed == 2


def test_construction_errors():
    bf16 = [torch.zeros(4, dtype=torch.bfloat16)]
    with pytest.raises(ValueError, match="rounds into bfloat16 or float16 shadows; dtype=torch.float32"):
        EMA(bf16, rounding="stochastic")  # dtype defaults to float32
    with pytest.raises(ValueError, match="this model's averaged tensors have none"):
        EMA([torch.zeros(4)], dtype=None, rounding="stochastic")
    with pytest.raises(ValueError, match="not supported with capturable=True"):
        EMA(bf16, dtype=torch.bfloat16, rounding="stochastic", capturable=True)
    with pytest.raises(ValueError, match="seed= is for rounding='stochastic'"):
        EMA(bf16, dtype=torch.bfloat16, seed=3)
    with pytest.raises(ValueError, match="rounding must be 'nearest' or 'stochastic'"):
        EMA(bf16, dtype=torch.bfloat16, rounding="random")


def test_copy_steps_are_exact_and_mixed_models_round_only_their_16bit_shadows():
    gen = seeded("mixed")
    model = [torch.randn(300, generator=gen).to(torch.bfloat16), torch.randn(300, generator=gen)]
    ema = EMA(model, decay=0.9, dtype=None, rounding="stochastic", seed=9, update_after_step=1,
              backend="cpu")
    twin = EMA(model, decay=0.9, dtype=None, update_after_step=1, backend="cpu")
    for step in _steps(model, gen, 3):
        ema.update(step)
        twin.update(step)
        if step == 1:  # a copy step: exactly the params
            assert all(torch.equal(s, p) for (_, s), p in zip(ema.named_shadows(), model))
    (_, sr16), (_, sr32) = ema.named_shadows()
    (_, n16), (_, n32) = twin.named_shadows()
    assert torch.equal(sr32, n32)  # float32 shadows: nothing to round, as nearest
    assert not torch.equal(sr16, n16)


def test_posthoc_profiles_in_bf16_are_k_stochastic_emas():
    """PostHocEMA(rounding="stochastic") keeps its K profiles in bf16 and updates them in
    one multi-shadow pass; profile k equals an EMA of seed + k with its schedule."""
    gen = seeded("posthoc")
    model = _model(gen)
    ph = PostHocEMA(model, sigma_rels=(0.05, 0.1, 0.2), dtype=torch.bfloat16,
                    rounding="stochastic", seed=40, backend="cpu")
    schedules = ph._leader.schedule.profiles  # profile k's power-function schedule
    singles = [EMA(model, schedule=schedules[k], dtype=torch.bfloat16, rounding="stochastic",
                   seed=40 + k, backend="cpu") for k in range(3)]
    for step in _steps(model, gen, 12):
        ph.update()
        for e in singles:
            e.update()
    for k, e in enumerate(singles):
        assert ph._emas[k].seed == 40 + k
        got = [s for _, s in ph._emas[k].named_shadows()]
        assert all(g.dtype == torch.bfloat16 for g in got)
        assert all(torch.equal(g, w) for g, w in zip(got, _shadows(e)))
    state = ph.state_dict()
    again = PostHocEMA(model, sigma_rels=(0.05, 0.1, 0.2), dtype=torch.bfloat16,
                       rounding="stochastic", backend="cpu")
    again.load_state_dict(state)
    assert [e.seed for e in again._emas] == [40, 41, 42]


@pytest.mark.parametrize("non_blocking", [False, True])
def test_host_shadows_and_cut_pieces_draw_the_bits_of_the_whole_tensor(monkeypatch, non_blocking):
    """Shadows on the host (``device="cpu"``, the offload's pieces: a tensor cut into
    slices keeps its position, each slice starts at its first element's index) give the
    bits of an EMA beside the model, step for step."""
    from ema_fused.ema import offload_layout
    monkeypatch.setattr(offload_layout, "PIECE_BYTES", 256 << 10)  # cut the 300k tensor
    gen = seeded("host", non_blocking)
    model = [torch.randn(n, generator=gen).to(torch.bfloat16) for n in (5, 300001, 7000)]
    kw = dict(decay=0.99, dtype=torch.bfloat16, rounding="stochastic", seed=21, backend="cpu")
    beside = EMA(model, **kw)
    host = EMA(model, device="cpu", non_blocking=non_blocking, **kw)
    for step in _steps(model, gen, 4):
        beside.update()
        host.update()
    host.wait()
    assert all(torch.equal(a, b) for a, b in zip(_shadows(host), _shadows(beside)))
