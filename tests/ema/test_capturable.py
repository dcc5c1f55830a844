"""EMA(capturable=True): the same results as the host-side EMA, from device-side counters.

Graph capture itself needs a GPU (tests/ema/test_gpu.py); here the device-side rules are
checked on the CPU against the ordinary EMA, with the foreach and Triton backends.
"""
from __future__ import annotations

import io

import pytest
import torch

from ema_fused import EMA, available_backends, schedules

from helpers.ema_reference import make_model, train_step

CONFIGS = {
    "constant": dict(decay=0.9),
    "warmup-after-3-every-2": dict(schedule=schedules.power_warmup(0.95, power=0.75),
                                   update_after_step=3, update_every=2),
    "num-updates": dict(schedule=schedules.num_updates_warmup(0.99)),
    "karras": dict(schedule=schedules.karras_power(gamma=6.94)),
    "swa-bias": dict(schedule=schedules.swa(), bias_correction=True),
    "tau-bias-after-2": dict(schedule=schedules.tau_ramp(0.95, tau=3), update_after_step=2,
                             bias_correction=True),
}
BACKENDS = ["foreach"] + (["triton"] if available_backends("cpu")["triton"][0] else [])


@pytest.mark.parametrize("name", CONFIGS)
@pytest.mark.parametrize("backend", BACKENDS)
def test_capturable_matches_the_host_side_ema(name, backend):
    model = make_model(torch.bfloat16)
    host = EMA(model, backend="foreach", **CONFIGS[name])
    dev = EMA(model, backend=backend, capturable=True, **CONFIGS[name])
    gen = torch.Generator().manual_seed(3)
    for _ in range(9):
        train_step(model, gen)
        host.update()
        dev.update()
        assert dev.num_updates == host.num_updates
        assert (dev.decay is None) == (host.decay is None)
        if host.decay is not None:
            assert dev.decay == pytest.approx(host.decay, abs=1e-12)
    a, b = host.averaged_weights(), dev.averaged_weights()
    for n in a:
        torch.testing.assert_close(b[n], a[n], rtol=2e-6, atol=2e-6)


def test_capturable_checkpoint_round_trip():
    model = make_model()
    ema = EMA(model, schedule=schedules.tau_ramp(0.9, tau=2), capturable=True)
    gen = torch.Generator().manual_seed(0)
    for _ in range(4):
        train_step(model, gen)
        ema.update()
    buf = io.BytesIO()
    torch.save(ema.state_dict(), buf)
    buf.seek(0)
    sd = torch.load(buf, weights_only=True)
    assert sd["step"] == 4 and isinstance(sd["decay"], float)
    other = EMA(model, schedule=schedules.tau_ramp(0.9, tau=2), capturable=True)
    step_tensor = other._device_schedule.step
    other.load_state_dict(sd)
    assert other._device_schedule.step is step_tensor  # loaded in place: graph addresses kept
    host = EMA(model, schedule=schedules.tau_ramp(0.9, tau=2))
    host.load_state_dict(sd)
    for _ in range(3):
        train_step(model, gen)
        other.update()
        host.update()
    for (n, s), (_, t) in zip(other.named_shadows(), host.named_shadows()):
        torch.testing.assert_close(s, t, rtol=1e-6, atol=1e-6)


def test_capturable_refuses_what_it_cannot_do():
    with pytest.raises(TypeError, match="capturable=True needs a schedule from ema_fused"):
        EMA(make_model(), schedule=lambda n: 0.9, capturable=True)
    ema = EMA(make_model(), decay=0.9, capturable=True)
    with pytest.raises(ValueError, match="without a step"):
        ema.update(5)
    assert ema.decay is None and ema.num_updates == 0
