"""The peers' classes and ema_fused.compat's, side by side: each :class:`Pair` makes one
update of the peer and one of the compat class configured alike (the same shadow dtype,
so the same bytes moved), from ``(model, decay)``.

``per_tensor`` marks the peers' per-tensor paths (a Python loop of tensor ops per
parameter): torch_ema, ema-pytorch's default ``use_foreach=False``, diffusers' default
``foreach=False``, ``AveragedModel`` with an ``avg_fn`` (Lightning's
``EMAWeightAveraging``) and timm ``ModelEmaV2``.  ``bf16_only`` pairs exist only for a
bf16 model (timm V3's default stochastic rounding).  A compat side that cannot run yet
(``pending``: ``make_ours`` raises NotImplementedError) is recorded as such.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Optional

import torch
from torch import nn

Update = Callable[[], None]
Maker = Callable[[nn.Module, float], Update]


@dataclass(frozen=True)
class Pair:
    name: str
    about: str
    make_peer: Maker
    make_ours: Maker
    fp32_shadows: bool  # else the model's dtype
    per_tensor: bool = False
    bf16_only: bool = False
    module: Optional[str] = None  # the peer's package

    def bytes_moved(self, numel: int, param_dtype: torch.dtype) -> int:
        p = torch.empty((), dtype=param_dtype).element_size()
        return numel * (p + 2 * (4 if self.fp32_shadows else p))


def _timm(version: str, ours: bool, **kwargs) -> Maker:
    def make(model, decay):
        if ours:
            from ema_fused.compat import timm as mod
        else:
            from timm.utils import model_ema as mod
        ema = getattr(mod, version)(model, decay=decay, **kwargs)
        return lambda: ema.update(model)
    return make


def _averaged(ours: bool, single: bool) -> Maker:
    def make(model, decay):
        if ours:
            from ema_fused.compat import swa_utils as mod
        else:
            from torch.optim import swa_utils as mod
        fn = mod.get_ema_avg_fn(decay) if single else mod.get_ema_multi_avg_fn(decay)
        avg = mod.AveragedModel(model, **({"avg_fn": fn} if single else {"multi_avg_fn": fn}))
        return lambda: avg.update_parameters(model)
    return make


def _torch_ema(ours: bool) -> Maker:
    def make(model, decay):
        if ours:
            from ema_fused.compat.torch_ema import ExponentialMovingAverage
        else:
            from torch_ema import ExponentialMovingAverage
        return ExponentialMovingAverage(model.parameters(), decay, use_num_updates=False).update
    return make


def _ema_pytorch(ours: bool, use_foreach: bool) -> Maker:
    def make(model, decay):
        if ours:
            from ema_fused.compat.ema_pytorch import EMA
        else:
            from ema_pytorch import EMA
        # its first update() only copies the model: the warm-up rounds absorb it
        return EMA(model, beta=decay, update_after_step=0, update_every=1,
                   use_foreach=use_foreach).update
    return make


def _diffusers(ours: bool, foreach: bool) -> Maker:
    def make(model, decay):
        if ours:
            from ema_fused.compat.diffusers import EMAModel
        else:
            from diffusers.training_utils import EMAModel
        ema = EMAModel(model.parameters(), decay=decay, foreach=foreach)
        params = list(model.parameters())
        return lambda: ema.step(params)
    return make


PAIRS = (
    Pair("timm ModelEmaV3(dtype=fp32)", "ModelEmaV3(model, decay, dtype=torch.float32)"
         ".update(model)", _timm("ModelEmaV3", False, dtype=torch.float32),
         _timm("ModelEmaV3", True, dtype=torch.float32), fp32_shadows=True, module="timm"),
    Pair("timm ModelEmaV3 (bf16, stochastic)", "ModelEmaV3(bf16 model, decay).update(model): "
         "bf16 averages rounded stochastically (timm's default)", _timm("ModelEmaV3", False),
         _timm("ModelEmaV3", True), fp32_shadows=False, bf16_only=True, module="timm"),
    Pair("timm ModelEmaV2", "ModelEmaV2(model, decay).update(model)", _timm("ModelEmaV2", False),
         _timm("ModelEmaV2", True), fp32_shadows=False, per_tensor=True, module="timm"),
    Pair("AveragedModel(multi_avg_fn=ema)", "AveragedModel(model, multi_avg_fn="
         "get_ema_multi_avg_fn(decay)).update_parameters(model)", _averaged(False, False),
         _averaged(True, False), fp32_shadows=False),
    Pair("AveragedModel(avg_fn=ema)", "AveragedModel(model, avg_fn=get_ema_avg_fn(decay))"
         ".update_parameters(model): Lightning's EMAWeightAveraging", _averaged(False, True),
         _averaged(True, True), fp32_shadows=False, per_tensor=True),
    Pair("torch_ema", "ExponentialMovingAverage(params, decay, use_num_updates=False).update()",
         _torch_ema(False), _torch_ema(True), fp32_shadows=False, per_tensor=True,
         module="torch_ema"),
    Pair("ema-pytorch", "EMA(model, beta=decay, update_after_step=0, update_every=1).update()",
         _ema_pytorch(False, False), _ema_pytorch(True, False), fp32_shadows=False,
         per_tensor=True, module="ema_pytorch"),
    Pair("ema-pytorch(use_foreach=True)", "the same with use_foreach=True",
         _ema_pytorch(False, True), _ema_pytorch(True, True), fp32_shadows=False,
         module="ema_pytorch"),
    Pair("diffusers EMAModel", "EMAModel(params, decay).step(params)", _diffusers(False, False),
         _diffusers(True, False), fp32_shadows=False, per_tensor=True, module="diffusers"),
    Pair("diffusers EMAModel(foreach=True)", "the same with foreach=True",
         _diffusers(False, True), _diffusers(True, True), fp32_shadows=False,
         module="diffusers"),
)
