"""Everything the suite times: one EMA update of a model, each provider on the same tensors.

A :class:`Provider` turns ``(model, decay)`` into a zero-argument callable that does
one update.  Shadows start as copies of the weights and the weights do not change
between updates: the cost of an update does not depend on the values.

* every ema_fused backend usable on the device, as ``EMA(model, decay, backend=name)``;
* ``torch._foreach_lerp_`` on the raw lists, fp32 shadows (bf16/fp16 params are cast
  to fp32 first, the whole list at once: ``_foreach_lerp_`` refuses mixed dtypes);
* timm ``ModelEmaV3(dtype=torch.float32)`` and ``ModelEmaV2``;
* ``AveragedModel(multi_avg_fn=get_ema_multi_avg_fn(d))``, ``torch_ema``, ``ema-pytorch``;
* the naive per-tensor loop ``shadow = d * shadow + (1 - d) * param`` (fp32 shadows);
* ``copy (roofline)``: ``dst.copy_(src)`` of uint8 buffers, half the bytes an fp32-shadow
  update must move (a copy reads and writes each byte), in pieces of at most 1 GiB.

timm V2, AveragedModel, torch_ema and ema-pytorch keep shadows in the model's dtype
(bf16 for a bf16 model): they move fewer bytes (6 per element instead of 10) and are
not FP32 master shadows; :func:`shadow_dtype` says so, and their GB/s counts the bytes
they move.  A peer whose package is missing is skipped with the reason.
"""
from __future__ import annotations

import importlib
from dataclasses import dataclass
from typing import Callable, Optional

import torch
from torch import nn

import ema_fused

Update = Callable[[], None]
GiB = 2**30
COPY_CHUNK = GiB


@dataclass(frozen=True)
class Provider:
    """One way to run an EMA update.

    ``kind``: ``"ema_fused"``, ``"peer"`` (what ema_fused is compared with) or
    ``"roofline"``.  ``fp32_shadows``: False where shadows keep the model dtype.
    Memory estimates, to decide what fits: ``extra(p)`` bytes per model element it
    holds beyond the model for a param element size ``p`` (shadows, deep copies, at
    their peak while being made); ``temp`` bytes per element of the largest tensor one
    update allocates; ``casts_model``: an update also makes an fp32 copy of every
    param that is not fp32.
    """

    name: str
    kind: str
    about: str
    make: Callable[[nn.Module, float], Update]
    fp32_shadows: bool = True
    extra: Callable[[int], float] = lambda p: 4
    temp: float = 0.0
    casts_model: bool = False
    module: Optional[str] = None  # importable module this provider needs

    def shadow_dtype(self, param_dtype: torch.dtype) -> Optional[torch.dtype]:
        if self.kind == "roofline":
            return None
        return torch.float32 if self.fp32_shadows else param_dtype

    def bytes_moved(self, numel: int, param_dtype: torch.dtype) -> int:
        """Bytes an update must move: read param + read shadow + write shadow.

        The roofline is counted like an fp32-shadow update of the same model.
        """
        p = torch.empty((), dtype=param_dtype).element_size()
        s = 4 if self.shadow_dtype(param_dtype) in (None, torch.float32) else p
        return numel * (p + 2 * s)

    def memory_estimate(self, numel: int, largest: int, param_dtype: torch.dtype) -> int:
        """Rough bytes it needs beyond the model (to decide what fits)."""
        p = torch.empty((), dtype=param_dtype).element_size()
        if self.kind == "roofline":
            return 2 * min(self.bytes_moved(numel, param_dtype) // 2, COPY_CHUNK)
        cast = 4 * numel if self.casts_model and p != 4 else 0
        return int(numel * self.extra(p) + self.temp * largest + cast)


def _params(model: nn.Module) -> list[torch.Tensor]:
    return [p.detach() for p in model.parameters()]


def _fp32_copies(params: list[torch.Tensor]) -> list[torch.Tensor]:
    return [p.to(torch.float32, copy=True) for p in params]


def _ours(backend: str) -> Callable[[nn.Module, float], Update]:
    def make(model, decay):
        return ema_fused.EMA(model, decay=decay, backend=backend).update
    return make


def _foreach_lerp(model, decay):
    params = _params(model)
    shadows = _fp32_copies(params)
    weight = 1.0 - decay
    mixed = any(p.dtype != torch.float32 for p in params)

    def update():
        # What a user writes: cast the whole list first, since _foreach_lerp_ refuses
        # a bf16 end with an fp32 start.
        src = [p.float() for p in params] if mixed else params
        torch._foreach_lerp_(shadows, src, weight)
    return update


def _timm_v3(model, decay):
    from timm.utils import ModelEmaV3
    ema = ModelEmaV3(model, decay=decay, dtype=torch.float32)
    return lambda: ema.update(model)


def _timm_v2(model, decay):
    from timm.utils import ModelEmaV2
    ema = ModelEmaV2(model, decay=decay)
    return lambda: ema.update(model)


def _averaged_model(model, decay):
    from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn
    avg = AveragedModel(model, multi_avg_fn=get_ema_multi_avg_fn(decay))
    return lambda: avg.update_parameters(model)


def _torch_ema(model, decay):
    from torch_ema import ExponentialMovingAverage
    return ExponentialMovingAverage(model.parameters(), decay=decay, use_num_updates=False).update


def _ema_pytorch(model, decay):
    from ema_pytorch import EMA
    # Its first update() only copies the model; the warm-up rounds absorb it.
    return EMA(model, beta=decay, update_after_step=0, update_every=1).update


def _naive(model, decay):
    params = _params(model)
    shadows = _fp32_copies(params)

    def update():
        with torch.no_grad():
            for s, p in zip(shadows, params):
                s.copy_(decay * s + (1 - decay) * p)
    return update


def _copy(model, decay):
    params = _params(model)
    numel = sum(p.numel() for p in params)
    total = numel * (params[0].element_size() + 8) // 2  # bytes of an fp32-shadow update / 2
    chunk = max(1, min(total, COPY_CHUNK))
    src = torch.empty(chunk, dtype=torch.uint8, device=params[0].device).fill_(1)
    dst = torch.empty_like(src)
    full, rest = divmod(total, chunk)

    def update():
        for _ in range(full):
            dst.copy_(src)
        if rest:
            dst[:rest].copy_(src[:rest])
    return update


def _deepcopy(p: int) -> float:
    return p


PEERS = (
    Provider("torch._foreach_lerp_", "peer", "torch._foreach_lerp_ on the raw lists, fp32 "
             "shadows (low-precision params cast to fp32 first)", _foreach_lerp,
             casts_model=True),
    Provider("timm ModelEmaV3", "peer", "timm ModelEmaV3(model, decay, dtype=torch.float32)"
             ".update(model)", _timm_v3, extra=lambda p: 4 + p if p != 4 else 4, temp=4.0,
             module="timm"),
    Provider("timm ModelEmaV2", "peer", "timm ModelEmaV2(model, decay).update(model): shadows "
             "in the model dtype", _timm_v2, fp32_shadows=False, extra=_deepcopy,
             temp=8.0, module="timm"),
    Provider("AveragedModel", "peer", "torch.optim.swa_utils.AveragedModel(model, multi_avg_fn="
             "get_ema_multi_avg_fn(decay)).update_parameters(model): shadows in the model dtype",
             _averaged_model, fp32_shadows=False, extra=_deepcopy),
    Provider("torch_ema", "peer", "torch_ema ExponentialMovingAverage(params, decay, "
             "use_num_updates=False).update(): shadows in the model dtype", _torch_ema,
             fp32_shadows=False, extra=_deepcopy, temp=4.0, module="torch_ema"),
    Provider("ema-pytorch", "peer", "ema_pytorch EMA(model, beta=decay, update_after_step=0, "
             "update_every=1).update(): shadows in the model dtype", _ema_pytorch,
             fp32_shadows=False, extra=_deepcopy, module="ema_pytorch"),
    Provider("naive loop", "peer", "per tensor: shadow.copy_(d * shadow + (1 - d) * param), "
             "fp32 shadows", _naive, temp=12.0),
)
COPY = Provider("copy (roofline)", "roofline", "dst.copy_(src) of uint8 buffers: half the bytes "
                "of an fp32-shadow update, read once and written once", _copy, extra=lambda p: 0)


def _importable(module: str) -> Optional[str]:
    """None if ``module`` imports, else why not."""
    try:
        importlib.import_module(module)
    except Exception as exc:  # a broken install is as unusable as a missing one
        return f"{module} is not importable ({type(exc).__name__}: {exc})"
    return None


def discover(device: torch.device) -> tuple[list[Provider], dict[str, str]]:
    """The providers that can run on ``device``, and ``{name: reason}`` for the others."""
    usable: list[Provider] = []
    skipped: dict[str, str] = {}
    for name, (ok, reason) in ema_fused.available_backends(device).items():
        label = f"ema_fused[{name}]"
        if ok and name == "triton" and device.type == "cpu":
            # Usable on the CPU only through Triton's interpreter (a test mode): timing it
            # says nothing about the kernels and takes seconds per update.
            skipped[label] = "runs on the CPU only through Triton's interpreter; not timed"
        elif ok:
            usable.append(Provider(label, "ema_fused", f"ema_fused EMA(model, decay, "
                                   f"backend={name!r}).update(): {reason}", _ours(name),
                                   temp=4.0))
        else:
            skipped[label] = reason
    for p in PEERS + (COPY,):
        why = _importable(p.module) if p.module else None
        if why:
            skipped[p.name] = why
        else:
            usable.append(p)
    return usable, skipped
