"""ema-pytorch's ``EMA`` over :class:`ema_fused.EMA`.

    from ema_fused.compat.ema_pytorch import EMA   # was: from ema_pytorch import EMA

Same constructor, methods, attributes, buffers (``initted``, ``step``) and ``state_dict``
(``online_model.*``, ``ema_model.*``); ``ema_model`` is the averaged copy of the model
(``EMA.shadow_module()``, or the ``ema_model`` you pass, bound with ``bind_shadows``).
The update is one fused pass whatever ``use_foreach`` says.  Needs no ema-pytorch
installed.  Only ``nn.Module`` models (ema-pytorch's pytree EMA is not covered).
"""
from __future__ import annotations

from typing import Callable, Optional, Union

import torch
from torch import nn

from ..ema import EMA as _FusedEMA
from ..ops import ema_update_
from . import _decays
from ._names import float_names, exact_patterns, pairs_by_name


class EMA(nn.Module):
    """Exponential moving average of a module (ema-pytorch's API): ``update()`` after each
    optimizer step; the first call copies the model, then every ``update_every`` calls
    average it (copying up to ``update_after_step``) with the warmup decay
    ``clamp(1 - (1 + (step - update_after_step - 1) / inv_gamma) ** -power, min_value, beta)``.
    """

    def __init__(self, model: nn.Module,
                 ema_model: Optional[Union[nn.Module, Callable[[], nn.Module]]] = None,
                 beta: float = 0.9999, update_after_step: int = 100, update_every: int = 10,
                 inv_gamma: float = 1.0, power: float = 2 / 3, min_value: float = 0.0,
                 param_or_buffer_names_no_ema: set[str] = set(), ignore_names: set[str] = set(),
                 ignore_startswith_names: set[str] = set(), include_online_model: bool = True,
                 allow_different_devices: bool = False, use_foreach: bool = False,
                 update_model_with_ema_every: Optional[int] = None,
                 update_model_with_ema_beta: float = 0.0,
                 forward_method_names: tuple[str, ...] = (),
                 move_ema_to_online_device: bool = False, coerce_dtype: bool = False,
                 lazy_init_ema: bool = False) -> None:
        if not isinstance(model, nn.Module):
            raise TypeError("ema_fused.compat.ema_pytorch.EMA takes an nn.Module (ema-pytorch's "
                            f"pytree EMA is not covered), got {type(model).__name__}")
        super().__init__()
        self.beta = beta
        self.is_frozen = beta == 1.0
        self.include_online_model = include_online_model
        self.online_model = model if include_online_model else [model]
        if not isinstance(ema_model, nn.Module) and callable(ema_model):
            ema_model = ema_model()
        self.ema_model = None
        self.forward_method_names = forward_method_names
        assert isinstance(param_or_buffer_names_no_ema, (set, list))
        self.param_or_buffer_names_no_ema = param_or_buffer_names_no_ema
        self.ignore_names = ignore_names
        self.ignore_startswith_names = ignore_startswith_names
        self.update_every, self.update_after_step = update_every, update_after_step
        self.inv_gamma, self.power, self.min_value = inv_gamma, power, min_value
        self.update_model_with_ema_every = update_model_with_ema_every
        self.update_model_with_ema_beta = update_model_with_ema_beta
        self.allow_different_devices = allow_different_devices
        self.coerce_dtype = coerce_dtype
        self.move_ema_to_online_device = move_ema_to_online_device
        self.use_foreach = use_foreach  # kept for the API: the update is fused either way
        self._fused: Optional[_FusedEMA] = None
        self._copied: set[str] = set()  # names copied, not averaged (made by init_ema)
        self._no_ema: set[str] = set()  # ... of them, those copied at averaging steps too
        if not lazy_init_ema:
            self.init_ema(ema_model)
        else:
            assert ema_model is None
        self.register_buffer("initted", torch.tensor(False))
        self.register_buffer("step", torch.tensor(0))

    @property
    def model(self) -> nn.Module:
        return self.online_model if self.include_online_model else self.online_model[0]

    def init_ema(self, ema_model: Optional[nn.Module] = None) -> None:
        """Make the averaged copy (or bind ``ema_model``'s tensors as the averages)."""
        model = self.model
        averaged = float_names(model)
        # the caller's lists: ignored names are copied at copying steps only, "no EMA" ones
        # at every step; integer tensors are never touched, as in ema-pytorch
        ignored = {n for n in averaged if n in self.ignore_names
                   or any(n.startswith(p) for p in self.ignore_startswith_names)}
        self._no_ema = {n for n in averaged if n in self.param_or_buffer_names_no_ema} - ignored
        self._copied = ignored | self._no_ema
        left_out = [n for n, t in model.state_dict(keep_vars=True).items()
                    if isinstance(t, torch.Tensor) and (n not in averaged or n in self._copied)]
        self._fused = _FusedEMA(model, dtype=None, exclude=exact_patterns(left_out))
        if ema_model is None:
            ema_model = self._fused.shadow_module()
        else:
            self._fused.bind_shadows(ema_model)
        self.ema_model = ema_model
        for p in self.ema_model.parameters():
            p.detach_()
        for name in self.forward_method_names:
            setattr(self, name, getattr(self.ema_model, name))
        self.parameter_names = {n for n, p in self.ema_model.named_parameters()
                                if torch.is_floating_point(p) or torch.is_complex(p)}
        self.buffer_names = {n for n, b in self.ema_model.named_buffers()
                             if torch.is_floating_point(b) or torch.is_complex(b)}

    def add_to_optimizer_post_step_hook(self, optimizer: torch.optim.Optimizer):
        assert hasattr(optimizer, "register_step_post_hook")
        return optimizer.register_step_post_hook(lambda *_: self.update())

    def eval(self):
        return self.ema_model.eval()

    @torch.no_grad()
    def forward_eval(self, *args, **kwargs):
        training = self.ema_model.training
        out = self.ema_model(*args, **kwargs)
        self.ema_model.train(training)
        return out

    def restore_ema_model_device(self) -> None:
        self.ema_model.to(self.initted.device)

    def get_params_iter(self, model: nn.Module):
        return ((n, p) for n, p in model.named_parameters() if n in self.parameter_names)

    def get_buffers_iter(self, model: nn.Module):
        return ((n, b) for n, b in model.named_buffers() if n in self.buffer_names)

    def _copy_named(self, dst: nn.Module, src: nn.Module, names) -> None:
        if not names:  # the usual case: no module walk at all
            return
        with torch.no_grad():
            for d, s in pairs_by_name(dst, src, names):
                d.copy_(s.to(device=d.device, dtype=d.dtype))

    def copy_params_from_model_to_ema(self) -> None:
        self._fused.update_from(self.model, decay=0.0)
        self._copy_named(self.ema_model, self.model, self._copied)

    def copy_params_from_ema_to_model(self) -> None:
        self._fused.copy_to(self.model)
        self._copy_named(self.model, self.ema_model, self._copied)

    def update_model_with_ema(self, decay: Optional[float] = None) -> None:
        decay = self.update_model_with_ema_beta if decay is None else decay
        if decay == 0.0:
            return self.copy_params_from_ema_to_model()
        self.update_moving_average(self.model, self.ema_model, decay)

    def get_current_decay(self) -> float:
        return _decays.power(int(self.step.item()) - self.update_after_step, self.beta,
                             self.inv_gamma, self.power, self.min_value)

    def update(self) -> None:
        step = int(self.step.item())
        self.step += 1
        if not self.initted.item():
            if self.ema_model is None:
                self.init_ema()
            self.copy_params_from_model_to_ema()
            self.initted.data.copy_(torch.tensor(True))
            return
        should_update = step % self.update_every == 0
        if should_update and step <= self.update_after_step:
            self.copy_params_from_model_to_ema()
            return
        if should_update:
            self.update_moving_average(self.ema_model, self.model)
        every = self.update_model_with_ema_every
        if every is not None and step % every == 0:
            self.update_model_with_ema()

    @torch.no_grad()
    def update_moving_average(self, ma_model: nn.Module, current_model: nn.Module,
                              current_decay: Optional[float] = None) -> None:
        """``ma_model <- lerp(ma_model, current_model, 1 - decay)`` over the averaged names
        (those in ``param_or_buffer_names_no_ema`` are copied, ignored ones left alone)."""
        if self.is_frozen:
            return
        if self.move_ema_to_online_device:
            here, there = _device_of(ma_model), _device_of(current_model)
            if here != there:
                ma_model.to(there)
        decay = self.get_current_decay() if current_decay is None else current_decay
        if ma_model is self.ema_model and current_model is self.model:
            self._fused.update_from(current_model, decay=decay)
        else:  # the other way round (update_model_with_ema) or other models: the op layer
            names = (self.parameter_names | self.buffer_names) - self._copied
            pairs = pairs_by_name(ma_model, current_model, names)
            ema_update_([d for d, _ in pairs], [s.to(d.device) for d, s in pairs], 1.0 - decay)
        self._copy_named(ma_model, current_model, self._no_ema)

    def __call__(self, *args, **kwargs):
        return self.ema_model(*args, **kwargs)


def _device_of(module: nn.Module) -> torch.device:
    return next(module.parameters()).device

