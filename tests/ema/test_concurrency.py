"""Thread safety, autograd after average_parameters(), pickling and deepcopy (issue 13,
items 3, 4 and 6)."""
from __future__ import annotations

import copy
import io
import pickle
import threading

import pytest
import torch
from torch import nn

from ema_fused import EMA

BACKENDS = ["foreach", "cpu"]


def _backend_or_skip(name):
    from ema_fused import available_backends
    if name not in available_backends("cpu"):
        pytest.skip(f"backend {name} not usable here")
    return name


def _model(dtype=torch.float32):
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(16, 32), nn.Tanh(), nn.Linear(32, 4)).to(dtype)


def _doubled_and_updated(dtype):
    """A model, its EMA (decay 0.5), the weights doubled and one update made."""
    model = _model(dtype)
    ema = EMA(model, decay=0.5)
    with torch.no_grad():
        for p in model.parameters():
            p.mul_(2.0)
    ema.update()
    return model, ema


def _assert_equals_reference(ema, dtype, decay, updates):
    """The shadows equal a fresh EMA of the same model after `updates` updates with the
    weights shifted by 1 (what the threaded tests do)."""
    ref = EMA(_model(dtype), decay=decay, backend="foreach")
    with torch.no_grad():
        for p in ref._tracked.module.parameters():
            p.add_(1.0)
    for _ in range(updates):
        ref.update()
    for (name, s), (_, r) in zip(ema.named_shadows(), ref.named_shadows()):
        torch.testing.assert_close(s, r, rtol=0, atol=1e-6, msg=name)


# ---------------------------------------------------------------- threads
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("backend", BACKENDS)
def test_average_parameters_and_update_from_two_threads(backend, dtype):
    """One thread evaluates in average_parameters() while another updates: every refused
    update leaves everything as it was, and the training weights are never lost."""
    _backend_or_skip(backend)
    model = _model(dtype)
    ema = EMA(model, decay=0.9, backend=backend)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(1.0)
    raw = {k: v.clone() for k, v in model.state_dict().items()}
    stop = threading.Event()
    errors: list[BaseException] = []
    refused = [0]
    accepted = [0]

    def evaluate():
        try:
            while not stop.is_set():
                with ema.average_parameters():
                    model(torch.ones(2, 16, dtype=dtype))
        except BaseException as exc:  # pragma: no cover - reported below
            errors.append(exc)

    def train():
        try:
            for _ in range(300):
                try:
                    ema.update()
                    accepted[0] += 1
                except RuntimeError as exc:
                    assert "average_parameters" in str(exc)
                    refused[0] += 1
        except BaseException as exc:  # pragma: no cover - reported below
            errors.append(exc)
        finally:
            stop.set()

    threads = [threading.Thread(target=evaluate), threading.Thread(target=train)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=120)
    assert not any(t.is_alive() for t in threads), "a thread hung"
    assert not errors, errors
    assert accepted[0] + refused[0] == 300
    # the training weights are exactly what they were: no update writes the model
    for k, v in model.state_dict().items():
        assert torch.equal(v, raw[k]), k
    # and the shadows are the reference EMA of `accepted` updates of constant weights
    _assert_equals_reference(ema, dtype, 0.9, accepted[0])


def test_refused_calls_from_another_thread_change_nothing():
    model, ema = _doubled_and_updated(torch.float32)
    inside, release = threading.Event(), threading.Event()

    def evaluate():
        with ema.average_parameters():
            inside.set()
            release.wait(30)

    t = threading.Thread(target=evaluate)
    t.start()
    assert inside.wait(30)
    try:
        for call in (ema.update, lambda: ema.store(), lambda: ema.restore(),
                     lambda: ema.copy_to(), lambda: ema.state_dict(),
                     lambda: ema.averaged_weights(), lambda: list(ema.named_shadows()),
                     lambda: ema.average_parameters().__enter__()):
            with pytest.raises(RuntimeError, match="another thread"):
                call()
        assert ema.num_updates == 1
    finally:
        release.set()
        t.join(30)
    assert not t.is_alive()
    # after the block: the model has its own weights back and the EMA works
    raw = {k: v.clone() for k, v in model.state_dict().items()}
    ema.update()
    assert ema.num_updates == 2
    for k, v in model.state_dict().items():
        assert torch.equal(v, raw[k])


def test_nested_average_parameters_on_the_copy_path_is_refused():
    """bf16 model, fp32 shadows (the copy path): a nested block would overwrite the
    backup of the training weights with averaged ones."""
    model, ema = _doubled_and_updated(torch.bfloat16)
    raw = {k: v.clone() for k, v in model.state_dict().items()}
    with ema.average_parameters():
        with pytest.raises(RuntimeError, match="average_parameters"):
            with ema.average_parameters():
                pass
        with pytest.raises(RuntimeError, match="average_parameters"):
            ema.update()
        with pytest.raises(RuntimeError, match="average_parameters"):
            ema.store()
    for k, v in model.state_dict().items():
        assert torch.equal(v, raw[k]), k


def test_copy_path_keeps_a_users_stored_backup():
    model, ema = _doubled_and_updated(torch.bfloat16)
    ema.store()
    stored = {k: v.clone() for k, v in model.state_dict().items()}
    with torch.no_grad():
        for p in model.parameters():
            p.add_(3.0)
    with ema.average_parameters():
        pass
    ema.restore()  # what store() saved, not what average_parameters() saw
    for k, v in model.state_dict().items():
        assert torch.equal(v, stored[k]), k


def test_concurrent_updates_serialize():
    """Updates from several threads each run whole: the result is the EMA of as many
    updates (constant weights, so order does not matter)."""
    model = _model()
    ema = EMA(model, decay=0.8)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(1.0)
    threads = [threading.Thread(target=lambda: [ema.update() for _ in range(50)])
               for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert ema.num_updates == 200
    _assert_equals_reference(ema, torch.float32, 0.8, 200)


# ---------------------------------------------------------------- autograd
@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_backward_after_average_parameters_raises(backend, dtype):
    """A forward inside the block and a backward after it would mix the averaged and
    the raw weights: autograd must raise its in-place error, on the swap path (fp32
    model, fp32 shadows) as on the copy path."""
    _backend_or_skip(backend)
    model = _model(dtype)
    ema = EMA(model, decay=0.5, dtype=dtype, backend=backend)
    with torch.no_grad():
        for p in model.parameters():
            p.mul_(2.0)
    ema.update()
    x = torch.randn(3, 16, dtype=dtype)
    with ema.average_parameters():
        out = model(x).sum()
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        out.backward()


@pytest.mark.parametrize("backend", BACKENDS)
def test_backward_inside_average_parameters_still_works(backend):
    _backend_or_skip(backend)
    model = _model()
    ema = EMA(model, decay=0.5, backend=backend)
    ema.update()
    with ema.average_parameters():
        model(torch.randn(3, 16)).sum().backward()
    assert all(p.grad is not None for p in model.parameters())


# ---------------------------------------------------------------- pickling
def _trained(backend="auto", **kw):
    model = _model()
    ema = EMA(model, decay=0.7, backend=backend, **kw)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.5)
    ema.update()
    ema.update()
    return model, ema


@pytest.mark.parametrize("backend", BACKENDS)
def test_deepcopy_after_update_is_independent(backend):
    _backend_or_skip(backend)
    model, ema = _trained(backend)
    twin = copy.deepcopy(ema)
    assert twin._tracked.module is not model
    assert twin.num_updates == 2
    for (n, a), (_, b) in zip(ema.named_shadows(), twin.named_shadows()):
        assert torch.equal(a, b) and a.data_ptr() != b.data_ptr(), n
    # both keep working, each on its own model
    twin.update()
    ema.update()
    ema.update()
    assert twin.num_updates == 3 and ema.num_updates == 4
    with torch.no_grad():
        for p in twin._tracked.module.parameters():
            p.zero_()
    twin.update()
    ema.update()
    a = dict(ema.named_shadows())
    b = dict(twin.named_shadows())
    assert not torch.equal(a["0.weight"], b["0.weight"])


@pytest.mark.parametrize("backend", BACKENDS)
def test_pickle_and_torch_save_round_trip(backend):
    _backend_or_skip(backend)
    model, ema = _trained(backend)
    for blob in (pickle.dumps(ema), _torch_saved(ema)):
        back = (pickle.loads(blob) if isinstance(blob, bytes)
                else torch.load(blob, weights_only=False))
        assert back.num_updates == 2
        for (n, a), (_, b) in zip(ema.named_shadows(), back.named_shadows()):
            assert torch.equal(a, b), n
        ema_next = copy.deepcopy(ema)
        ema_next.update()
        back.update()  # same trajectory from here: same shadows
        for (n, a), (_, b) in zip(ema_next.named_shadows(), back.named_shadows()):
            assert torch.equal(a, b), n


def _torch_saved(obj) -> io.BytesIO:
    buf = io.BytesIO()
    torch.save(obj, buf)
    buf.seek(0)
    return buf


def test_deepcopy_of_a_module_holding_an_ema():
    class Owner(nn.Module):
        def __init__(self):
            super().__init__()
            self.net = _model()
            self.ema = EMA(self.net, decay=0.9)

    owner = Owner()
    owner.ema.update()
    twin = copy.deepcopy(owner)
    assert twin.ema._tracked.module is twin.net  # follows the copied model
    with torch.no_grad():
        for p in twin.net.parameters():
            p.fill_(1.0)
    twin.ema.update()
    assert torch.equal(dict(owner.ema.named_shadows())["0.bias"],
                       owner.net[0].bias.detach())
    assert not torch.equal(dict(twin.ema.named_shadows())["0.bias"],
                           dict(owner.ema.named_shadows())["0.bias"])


def test_deepcopy_inside_average_parameters_is_refused():
    model, ema = _trained()
    with ema.average_parameters():
        with pytest.raises(RuntimeError, match="average_parameters"):
            copy.deepcopy(ema)


def test_a_bare_deepcopy_tracks_a_private_copy_of_the_model():
    """Documented (README, "Copies and pickling"): copy.deepcopy(ema) copies the model it
    tracks, so the copy averages that private model, not the one that trains; a
    state_dict carries an average over to an EMA of the live model."""
    model, ema = _doubled_and_updated(torch.float32)
    twin = copy.deepcopy(ema)
    private = twin._tracked.module
    assert private is not model
    before = {n: s.clone() for n, s in ema.named_shadows()}
    with torch.no_grad():
        for p in model.parameters():
            p.add_(1.0)
    twin.update()
    private_weights, live = private.state_dict(), model.state_dict()
    for name, s in twin.named_shadows():  # decay 0.5 towards the private weights
        expected = before[name] + 0.5 * (private_weights[name] - before[name])
        torch.testing.assert_close(s, expected, rtol=0, atol=1e-6, msg=name)
        assert not torch.allclose(s, before[name] + 0.5 * (live[name] - before[name])), name
    follow = EMA(model, decay=0.5)
    follow.load_state_dict(ema.state_dict())
    follow.update()
    ema.update()
    for (name, a), (_, b) in zip(follow.named_shadows(), ema.named_shadows()):
        assert torch.equal(a, b), name
