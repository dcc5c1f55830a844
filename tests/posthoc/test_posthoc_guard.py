"""``PostHocEMA`` inside ``average_parameters(k)`` and from several threads (issue 20,
items 1 and 2): what would read swapped shadows or change them is refused with a
``RuntimeError`` and changes nothing; one lock serializes the whole object, across all
K profiles."""
from __future__ import annotations

import sys
import threading

import pytest
import torch

from ema_fused import PostHocEMA

from helpers.posthoc_utils import Net, train_step

SIGMAS = (0.05, 0.10, 0.20)


def _trained(dtype: torch.dtype, backend: str = "foreach", steps: int = 6, width: int = 13):
    model = Net(dtype, width)
    phema = PostHocEMA(model, SIGMAS, backend=backend)
    gen = torch.Generator().manual_seed(3)
    for _ in range(steps):
        train_step(model, gen)
        phema.update()
    return model, phema


def _state(model):
    return {k: v.clone() for k, v in model.state_dict().items()}


def _profiles(phema):
    return [{n: t.clone() for n, t in phema.named_shadows(k).items()}
            for k in range(len(phema.profiles))]


def _assert_same(now: dict, before: dict, what: str) -> None:
    assert now.keys() == before.keys()
    for name, t in before.items():
        assert torch.equal(now[name], t), f"{what}: {name} changed"


@pytest.mark.parametrize("backend", ["foreach", "cpu"])
def test_swap_path_refuses_what_would_read_or_change_swapped_shadows(backend):
    """fp32 model, fp32 shadows: average_parameters(1) swaps profile 1's shadows with
    the model.  snapshot, copy_to, synthesize_to, update, state_dict, load_state_dict, a
    second block and profile 1's named_shadows are refused; nothing changes."""
    model, phema = _trained(torch.float32, backend)
    phema.snapshot()
    other = Net(torch.float32)
    sd = phema.state_dict()
    raw, profiles, other_raw = _state(model), _profiles(phema), _state(other)
    synthesized = phema.synthesize(0.13)
    with phema.average_parameters(1):
        for name, t in model.state_dict().items():
            assert torch.equal(t, profiles[1][name]), name  # the model holds profile 1
        refused = {
            "snapshot": phema.snapshot,
            "copy_to": lambda: phema.copy_to(0),
            "copy_to other": lambda: phema.copy_to(2, other),
            "synthesize_to": lambda: phema.synthesize_to(model, 0.13),
            "synthesize_to other": lambda: phema.synthesize_to(other, 0.13),
            "update": phema.update,
            "state_dict": phema.state_dict,
            "load_state_dict": lambda: phema.load_state_dict(sd),
            "average_parameters": lambda: phema.average_parameters(0).__enter__(),
            "same block again": lambda: phema.average_parameters(1).__enter__(),
            "named_shadows(1)": lambda: phema.named_shadows(1),
        }
        for what, call in refused.items():
            with pytest.raises(RuntimeError, match=r"average_parameters\(\)"):
                call()
                pytest.fail(f"{what} was not refused")
        # what reads no swapped shadow works and is right
        _assert_same(phema.named_shadows(0), profiles[0], "named_shadows(0)")
        _assert_same(phema.synthesize(0.13), synthesized, "synthesize")
    assert phema.snapshot_steps == (6,)
    _assert_same(_state(model), raw, "the model")
    _assert_same(_state(other), other_raw, "the other model")
    for k, before in enumerate(profiles):
        _assert_same(phema.named_shadows(k), before, f"profile {k}")
    assert phema.num_updates == 6


def test_copy_path_reads_the_right_values_and_refuses_writes():
    """bf16 model, fp32 shadows: the block copies (the shadows stay as they are), so a
    snapshot inside records the profiles; writes into the model are refused."""
    model, phema = _trained(torch.bfloat16)
    raw, profiles = _state(model), _profiles(phema)
    with phema.average_parameters(2):
        phema.snapshot()
        for what, call in {"copy_to": lambda: phema.copy_to(0),
                           "update": phema.update,
                           "average_parameters": lambda: phema.average_parameters(1).__enter__()
                           }.items():
            with pytest.raises(RuntimeError, match=r"average_parameters\(\)"):
                call()
                pytest.fail(f"{what} was not refused")
    _assert_same(_state(model), raw, "the model")
    _assert_snapshot_holds(phema, profiles)


def _assert_snapshot_holds(phema, profiles: list) -> None:
    """The last snapshot recorded ``profiles`` (in its float16)."""
    recorded = phema._snapshots[-1][1]["profiles"]
    for k, shadows in enumerate(recorded):
        for name, t in shadows.items():
            assert torch.equal(t, profiles[k][name].half()), f"snapshot, profile {k}, {name}"


def _threaded(calls: list, iterations: int) -> list[int]:
    """Run each ``call`` ``iterations`` times in its own thread; count the refusals
    (a RuntimeError about average_parameters) and re-raise anything else."""
    errors: list[BaseException] = []
    refused = [0] * len(calls)

    def loop(i: int, call) -> None:
        try:
            for _ in range(iterations):
                try:
                    call()
                except RuntimeError as exc:
                    if "average_parameters" not in str(exc):
                        raise
                    refused[i] += 1
        except BaseException as exc:  # pragma: no cover - reported below
            errors.append(exc)

    old = sys.getswitchinterval()
    sys.setswitchinterval(1e-5)  # switch threads often: the races show at once
    try:
        threads = [threading.Thread(target=loop, args=(i, c)) for i, c in enumerate(calls)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(120)
    finally:
        sys.setswitchinterval(old)
    assert not any(t.is_alive() for t in threads), "a thread hung"
    assert not errors, errors
    return refused


def _evaluate(phema, k: int):
    def call():
        with phema.average_parameters(k):
            pass
    return call


@pytest.mark.parametrize("backend", ["foreach", "cpu"])
def test_update_and_average_parameters_from_two_threads(backend):
    """One thread updates, another evaluates profile 1: the training weights (constant
    2.0) come back exactly, and the profiles equal those of a PostHocEMA that made as
    many updates alone."""
    model, phema = _trained(torch.float32, backend, steps=1, width=256)
    with torch.no_grad():
        for p in model.parameters():
            p.fill_(2.0)
    raw = _state(model)
    refused = _threaded([phema.update, _evaluate(phema, 1)], 300)
    assert refused[1] == 0  # entering the block is never refused: updates hold no block
    _assert_same(_state(model), raw, "the training weights")
    ref_model, ref = _trained(torch.float32, backend, steps=1, width=256)
    with torch.no_grad():
        for p in ref_model.parameters():
            p.fill_(2.0)
    for _ in range(phema.num_updates - 1):
        ref.update()
    assert phema.num_updates == 301 - refused[0]
    for k in range(len(SIGMAS)):
        _assert_same(phema.named_shadows(k), ref.named_shadows(k), f"profile {k}")


def test_snapshot_during_another_threads_average_parameters():
    """Snapshots taken while another thread evaluates profile 0 (swap path) are refused
    or record the profiles, never the training weights."""
    model, phema = _trained(torch.float32, steps=3)
    profiles = _profiles(phema)

    def snapshot():
        phema.snapshot()
        _assert_snapshot_holds(phema, profiles)

    refused = _threaded([snapshot, _evaluate(phema, 0)], 200)
    assert phema.snapshot_steps == ((3,) if refused[0] < 200 else ())


def test_a_block_cannot_start_in_the_middle_of_an_update(monkeypatch):
    """Deterministic: the update pauses inside its pass (in the schedule, which runs
    right before the K profiles are averaged) while another thread asks for
    average_parameters(1).  The block must wait for the update to finish; entering at
    once would swap profile 1's shadows under the running update."""
    model, phema = _trained(torch.float32, steps=1)
    with torch.no_grad():
        for p in model.parameters():
            p.fill_(2.0)
    raw = _state(model)
    schedule = phema._leader.schedule
    asked, entered = threading.Event(), threading.Event()
    decay = type(schedule).decay

    def paused_decay(n):
        asked.set()
        entered.wait(1.0)  # the block enters here only if nothing stops it
        return decay(schedule, n)

    monkeypatch.setattr(schedule, "decay", paused_decay)

    def evaluate():
        asked.wait(30)
        with phema.average_parameters(1):
            entered.set()

    t = threading.Thread(target=evaluate)
    t.start()
    phema.update()
    t.join(30)
    assert not t.is_alive() and entered.is_set()
    _assert_same(_state(model), raw, "the training weights")
    ref_model, ref = _trained(torch.float32, steps=1)
    with torch.no_grad():
        for p in ref_model.parameters():
            p.fill_(2.0)
    ref.update()
    for k in range(len(SIGMAS)):
        _assert_same(phema.named_shadows(k), ref.named_shadows(k), f"profile {k}")


def test_deepcopy_and_pickle_keep_one_lock_per_object():
    """A copy gets its own lock, shared again by all its profiles; a copy taken inside a
    block is refused (it would hold swapped shadows)."""
    import copy
    import io
    model, phema = _trained(torch.float32, steps=2)
    buf = io.BytesIO()
    torch.save(phema, buf)
    buf.seek(0)
    for twin in (copy.deepcopy(phema), torch.load(buf, weights_only=False)):
        assert twin._lock is not phema._lock
        assert all(ema._lock is twin._lock for ema in twin._emas)
        assert twin._emas[0] is twin._leader
        for k in range(len(SIGMAS)):
            _assert_same(twin.named_shadows(k), phema.named_shadows(k), f"profile {k}")
    with phema.average_parameters(0):
        with pytest.raises(RuntimeError, match=r"PostHocEMA.__getstate__.*average_parameters"):
            copy.deepcopy(phema)
