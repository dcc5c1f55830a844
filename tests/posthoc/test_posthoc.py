"""``PostHocEMA`` profiles: each one equals a separate ``EMA(model,
schedule=karras_power(sigma_rel=s))`` on the same trajectory, bit for bit on the same
backend, through checkpoint round trips, step rules and model changes too."""
from __future__ import annotations

import copy
import io

import pytest
import torch
from torch import nn

from ema_fused import EMA, ModelChangedError, PostHocEMA
from ema_fused.schedules import karras_power

from helpers.posthoc_utils import Net, assert_profiles_equal, separate, train_step

SIGMAS = (0.05, 0.10, 0.20)


@pytest.mark.parametrize("backend", ["foreach", "cpu", "triton"])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32, torch.float16])
def test_each_profile_equals_a_separate_ema(backend, dtype):
    model = Net(dtype, width=5 if backend == "triton" else 13)
    phema = PostHocEMA(model, SIGMAS, backend=backend)
    refs = separate(model, SIGMAS, backend=backend)
    gen = torch.Generator().manual_seed(1)
    for _ in range(12 if backend == "triton" else 25):
        train_step(model, gen)
        phema.update()
        for ref in refs:
            ref.update()
        assert_profiles_equal(phema, refs)
    assert phema.backend == backend
    # the profiles really differ from each other and from the model
    a, b = phema.named_shadows(0)["mid.weight"], phema.named_shadows(2)["mid.weight"]
    assert not torch.equal(a, b) and a.dtype == torch.float32
    assert not torch.equal(a, model.mid.weight.float())
    # the int buffer is copied, never averaged; the tied name is the same shadow
    shadows = phema.named_shadows(1)
    assert shadows["bn.num_batches_tracked"].item() == model.bn.num_batches_tracked.item()
    assert shadows["head.weight"] is shadows["emb.weight"]


@pytest.mark.parametrize("backend", ["foreach", "cpu"])
def test_explicit_steps_update_every_and_update_after_step(backend):
    model = Net()
    kwargs = dict(update_every=1, update_after_step=3, backend=backend)
    phema = PostHocEMA(model, SIGMAS, **kwargs)
    refs = separate(model, SIGMAS, **kwargs)
    gen = torch.Generator().manual_seed(2)
    for step in [1, 2, 2, 4, 5, 9, 10, 10, 11, 15]:  # repeats do nothing, gaps are fine
        train_step(model, gen)
        phema.update(step=step)
        for ref in refs:
            ref.update(step=step)
        assert_profiles_equal(phema, refs)
    with pytest.raises(ValueError, match="comes before the last step 15"):
        phema.update(step=14)
    assert phema.num_updates == 15


def test_update_every_counts_averages_for_the_power_function():
    """With update_every=k the j-th averaging uses karras_power's decay at j (so the
    profile stays a power function): the same as a plain EMA updated with step=j at
    the averaged steps only.  Steps <= update_after_step copy."""
    model = Net(torch.float32)
    phema = PostHocEMA(model, SIGMAS, update_every=3, update_after_step=4)
    refs = separate(model, SIGMAS)
    gen = torch.Generator().manual_seed(3)
    for step in range(1, 40):
        train_step(model, gen)
        before = phema.named_shadows(0)["mid.weight"].clone()
        phema.update()
        changed = not torch.equal(before, phema.named_shadows(0)["mid.weight"])
        assert changed == (step % 3 == 0), step
        if step % 3 == 0 and step > 4:
            j = step // 3 - 4 // 3
            for ref in refs:
                ref.update(step=j)
            for k, ref in enumerate(refs):
                ours = phema.named_shadows(k)
                for name, t in ref.named_shadows():
                    assert torch.equal(ours[name], t), (step, k, name)
    assert phema._emas[0].decay == karras_power(sigma_rel=SIGMAS[0])(12)


@pytest.mark.parametrize("backend", ["foreach", "cpu"])
@pytest.mark.parametrize("in_memory", [True, False])
def test_state_dict_round_trip_resumes_bit_for_bit(backend, in_memory, tmp_path):
    model = Net()
    folder = None if in_memory else tmp_path / "snaps"
    phema = PostHocEMA(model, SIGMAS, snapshot_every=4, snapshot_dir=folder, backend=backend)
    refs = separate(model, SIGMAS, backend=backend)
    gen = torch.Generator().manual_seed(4)
    for _ in range(10):
        train_step(model, gen)
        phema.update()
        [r.update() for r in refs]
    buf = io.BytesIO()
    torch.save({"model": model.state_dict(), "phema": phema.state_dict()}, buf)
    buf.seek(0)
    ckpt = torch.load(buf, weights_only=True)
    # a fresh process: a new model from the checkpoint, a new PostHocEMA loaded from it
    model2 = Net()
    model2.load_state_dict(ckpt["model"])
    resumed = PostHocEMA(model2, SIGMAS, snapshot_every=4, snapshot_dir=folder, backend=backend)
    resumed.load_state_dict(ckpt["phema"])
    assert resumed.snapshot_steps == phema.snapshot_steps == (4, 8)
    assert_profiles_equal(resumed, refs)
    gen2 = copy.deepcopy(gen)
    for _ in range(7):
        train_step(model, gen)
        train_step(model2, gen2)
        phema.update()
        resumed.update()
        [r.update() for r in refs]
        assert_profiles_equal(resumed, refs)
        assert_profiles_equal(phema, refs)
    assert resumed.snapshot_steps == (4, 8, 12, 16)
    for a, b in zip(phema.synthesize(0.15).values(), resumed.synthesize(0.15).values()):
        assert torch.equal(a, b)


def test_load_state_dict_checks_everything_before_writing(tmp_path):
    model = Net()
    phema = PostHocEMA(model, SIGMAS, snapshot_dir=tmp_path)
    gen = torch.Generator().manual_seed(5)
    for _ in range(3):
        train_step(model, gen)
        phema.update()
    phema.snapshot()
    good = phema.state_dict()
    before = [{n: t.clone() for n, t in phema.named_shadows(k).items()} for k in range(3)]

    def unchanged():
        for k in range(3):
            for n, t in phema.named_shadows(k).items():
                assert torch.equal(t, before[k][n]), (k, n)
        assert phema.num_updates == 3

    bad = copy.deepcopy(good)
    bad["profiles"][2]["shadows"]["mid.weight"] = torch.zeros(2, 2)  # only the last is bad
    bad["profiles"][0]["step"] = 99
    with pytest.raises(ValueError, match=r"profile 2: shadow 'mid.weight' has shape"):
        phema.load_state_dict(bad)
    unchanged()
    other = PostHocEMA(model, (0.05, 0.11, 0.2)).state_dict()
    with pytest.raises(ValueError, match=r"sigma_rels=\[0.05, 0.11, 0.2\], this PostHocEMA"):
        phema.load_state_dict(other)
    bad = copy.deepcopy(good)
    bad["profiles"][0]["step"] = 99
    (tmp_path / "phema-0000000003.pt").unlink()
    with pytest.raises(FileNotFoundError, match="phema-0000000003.pt"):
        phema.load_state_dict(bad)
    unchanged()
    with pytest.raises(ValueError, match="has no snapshot_dir"):
        PostHocEMA(model, SIGMAS).load_state_dict(good)
    with pytest.raises(ValueError, match="not an ema_fused PostHocEMA"):
        phema.load_state_dict(phema._emas[0].state_dict())


@pytest.mark.parametrize("backend", ["foreach", "cpu"])
def test_model_changes_are_followed_by_every_profile(backend):
    """A replaced parameter storage and a model moved to another dtype rebuild every
    profile's plan; an added tensor is refused as EMA refuses it."""
    model = Net()
    phema = PostHocEMA(model, SIGMAS, backend=backend)
    refs = separate(model, SIGMAS, backend=backend)
    gen = torch.Generator().manual_seed(6)

    def steps(n):
        for _ in range(n):
            train_step(model, gen)
            phema.update()
            [r.update() for r in refs]
            assert_profiles_equal(phema, refs)

    steps(3)
    model.mid.weight.data = model.mid.weight.data.clone()  # new storage, same values
    steps(2)
    model.to(torch.float32)
    steps(2)
    phema.copy_to(1, copy.deepcopy(model))  # a read of one profile, then updates again
    steps(2)
    model.mid.extra = nn.Parameter(torch.zeros(2))
    with pytest.raises(ModelChangedError, match=r"added \['mid.extra'\]"):
        phema.update()
    assert phema.num_updates == 9


def test_reads_of_one_profile():
    model = Net(torch.float32)
    phema = PostHocEMA(model, SIGMAS)
    gen = torch.Generator().manual_seed(7)
    for _ in range(5):
        train_step(model, gen)
        phema.update()
    live = {n: t.clone() for n, t in model.state_dict().items()}
    avg = {n: t.clone() for n, t in phema.named_shadows(2).items()}
    with phema.average_parameters(2):
        for n, t in model.state_dict().items():
            assert torch.equal(t, avg[n]), n
        with pytest.raises(RuntimeError, match="not allowed inside average_parameters"):
            phema.update()
    for n, t in model.state_dict().items():
        assert torch.equal(t, live[n]), n
    assert phema.num_updates == 5
    with pytest.raises(IndexError, match="profile 3 does not exist"):
        phema.named_shadows(3)
    assert phema.sigma_rels == SIGMAS
    assert phema.gammas == tuple(karras_power(sigma_rel=s).gamma for s in SIGMAS)


@pytest.mark.parametrize("kwargs, err, match", [
    (dict(decay=0.99), TypeError, "decay= is not accepted"),
    (dict(schedule=karras_power(gamma=3.0)), TypeError, "schedule= is not accepted"),
    (dict(bias_correction=True), TypeError, "no start-up bias"),
    (dict(capturable=True), TypeError, "capturable=True is not supported"),
    (dict(skip_nonfinite=True), TypeError, "skip_nonfinite= is not accepted"),
    (dict(decya=0.9), TypeError, "unknown keyword argument 'decya'"),
    (dict(sigma_rels=()), ValueError, "sigma_rels is empty"),
    (dict(sigma_rels=0.1), TypeError, "must be a sequence"),
    (dict(sigma_rels="0.1"), TypeError, "must be a sequence"),
    (dict(sigma_rels=(0.05, -0.1)), ValueError, r"sigma_rels\[1\]=-0.1"),
    (dict(sigma_rels=(0.05, 0.5)), ValueError, r"sigma_rels\[1\]=0.5.*too large"),
    (dict(sigma_rels=(0.05, "x")), TypeError, r"sigma_rels\[1\]='x'"),
    (dict(sigma_rels=(0.05, 0.1, 0.05)), ValueError, r"sigma_rels\[2\]=0.05 repeats"),
    (dict(snapshot_dtype=torch.int8), TypeError, "snapshot_dtype must be one of"),
    (dict(snapshot_dtype=torch.float8_e4m3fn), TypeError, "snapshot_dtype must be one of"),
    (dict(snapshot_dtype="float16"), TypeError, "snapshot_dtype must be one of"),
    (dict(snapshot_every=0), ValueError, "snapshot_every must be an integer >= 1"),
    (dict(snapshot_every=10, update_every=4), ValueError, "not a multiple of update_every=4"),
    (dict(update_every=0), ValueError, "update_every must be an integer >= 1"),
])
def test_bad_arguments_are_refused(kwargs, err, match):
    with pytest.raises(err, match=match):
        PostHocEMA(Net(), **kwargs)


def test_a_plain_ema_is_untouched_by_a_posthoc_ema_of_the_same_model():
    model = Net()
    ema = EMA(model, decay=0.9)
    start = {n: t.clone() for n, t in ema.named_shadows()}
    phema = PostHocEMA(model, SIGMAS)
    gen = torch.Generator().manual_seed(8)
    for _ in range(4):
        train_step(model, gen)
        phema.update()
    assert ema.num_updates == 0
    for n, t in ema.named_shadows():
        assert torch.equal(t, start[n]), n
    assert not torch.equal(start["mid.weight"], phema.named_shadows(0)["mid.weight"])
    assert isinstance(phema._emas[1], EMA) and not isinstance(phema, EMA)


@pytest.mark.parametrize("k", [1, 2, 4])
def test_the_cpu_backend_updates_all_profiles_in_one_kernel_call(k):
    """One pass: a single kernel_multi_update_ for every averaging profile (no
    kernel_update_ per profile), seen by the profiler at the dispatcher."""
    model = Net(torch.bfloat16)
    phema = PostHocEMA(model, SIGMAS[:1] + (0.07, 0.12, 0.2)[:k - 1], backend="cpu")
    phema.update()  # step 1 copies
    train_step(model, torch.Generator().manual_seed(9))
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        phema.update()
    names = [e.name for e in prof.events()]
    assert names.count("ema_fused::kernel_multi_update_") == 1, names
    assert "ema_fused::kernel_update_" not in names
