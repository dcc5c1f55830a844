"""``EMA.to(device, dtype)``, ``pin_memory()`` and the stored weights (``stored_weights`` /
``load_stored_weights``)."""
import pytest
import torch
from torch import nn

from ema_fused import EMA

from helpers.numerics import requires_gpu


def _ema(**kwargs):
    torch.manual_seed(0)
    m = nn.Sequential(nn.Linear(4, 6), nn.BatchNorm1d(6))
    return m, EMA(m, **kwargs)


def test_to_casts_averaged_shadows_and_the_stored_copy_only():
    m, ema = _ema(dtype=None)
    ema.store()
    assert ema.to(dtype=torch.float64) is ema
    shadows = dict(ema.named_shadows())
    assert shadows["0.weight"].dtype == torch.float64
    assert shadows["1.num_batches_tracked"].dtype == torch.int64  # copied tensors keep theirs
    stored = ema.stored_weights()
    assert stored["0.weight"].dtype == torch.float64
    assert stored["1.num_batches_tracked"].dtype == torch.int64
    torch.testing.assert_close(shadows["0.weight"], m[0].weight.double())
    with torch.no_grad():
        m[0].weight.add_(1.0)
    ema.update_from(decay=0.5)  # the plan is made again for the new shadows
    torch.testing.assert_close(dict(ema.named_shadows())["0.weight"],
                               m[0].weight.double() - 0.5)


def test_a_narrower_dtype_is_applied_and_an_update_then_refuses_to_round():
    m, ema = _ema()
    ema.to(dtype=torch.float16)
    assert dict(ema.named_shadows())["0.weight"].dtype == torch.float16
    before = dict(ema.named_shadows())["0.weight"].clone()
    with pytest.raises(TypeError, match="lose precision"):
        ema.update()
    assert torch.equal(dict(ema.named_shadows())["0.weight"], before)
    ema.to(dtype=torch.float32)
    ema.update()


def test_to_refuses_bad_dtypes_and_bound_shadows():
    m, ema = _ema()
    with pytest.raises(TypeError, match="dtype"):
        ema.to(dtype=torch.int32)
    ema.shadow_module()
    with pytest.raises(ValueError, match="move that module"):
        ema.to("cpu")


def test_to_a_device_keeps_the_shadows_there():
    m, ema = _ema()
    ema.to("cpu")
    assert all(s.device.type == "cpu" for _, s in ema.named_shadows())


def test_pin_memory_without_an_accelerator_says_so():
    if torch.cuda.is_available():
        pytest.skip("pinning works here")
    m, ema = _ema()
    before = dict(ema.named_shadows())
    with pytest.raises(RuntimeError, match="EMA.pin_memory"):
        ema.pin_memory()
    assert all(s is before[k] for k, s in ema.named_shadows())


@pytest.mark.gpu
@requires_gpu()
def test_pin_memory_and_offload_round_trip_on_a_gpu():
    torch.manual_seed(0)
    m = nn.Linear(8, 8).cuda()
    ema = EMA(m)
    ema.to("cpu").pin_memory()
    assert all(s.is_pinned() for _, s in ema.named_shadows())
    with torch.no_grad():
        m.weight.add_(1.0)
    ema.update_from(decay=0.5)  # shadows on the CPU, model on the GPU: staged
    torch.testing.assert_close(dict(ema.named_shadows())["weight"], (m.weight - 0.5).cpu())
    ema.to("cuda", non_blocking=True)
    assert all(s.is_cuda for _, s in ema.named_shadows())


def test_stored_weights_round_trip_and_checks():
    m, ema = _ema()
    assert ema.stored_weights() is None
    ema.store()
    stored = ema.stored_weights()
    assert set(stored) == set(dict(ema.named_shadows()))
    with torch.no_grad():
        m[0].weight.zero_()
    ema2 = EMA(m)
    with pytest.raises(KeyError, match="missing"):
        ema2.load_stored_weights({"0.weight": stored["0.weight"]})
    bad = dict(stored, **{"0.weight": torch.zeros(3)})
    with pytest.raises(ValueError, match="0.weight"):
        ema2.load_stored_weights(bad)
    assert ema2.stored_weights() is None
    ema2.load_stored_weights(stored)
    ema2.restore()
    assert torch.equal(m[0].weight, stored["0.weight"])
    ema2.load_stored_weights(None)
    with pytest.raises(RuntimeError, match="nothing stored"):
        ema2.restore()


def test_to_keeps_a_non_blocking_ema_on_the_host():
    torch.manual_seed(0)
    m = nn.Linear(5, 3)
    ema = EMA(m, device="cpu", non_blocking=True)
    ema.update()
    before = [t.clone() for _, t in ema.named_shadows()]
    with pytest.raises(ValueError, match="non_blocking=True, whose shadows stay on the host"):
        ema.to("cuda")
    assert all(torch.equal(a, t) for a, (_, t) in zip(before, ema.named_shadows()))
    ema.to("cpu", dtype=torch.float64)  # on the host: allowed, the background path kept
    with torch.no_grad():
        m.weight.add_(1.0)
    ema.update()
    ema.wait()
    want = before[0].double() * ema.decay + m.weight.double() * (1 - ema.decay)
    torch.testing.assert_close(dict(ema.named_shadows())["weight"], want)
