"""``EMA.shadow_module()`` and ``bind_shadows(module)``: a module whose tensors are the
shadows, followed when it moves or its tensors are replaced."""
import copy
import pickle

import pytest
import torch
from torch import nn

from ema_fused import EMA
from ema_fused.checks import ModelChangedError


class Tied(nn.Module):
    def __init__(self):
        super().__init__()
        self.emb = nn.Embedding(11, 6)
        self.norm = nn.BatchNorm1d(6)
        self.head = nn.Linear(6, 11, bias=False)
        self.head.weight = self.emb.weight
        self.frozen = nn.Linear(6, 6)
        self.frozen.requires_grad_(False)


def _step(m, value=1.0):
    with torch.no_grad():
        for p in m.parameters():
            p.add_(value)


def test_the_module_holds_the_shadows_themselves():
    torch.manual_seed(0)
    m = Tied()
    ema = EMA(m, dtype=None, trainable_only=True)
    copy_ = ema.shadow_module()
    shadows = dict(ema.named_shadows())
    assert copy_.emb.weight is shadows["emb.weight"] and copy_.head.weight is copy_.emb.weight
    assert copy_.norm.running_mean is shadows["norm.running_mean"]
    assert copy_.frozen.weight is not m.frozen.weight  # left out: a plain copy
    assert torch.equal(copy_.frozen.weight, m.frozen.weight)
    assert copy_.emb.weight.requires_grad and not copy_.frozen.weight.requires_grad
    _step(m)
    ema.update_from(decay=0.5)
    torch.testing.assert_close(copy_.emb.weight, m.emb.weight - 0.5)


def test_fp32_shadows_of_a_bf16_model_make_an_fp32_copy():
    m = nn.Linear(4, 4).to(torch.bfloat16)
    copy_ = EMA(m).shadow_module()
    assert copy_.weight.dtype == torch.float32 and m.weight.dtype == torch.bfloat16


def test_the_ema_follows_a_moved_or_replaced_module_tensor():
    torch.manual_seed(0)
    m = nn.Linear(5, 3)
    ema = EMA(m, dtype=None)
    copy_ = ema.shadow_module()
    ema.update_from(decay=0.5)
    copy_.double()  # the same Parameter objects, new storage
    _step(m)
    ema.update_from(decay=0.5)
    assert copy_.weight.dtype == torch.float64
    torch.testing.assert_close(copy_.weight, m.weight.double() - 0.5)
    new = {k: torch.zeros_like(v) for k, v in copy_.state_dict().items()}
    copy_.load_state_dict(new, assign=True)  # new tensor objects in the module
    ema.update_from(decay=0.5)
    torch.testing.assert_close(copy_.weight, 0.5 * m.weight.double())
    assert dict(ema.named_shadows())["weight"] is copy_.weight
    copy_.weight = nn.Parameter(torch.zeros(4, 5, dtype=torch.float64))
    with pytest.raises(ModelChangedError, match="shape"):
        ema.update_from(decay=0.5)


def test_the_copy_and_the_ema_pickle_together():
    m = nn.Linear(3, 3)
    ema = EMA(m, dtype=None)
    copy_ = ema.shadow_module()
    ema2, copy2 = pickle.loads(pickle.dumps((ema, copy_)))
    assert dict(ema2.named_shadows())["weight"] is copy2.weight
    ema3 = copy.deepcopy(ema)
    _step(ema3._tracked.module)
    ema3.update_from(decay=0.0)
    assert torch.equal(ema3._bound.module.weight, ema3._tracked.module.weight)


def test_bind_shadows_takes_an_existing_copy_with_its_values():
    torch.manual_seed(0)
    m = nn.Sequential(nn.Linear(4, 4), nn.BatchNorm1d(4))
    other = copy.deepcopy(m).double()
    with torch.no_grad():
        other[0].weight.zero_()
    ema = EMA(m)
    ema.bind_shadows(other)
    assert dict(ema.named_shadows())["0.weight"] is other[0].weight
    ema.update_from(decay=0.75)
    torch.testing.assert_close(other[0].weight, 0.25 * m[0].weight.double())


def test_bind_shadows_refusals_change_nothing():
    m = nn.Sequential(nn.Linear(4, 4), nn.BatchNorm1d(4))
    ema = EMA(m.to(torch.float32))
    before = dict(ema.named_shadows())
    with pytest.raises(ValueError, match="own"):
        ema.bind_shadows(m)
    with pytest.raises(TypeError, match="cannot hold"):
        ema.bind_shadows(copy.deepcopy(m).half())
    narrow_int = copy.deepcopy(m)
    narrow_int[1].num_batches_tracked = torch.tensor(0, dtype=torch.int32)
    with pytest.raises(TypeError, match="num_batches_tracked"):
        ema.bind_shadows(narrow_int)
    with pytest.raises(ModelChangedError):
        ema.bind_shadows(nn.Sequential(nn.Linear(4, 4)))
    assert all(s is before[k] for k, s in ema.named_shadows())
    with pytest.raises(TypeError, match="list of tensors"):
        EMA([torch.randn(3)]).shadow_module()
    with pytest.raises(ValueError, match="bias_correction"):
        EMA(m, bias_correction=True).shadow_module()
