"""Checkpoints written by an earlier release keep loading: an ``EMA`` and a
``PostHocEMA`` ``state_dict()`` saved at commit 5812783 (before the package was
regrouped into subpackages), by tests/data/make_legacy_checkpoints.py."""
from __future__ import annotations

import importlib.util
import os

import torch

from ema_fused import EMA, PostHocEMA

DATA = os.path.join(os.path.dirname(os.path.abspath(__file__)), "data")


def _maker():
    spec = importlib.util.spec_from_file_location(
        "make_legacy_checkpoints", os.path.join(DATA, "make_legacy_checkpoints.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _saved() -> dict:
    return torch.load(os.path.join(DATA, "legacy_checkpoints.pt"), weights_only=True)


def test_ema_checkpoint_from_an_earlier_release_loads_and_resumes():
    maker, saved = _maker(), _saved()
    model = maker.build_model()
    ema = EMA(model, decay=0.9, update_after_step=1, bias_correction=True)
    ema.load_state_dict(saved["ema"])
    shadows = dict(ema.named_shadows())
    assert shadows.keys() == saved["ema_shadows"].keys()
    for name, expected in saved["ema_shadows"].items():
        assert torch.equal(shadows[name], expected), name
    assert ema.num_updates == saved["ema"]["step"] == 5
    # resuming continues the same trajectory: one more step, then against a float64 lerp
    before = {k: v.double() for k, v in shadows.items() if v.is_floating_point()}
    maker.drift(model, 6)
    ema.update(6)
    params = dict(model.state_dict())
    after = dict(ema.named_shadows())
    for name, old in before.items():
        want = old + 0.1 * (params[name].double() - old)
        assert torch.allclose(after[name].double(), want, rtol=1e-6, atol=1e-7), name
    assert torch.equal(after["1.num_batches_tracked"], params["1.num_batches_tracked"])


def test_posthoc_checkpoint_from_an_earlier_release_loads():
    maker, saved = _maker(), _saved()
    model = maker.build_model()
    phema = PostHocEMA(model, sigma_rels=(0.05, 0.2), snapshot_every=2)
    phema.load_state_dict(saved["phema"])
    assert phema.num_updates == 5
    assert phema.snapshot_steps == (2, 4)
    for k, expected in enumerate(saved["phema_shadows"]):
        got = dict(phema.named_shadows(k))
        assert got.keys() == expected.keys()
        for name, tensor in expected.items():
            assert torch.equal(got[name], tensor), (k, name)
    synthesized = phema.synthesize(0.1)
    assert synthesized.keys() == saved["phema_synthesized"].keys()
    for name, tensor in saved["phema_synthesized"].items():
        assert torch.equal(synthesized[name], tensor), name
