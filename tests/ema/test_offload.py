"""``EMA(device="cpu", non_blocking=True)`` with CPU params (issue 23): the same worker,
waiting, back-pressure and error paths as with CUDA params, checked bit for bit against
``non_blocking=False`` (and one step against float64)."""
from __future__ import annotations

import copy
import pickle
import threading

import pytest
import torch
from torch import nn

from ema_fused import EMA, ModelChangedError, available_backends, schedules
from ema_fused.ema import offload_layout
from ema_fused.ema.offload import BackgroundUpdateError

from helpers.ema_reference import make_model, train_step
from helpers.numerics import assert_rounded_close, compute_dtype, lerp_reference, rand, seeded

BACKENDS = [b for b in ("cpu", "foreach") if available_backends("cpu")[b][0]]


@pytest.fixture
def small_pieces(monkeypatch):
    """256 KiB pieces, so that the test tensors span several pieces and get cut."""
    monkeypatch.setattr(offload_layout, "PIECE_BYTES", 256 << 10)


@pytest.fixture
def gate(monkeypatch):
    """Hold every background averaging until the returned event is set."""
    opened = threading.Event()
    real = offload_layout.Piece.average

    def gated(self, *args, **kwargs):
        assert opened.wait(30), "the test never opened the gate"
        return real(self, *args, **kwargs)

    monkeypatch.setattr(offload_layout.Piece, "average", gated)
    yield opened
    opened.set()


def _open_later(gate: threading.Event, seconds: float = 0.1) -> threading.Timer:
    timer = threading.Timer(seconds, gate.set)
    timer.start()
    return timer


def _tensors(dtype, gen):
    """Odd sizes, an empty tensor, a transposed one and 70 small ones."""
    sizes = [0, 1, 7, 4097, 278011] + [3] * 70
    out = [rand(n, dtype, gen) for n in sizes]
    out.append(rand((37, 51), dtype, gen).t())
    return out


def _shadows(ema):
    return {k: v.clone() for k, v in ema.state_dict()["shadows"].items()}


def _assert_equal(a: dict, b: dict) -> None:
    assert a.keys() == b.keys()
    for k in a:
        assert a[k].dtype == b[k].dtype and torch.equal(a[k], b[k]), k


# ---------------------------------------------------------------- results
@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("pdtype,sdtype", [(torch.bfloat16, torch.float32),
                                           (torch.float16, torch.float32),
                                           (torch.float32, torch.float32),
                                           (torch.bfloat16, None), (torch.float64, None)])
def test_bit_identical_to_blocking_and_exact_against_float64(backend, pdtype, sdtype,
                                                             small_pieces):
    gen = seeded("offload", backend, pdtype, sdtype)
    a = _tensors(pdtype, gen)
    b = [t.clone() if t.is_contiguous() else t.t().clone().t() for t in a]
    kwargs = dict(decay=0.7, device="cpu", backend=backend, dtype=sdtype)
    blocking, background = EMA(a, **kwargs), EMA(b, non_blocking=True, **kwargs)
    start = [s.clone() for s in background._shadows]
    for step in range(1, 5):
        moves = [rand(t.shape, pdtype, gen) for t in a]
        for x, y, m in zip(a, b, moves):
            x.copy_(m)
            y.copy_(m)
        blocking.update()
        background.update()
        # written in place right after update() returned: must not leak into this step
        kept = [y.clone() for y in b]
        for y in b:
            y.fill_(1e4)
        if step == 1:
            background.wait()
            for s0, s, p in zip(start, background._shadows, kept):
                exact = lerp_reference(s0, p, 0.3)
                assert_rounded_close(s, exact, s0.double().abs() + p.double().abs(),
                                     compute_dtype(s.dtype, p.dtype))
        for y, k in zip(b, kept):
            y.copy_(k)
    _assert_equal(_shadows(background), _shadows(blocking))
    assert background.backend == blocking.backend


CONFIGS = {
    "every3-after4": dict(update_every=3, update_after_step=4),
    "buffers-copy": dict(buffers="copy"),
    "skip-nonfinite": dict(skip_nonfinite=True),
    "bias-correction": dict(bias_correction=True),
    "schedule": dict(schedule=schedules.num_updates_warmup(0.99)),
}


@pytest.mark.parametrize("config", list(CONFIGS))
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_step_rules_buffers_and_options_as_blocking(config, dtype, monkeypatch):
    """Same shadows, counters and reads as non_blocking=False; a step that changes no
    shadow captures nothing."""
    captures = []
    real = offload_layout.Layout.capture_cpu
    monkeypatch.setattr(offload_layout.Layout, "capture_cpu",
                        lambda self: (captures.append(1), real(self))[1])
    models = [make_model(dtype), make_model(dtype)]
    emas = [EMA(m, device="cpu", non_blocking=nb, **CONFIGS[config])
            for m, nb in zip(models, (False, True))]
    gens = [seeded("rules", config, dtype) for _ in models]
    for step in range(1, 11):
        for m, g, ema in zip(models, gens, emas):
            train_step(m, g)
            if config == "skip-nonfinite" and step in (3, 7):
                with torch.no_grad():
                    m[0].weight[0, :3] = float("nan")
            ema.update(step)
            ema.update(step)  # repeated (gradient accumulation): nothing
    blocking, background = emas
    _assert_equal(_shadows(background), _shadows(blocking))
    _assert_equal(background.averaged_weights(), blocking.averaged_weights())
    assert (background.num_updates, background.decay) == (blocking.num_updates, blocking.decay)
    changing = [s for s in range(1, 11) if s % CONFIGS[config].get("update_every", 1) == 0]
    assert len(captures) == len(changing)


def test_values_written_right_after_update_do_not_leak(monkeypatch):
    """The worker is held until the params were overwritten: the step averages the
    values they had when update() was called."""
    from ema_fused.ema import offload_worker
    held, real = threading.Event(), offload_worker.Job.run
    monkeypatch.setattr(offload_worker.Job, "run", lambda job: (held.wait(30), real(job)))
    params = [torch.full((1000,), 2.0), torch.full((7,), 2.0, dtype=torch.bfloat16)]
    ema = EMA(params, decay=0.5, device="cpu", non_blocking=True)  # shadows start at 2
    for p in params:
        p.fill_(4.0)
    ema.update()
    for p in params:
        p.fill_(1e4)
    held.set()
    ema.wait()
    assert all(bool((s == 3.0).all()) for s in ema._shadows)


def test_resume_is_bit_identical():
    def run(model, ema, gen, steps):
        for _ in range(steps):
            train_step(model, gen)
            ema.update()

    model, gen = make_model(torch.bfloat16), seeded("resume")
    ema = EMA(model, decay=0.9, device="cpu", non_blocking=True)
    run(model, ema, gen, 4)
    state = copy.deepcopy(ema.state_dict())  # its shadows are the live ones: keep a copy
    weights = {k: v.clone() for k, v in model.state_dict().items()}
    gen_state = gen.get_state()
    run(model, ema, gen, 4)
    resumed_model = make_model(torch.bfloat16, seed=1)
    resumed_model.load_state_dict(weights)
    resumed = EMA(resumed_model, decay=0.9, device="cpu", non_blocking=True)
    resumed.load_state_dict(state)
    gen2 = torch.Generator().set_state(gen_state)
    run(resumed_model, resumed, gen2, 4)
    _assert_equal(_shadows(resumed), _shadows(ema))
    assert resumed.num_updates == ema.num_updates == 8


# ---------------------------------------------------------------- waiting
READS = {
    "wait": lambda ema, model: (ema.wait(), _shadows(ema))[1],
    "state_dict": lambda ema, model: _shadows(ema),
    "named_shadows": lambda ema, model: {k: v.clone() for k, v in ema.named_shadows()},
    "averaged_weights": lambda ema, model: ema.averaged_weights(),
    "copy_to": lambda ema, model: (ema.copy_to(model), _model_state(model))[1],
    "average_parameters": lambda ema, model: _inside_block(ema, model),
    "store": lambda ema, model: (ema.store(), ema.restore(), None)[2],
    "deepcopy": lambda ema, model: _shadows(copy.deepcopy(ema)),
    "pickle": lambda ema, model: _shadows(_pickled(ema)),
    "as_module": lambda ema, model: _module_state(ema),
}


def _model_state(model):
    return {k: v.clone() for k, v in model.state_dict().items()}


def _inside_block(ema, model):
    with ema.average_parameters():
        return _model_state(model)


def _pickled(ema):
    return pickle.loads(pickle.dumps(ema))


def _module_state(ema):
    holder = nn.Module()
    holder.ema_state = ema.as_module()
    return {k: v.clone() for k, v in holder.state_dict()["ema_state._extra_state"]["shadows"]
            .items()}


@pytest.mark.parametrize("read", list(READS))
def test_every_read_waits_for_the_pending_update(read, gate):
    model = make_model(torch.float32)
    ema = EMA(model, decay=0.5, device="cpu", non_blocking=True)
    ref_model = make_model(torch.float32)
    ref = EMA(ref_model, decay=0.5, device="cpu")
    for m in (model, ref_model):
        train_step(m, seeded("reads"))
    ref.update()
    ema.update()  # held by the gate until the read below has started
    timer = _open_later(gate)
    got = READS[read](ema, model)
    timer.join()
    assert ema._offload._job is None  # nothing pending once a read returned
    if read == "store":
        return  # store() reads the model, not the shadows: waiting is what it must do
    want = (_model_state_after_copy(ref, ref_model) if read in ("copy_to", "average_parameters")
            else ref.averaged_weights() if read == "averaged_weights" else _shadows(ref))
    _assert_equal(got, want)


def _model_state_after_copy(ref, ref_model):
    ref.copy_to(ref_model)
    return _model_state(ref_model)


def test_load_state_dict_waits_and_is_not_overwritten(gate):
    model = make_model(torch.float32)
    ema = EMA(model, decay=0.5, device="cpu", non_blocking=True)
    saved = ema.state_dict()
    saved = {**saved, "shadows": {k: v.clone() + 3 for k, v in saved["shadows"].items()}}
    train_step(model, seeded("load"))
    ema.update()
    timer = _open_later(gate)
    ema.load_state_dict(saved)
    timer.join()
    ema.wait()
    _assert_equal(_shadows(ema), saved["shadows"])


def test_back_pressure_waits_and_keeps_every_step(gate):
    """An update while the previous one still runs waits for it: no dropped or merged step."""
    model, ref_model = make_model(torch.float32), make_model(torch.float32)
    ema = EMA(model, decay=0.5, device="cpu", non_blocking=True)
    ref = EMA(ref_model, decay=0.5, device="cpu")
    for m, e in ((model, ema), (ref_model, ref)):
        train_step(m, seeded("bp", 1))
        e.update()
    for m in (model, ref_model):
        train_step(m, seeded("bp", 2))
    second = threading.Thread(target=ema.update)
    second.start()
    second.join(0.2)
    assert second.is_alive(), "the second update did not wait for the first"
    gate.set()
    second.join(30)
    ref.update()
    _assert_equal(_shadows(ema), _shadows(ref))
    assert ema.num_updates == 2


# ---------------------------------------------------------------- errors
@pytest.mark.parametrize("next_call", ["update", "state_dict", "wait"])
def test_background_error_is_raised_by_the_next_call_naming_the_step(next_call, monkeypatch):
    model = make_model(torch.float32)
    ema = EMA(model, decay=0.5, device="cpu", non_blocking=True)
    gen = seeded("error", next_call)
    for _ in range(2):
        train_step(model, gen)
        ema.update()
    ema.wait()
    real = offload_layout.Piece.average

    def failing(self, *args, **kwargs):
        raise RuntimeError("disk on fire")

    monkeypatch.setattr(offload_layout.Piece, "average", failing)
    train_step(model, gen)
    ema.update()  # step 3: fails in the background, returns normally
    ema._offload._job.done.wait(30)
    monkeypatch.setattr(offload_layout.Piece, "average", real)
    before = [s.clone() for s in ema._shadows]
    train_step(model, gen)
    call = {"update": ema.update, "state_dict": ema.state_dict, "wait": ema.wait}[next_call]
    with pytest.raises(BackgroundUpdateError, match="step 3") as info:
        call()
    assert "disk on fire" in str(info.value.__cause__)
    assert all(torch.equal(a, b) for a, b in zip(before, ema._shadows))  # nothing written
    assert ema.num_updates == 3
    ema.update()  # reported once; the EMA goes on
    ema.wait()
    assert ema.num_updates == 4


def test_model_change_and_failing_schedule_raise_from_update_with_nothing_written():
    model = make_model(torch.float32)

    def schedule(n):
        if n == 3:
            raise ValueError("no decay for step 3")
        return 0.5

    ema = EMA(model, schedule=schedule, device="cpu", non_blocking=True)
    gen = seeded("changes")
    for _ in range(2):
        train_step(model, gen)
        ema.update()
    ema.wait()
    before = _shadows(ema)
    with pytest.raises(ValueError, match="no decay for step 3"):
        ema.update()
    _assert_equal(_shadows(ema), before)
    assert ema.num_updates == 2
    model[0].weight = nn.Parameter(torch.zeros(9, 7))
    with pytest.raises(ModelChangedError):
        ema.update(4)
    _assert_equal(_shadows(ema), before)
    assert ema.num_updates == 2


def test_a_replaced_storage_is_followed_not_written_through():
    models = [make_model(torch.float32), make_model(torch.float32)]
    emas = [EMA(models[0], decay=0.5, device="cpu"),
            EMA(models[1], decay=0.5, device="cpu", non_blocking=True)]
    for m, e in zip(models, emas):
        e.update()
        old = m[0].weight.data
        m[0].weight.data = old.clone() + 1  # new storage; the old one is changed after
        e.update()
        old.fill_(1e6)
    _assert_equal(_shadows(emas[1]), _shadows(emas[0]))


# ---------------------------------------------------------------- options
def test_options_are_checked():
    model = make_model()
    with pytest.raises(ValueError, match="device='cpu'"):
        EMA(model, non_blocking=True)
    with pytest.raises(ValueError, match="non_blocking=True"):
        EMA(model, device="cpu", offload_threads=2)
    with pytest.raises(ValueError, match="offload_threads"):
        EMA(model, device="cpu", non_blocking=True, offload_threads=0)
    with pytest.raises(TypeError, match="non_blocking"):
        EMA(model, device="cpu", non_blocking="yes")


def test_staging_is_allocated_once_and_sized_to_the_model():
    model = make_model(torch.bfloat16)
    ema = EMA(model, decay=0.5, device="cpu", non_blocking=True)
    gen = seeded("pool")
    for _ in range(5):
        train_step(model, gen)
        ema.update()
    model[0].weight.data = model[0].weight.data.clone()  # a new plan, the same pool
    ema.update()
    ema.wait()
    pool = ema._offload.pool
    assert pool.allocations == 1
    need = sum(-(-t.numel() * t.element_size() // 64) * 64 for t in model.state_dict().values())
    assert pool.buffer.numel() == need


def test_an_ema_pickled_before_the_offload_options_still_loads():
    model = make_model()
    ema = EMA(model, decay=0.5, device="cpu")
    state = ema.__getstate__()
    for key in ("non_blocking", "_offload_threads", "_updating_step", "_offload"):
        del state[key]  # what an older ema_fused pickled
    old = EMA.__new__(EMA)
    old.__setstate__(state)
    assert old.non_blocking is False and old._offload is not None
    train_step(old._tracked.module, seeded("old pickle"))
    old.update()
    assert old.num_updates == 1
