"""diffusers' ``EMAModel`` (``diffusers.training_utils``) over :class:`ema_fused.EMA`.

    from ema_fused.compat.diffusers import EMAModel
    # was: from diffusers.training_utils import EMAModel

Same constructor, methods, attributes, ``state_dict`` format (what accelerate's
``register_for_checkpointing`` saves), ``save_pretrained``/``from_pretrained`` and
numbers; ``step()`` is one fused pass whatever ``foreach`` says.  Needs no diffusers
installed (``model_cls`` is used through its own methods).
"""
from __future__ import annotations

import copy
import sys
import warnings
from typing import Any, Iterable, Optional

import torch

from ..ops import ema_copy_
from . import _decays
from . import _lists

_VALIDATED = {  # state_dict key -> (accepted types, diffusers' message)
    "min_decay": (float, "Invalid min_decay"),
    "optimization_step": (int, "Invalid optimization_step"),
    "update_after_step": (int, "Invalid update_after_step"),
    "use_ema_warmup": (bool, "Invalid use_ema_warmup"),
    "inv_gamma": ((float, int), "Invalid inv_gamma"),
    "power": ((float, int), "Invalid power"),
}


def _deprecated(what: str, message: str) -> None:
    warnings.warn(f"{what} is deprecated and will be removed in diffusers 1.0.0. {message}",
                  FutureWarning, stacklevel=3)


def _refuse_zero3() -> None:
    """diffusers gathers ZeRO-3 partitions around each update; the fused update reads the
    local tensors and cannot (transformers is looked at only if it is imported already)."""
    transformers = sys.modules.get("transformers")
    deepspeed = getattr(getattr(transformers, "integrations", None), "deepspeed", None)
    if deepspeed is not None and deepspeed.is_deepspeed_zero3_enabled():
        raise NotImplementedError("EMAModel: DeepSpeed ZeRO-3 partitions the parameters; "
                                  "ema_fused.compat.diffusers does not gather them (use "
                                  "diffusers' own EMAModel under ZeRO-3)")


class EMAModel:
    """Exponential moving average of model weights (diffusers' API).

    Args, attributes and methods as in ``diffusers.training_utils.EMAModel``: the shadows
    (``shadow_params``) keep each parameter's dtype and device; ``step(parameters)``
    averages the parameters that require grad and copies the others.  ``store`` keeps
    its copy on the CPU, as diffusers' does.
    """

    def __init__(self, parameters: Iterable[torch.nn.Parameter], decay: float = 0.9999,
                 min_decay: float = 0.0, update_after_step: int = 0,
                 use_ema_warmup: bool = False, inv_gamma: float = 1.0, power: float = 2 / 3,
                 foreach: bool = False, model_cls: Optional[Any] = None,
                 model_config: Optional[dict[str, Any]] = None, **kwargs: Any) -> None:
        if isinstance(parameters, torch.nn.Module):
            _deprecated("Passing a `torch.nn.Module` to `ExponentialMovingAverage`",
                        "Please pass the parameters of the module instead.")
            parameters = parameters.parameters()
            use_ema_warmup = True  # as diffusers does, for old callers
        if kwargs.get("max_value") is not None:
            _deprecated("The `max_value` argument", "Please use `decay` instead.")
            decay = kwargs["max_value"]
        if kwargs.get("min_value") is not None:
            _deprecated("The `min_value` argument", "Please use `min_decay` instead.")
            min_decay = kwargs["min_value"]
        self._ema = _lists.list_ema(list(parameters))
        if kwargs.get("device") is not None:
            _deprecated("The `device` argument", "Please use `to` instead.")
            self.to(device=kwargs["device"])
        self.decay, self.min_decay = decay, min_decay
        self.update_after_step, self.use_ema_warmup = update_after_step, use_ema_warmup
        self.inv_gamma, self.power = inv_gamma, power
        self.optimization_step = 0
        self.cur_decay_value: Optional[float] = None  # set in step()
        self.foreach = foreach  # kept for the API: the update is fused either way
        self.model_cls, self.model_config = model_cls, model_config

    @property
    def shadow_params(self) -> list[torch.Tensor]:
        """The averages, one per parameter (the EMA's shadows themselves)."""
        return _lists.shadow_list(self._ema)

    @property
    def temp_stored_params(self) -> Optional[list[torch.Tensor]]:
        """What :meth:`store` kept (on the CPU), or None."""
        return _lists.stored_list(self._ema)

    @classmethod
    def from_pretrained(cls, path, model_cls, foreach: bool = False) -> "EMAModel":
        """An EMAModel from a folder written by :meth:`save_pretrained`."""
        _, ema_kwargs = model_cls.from_config(path, return_unused_kwargs=True)
        model = model_cls.from_pretrained(path)
        ema_model = cls(model.parameters(), model_cls=model_cls, model_config=model.config,
                        foreach=foreach)
        ema_model.load_state_dict(ema_kwargs)
        return ema_model

    def save_pretrained(self, path) -> None:
        """Save a model of ``model_cls`` holding the averages, with the EMA's settings in its
        config (what :meth:`from_pretrained` reads)."""
        if self.model_cls is None:
            raise ValueError("`save_pretrained` can only be used if `model_cls` was defined at "
                             "__init__.")
        if self.model_config is None:
            raise ValueError("`save_pretrained` can only be used if `model_config` was defined "
                             "at __init__.")
        model = self.model_cls.from_config(self.model_config)
        state_dict = self.state_dict()
        state_dict.pop("shadow_params", None)
        model.register_to_config(**state_dict)
        self.copy_to(model.parameters())
        model.save_pretrained(path)

    def get_decay(self, optimization_step: int) -> float:
        """The decay of the update at ``optimization_step`` (0.0: a copy)."""
        n = max(0, optimization_step - self.update_after_step - 1)
        if n <= 0:
            return 0.0
        if self.use_ema_warmup:
            return _decays.power(n + 1, self.decay, self.inv_gamma, self.power, self.min_decay)
        return _decays.counted(n, self.decay, self.min_decay)

    @torch.no_grad()
    def step(self, parameters: Iterable[torch.nn.Parameter]) -> None:
        """Average ``parameters`` in (those with ``requires_grad=False`` are copied)."""
        if isinstance(parameters, torch.nn.Module):
            _deprecated("Passing a `torch.nn.Module` to `ExponentialMovingAverage.step`",
                        "Please pass the parameters of the module instead.")
            parameters = parameters.parameters()
        parameters = list(parameters)
        _refuse_zero3()
        self.optimization_step += 1
        decay = self.get_decay(self.optimization_step)
        self.cur_decay_value = decay
        self._ema.update_from(parameters, decay=decay)
        frozen = [i for i, p in enumerate(parameters) if not p.requires_grad]
        if frozen and decay != 0.0:
            shadows = self.shadow_params
            ema_copy_([shadows[i] for i in frozen], [parameters[i] for i in frozen])

    def copy_to(self, parameters: Iterable[torch.nn.Parameter]) -> None:
        """Write the averages into ``parameters``."""
        self._ema.copy_to(list(parameters))

    def pin_memory(self) -> None:
        """Put the (CPU) averages in pinned memory, for asynchronous offloading copies."""
        self._ema.pin_memory()

    def to(self, device=None, dtype=None, non_blocking: bool = False) -> None:
        """Move the averages to ``device``; cast the floating ones to ``dtype``."""
        self._ema.to(device=device, dtype=dtype, non_blocking=non_blocking)

    def state_dict(self) -> dict:
        """diffusers' format: the settings, ``optimization_step`` and ``shadow_params``."""
        return {"decay": self.decay, "min_decay": self.min_decay,
                "optimization_step": self.optimization_step,
                "update_after_step": self.update_after_step,
                "use_ema_warmup": self.use_ema_warmup, "inv_gamma": self.inv_gamma,
                "power": self.power, "shadow_params": self.shadow_params}

    def store(self, parameters: Iterable[torch.nn.Parameter]) -> None:
        """Keep a CPU copy of ``parameters`` for :meth:`restore`."""
        _lists.load_stored_list(self._ema, [p.detach().cpu().clone() for p in parameters])

    def restore(self, parameters: Iterable[torch.nn.Parameter]) -> None:
        """Put back what :meth:`store` kept, and forget it."""
        if self.temp_stored_params is None:
            raise RuntimeError("This ExponentialMovingAverage has no `store()`ed weights to "
                               "`restore()`")
        self._ema.restore(list(parameters))

    def load_state_dict(self, state_dict: dict) -> None:
        """Load diffusers' format (keys may be missing: those settings stay).  The averages
        are cast into the shadows' dtype and device; their number must match."""
        state_dict = copy.deepcopy(state_dict)
        decay = state_dict.get("decay", self.decay)
        if decay < 0.0 or decay > 1.0:
            raise ValueError("Decay must be between 0 and 1")
        values = {"decay": decay}
        for key, (types, message) in _VALIDATED.items():
            values[key] = state_dict.get(key, getattr(self, key))
            if not isinstance(values[key], types):
                raise ValueError(message)
        shadows = state_dict.get("shadow_params", None)
        if shadows is not None:
            if not isinstance(shadows, list):
                raise ValueError("shadow_params must be a list")
            if not all(isinstance(p, torch.Tensor) for p in shadows):
                raise ValueError("shadow_params must all be Tensors")
            wrong = (f"{len(shadows)} shadow_params for {len(self.shadow_params)} parameters"
                     if len(shadows) != len(self.shadow_params)
                     else _lists.shape_mismatch(self._ema, shadows))
            if wrong is not None:
                raise ValueError(f"EMAModel.load_state_dict: {wrong}")
            _lists.load_shadow_list(self._ema, shadows)
        for key, value in values.items():
            setattr(self, key, value)
