"""Shadows that are a module's own tensors (mixed into ``EMA``): ``shadow_module()`` makes
a copy of the tracked model whose parameters and buffers *are* the shadows, and
``bind_shadows(module)`` makes an existing copy's tensors the shadows.

This is the averaged model of timm's ``ModelEmaV2/V3.module``, ema-pytorch's
``ema_model`` and ``AveragedModel.module``: every update shows in it at once, with no
``copy_to``, and it saves, loads and moves like any module.  The EMA follows the module:
``module.to(...)`` or ``p.data = ...`` keep the parameter objects (the update plan sees
their new storage), and a tensor replaced in the module (``load_state_dict(assign=True)``,
a new ``nn.Parameter``) becomes the shadow at the next use.  While bound, the shadows stay
where the module puts them: they do not follow the tracked model across devices.
"""
from __future__ import annotations

import copy
from typing import Optional

import torch
from torch import nn

from .. import distributed as _distributed
from ..backends import extension as _extension
from ..checks import ModelChangedError, lossless
from .model_checks import resolve


class _Binding:
    """The module holding the shadows, and a check that it still holds them: every
    module-tree edge down to each shadow's owner and every slot, watched by one C++
    ``Snapshot`` call where the extension is loaded (else a Python loop over the same
    links)."""

    def __init__(self, module: nn.Module, paths: list[tuple[str, str, bool]],
                 shadows: list[torch.Tensor]) -> None:
        self.module, self.paths = module, paths  # per entry: (module path, key, is_buffer)
        self._links = self._make_links(shadows)
        self._watch = self._make_watch()

    def _make_links(self, shadows) -> Optional[list[tuple[dict, str, object]]]:
        links: list[tuple[dict, str, object]] = []
        seen: set[str] = set()
        for (path, key, is_buffer), shadow in zip(self.paths, shadows):
            owner, walked = self.module, ""
            for part in path.split(".") if path else ():
                child = owner._modules.get(part)
                if child is None:
                    return None
                walked = f"{walked}.{part}" if walked else part
                if walked not in seen:
                    seen.add(walked)
                    links.append((owner._modules, part, child))
                owner = child
            links.append((owner._buffers if is_buffer else owner._parameters, key, shadow))
        return links

    def _make_watch(self) -> Optional[object]:
        if self._links is None or not _extension.load(build=False):
            return None
        d, k, c = zip(*self._links) if self._links else ((), (), ())
        return _extension.module().Snapshot(list(d), list(k), list(c), [], [], [], [], [])

    def still_holds(self) -> bool:
        if self._links is None:
            return False
        if self._watch is not None:
            return self._watch.still_valid()
        return all(table.get(key) is child for table, key, child in self._links)

    def __getstate__(self) -> dict:  # the C++ watch is not copied; made again on load
        return {"module": self.module, "paths": self.paths, "_links": self._links}

    def __setstate__(self, state: dict) -> None:
        self.__dict__.update(state)
        self._watch = self._make_watch()


class BoundShadows:
    """``shadow_module`` and ``bind_shadows`` for :class:`ema_fused.EMA`."""

    _bound: Optional[_Binding] = None

    def shadow_module(self) -> nn.Module:
        """A copy of the tracked model (``copy.deepcopy``) whose parameters and buffers
        are this EMA's shadows, not copies of them: evaluate or save it at any time.

        Parameters keep their ``requires_grad``; tensors the EMA leaves out (``exclude``,
        ``buffers="ignore"``, frozen ones under ``trainable_only``) are plain copies.  The
        shadows are not copied again (no extra memory beyond the model's other state).
        Not with ``bias_correction=True`` (the shadows are not the average then) or
        sharded (DTensor) shadows.
        """
        with self._lock:
            self._guard("shadow_module")
            model = self._check_bindable("shadow_module")
            memo: dict[int, object] = {}
            for t, s in zip(self._tracked.read(), self._shadows):
                memo[id(t)] = (nn.Parameter(s, requires_grad=t.requires_grad)
                               if isinstance(t, nn.Parameter) else s)
            module = copy.deepcopy(model, memo)
            self._bind(module, check_dtypes=False)
            return module

    def bind_shadows(self, module: nn.Module) -> None:
        """Make the tensors of ``module`` (a copy of the tracked model: the same names and
        shapes) this EMA's shadows, with the values they hold now.

        Averaged tensors may be of any float dtype at least as wide as the model's
        (bf16 shadows of a bf16 model, fp32 of either); copied ones (integers) must have
        the model tensor's dtype.  The EMA's own shadows are dropped.
        """
        with self._lock:
            self._guard("bind_shadows")
            model = self._check_bindable("bind_shadows")
            if not isinstance(module, nn.Module):
                raise TypeError(f"EMA.bind_shadows: expected an nn.Module, got "
                                f"{type(module).__name__}")
            if module is model:
                raise ValueError("EMA.bind_shadows: the tracked model cannot hold its own "
                                 "shadows; pass a copy of it")
            self._bind(module, check_dtypes=True)

    def _check_bindable(self, what: str) -> nn.Module:
        model = self._tracked.module
        if model is None:
            raise TypeError(f"EMA.{what}: this EMA was made from a list of tensors; a module "
                            "can hold the shadows only of an EMA made from a module")
        if self.bias_correction:
            raise ValueError(f"EMA.{what}: with bias_correction=True the shadows are not the "
                             "average (every read divides them); use copy_to() instead")
        if self._device_schedule is not None:
            raise ValueError(f"EMA.{what}: not with capturable=True")
        if any(_distributed.is_dtensor(s) for s in self._shadows):
            raise TypeError(f"EMA.{what}: sharded (DTensor) shadows cannot be a module's tensors")
        return model

    def _bind(self, module: nn.Module, check_dtypes: bool) -> None:
        """Take ``module``'s tensors as the shadows (every check before any change)."""
        entries = self._tracked.entries
        tensors = self._tracked.read(module)  # names, shapes and ties as the tracked model's
        model_tensors = self._tracked.read()
        for e, t, m in zip(entries, tensors, model_tensors):
            if _distributed.is_dtensor(t):
                raise TypeError(f"EMA.bind_shadows: tensor {e.name!r} of the module is a DTensor")
            if check_dtypes and not _holds(e.averaged, m.dtype, t.dtype):
                raise TypeError(f"EMA.bind_shadows: tensor {e.name!r} of the module is {t.dtype} "
                                f"and cannot hold the average of the model's {m.dtype} tensor")
        paths = [(e.module_path, e.key, e.is_buffer) for e in entries]
        if resolve(module, "") is not module:
            raise TypeError("EMA.bind_shadows: pass the module itself, not a wrapper around it")
        self._shadows = list(tensors)
        self._bound = _Binding(module, paths, self._shadows)
        self._plan = None

    def _follow_bound(self) -> None:
        """Before a use: where the bound module now holds other tensors (a slot assigned
        anew), those become the shadows; shapes must stay (else ModelChangedError)."""
        bound = self._bound
        if bound is None or bound.still_holds():
            return
        module = bound.module
        try:
            tensors = self._tracked.read(module)
        except ModelChangedError as exc:
            raise ModelChangedError(f"EMA: the module holding the shadows changed: {exc}") from exc
        self._shadows = list(tensors)
        self._bound = _Binding(module, bound.paths, self._shadows)
        self._plan = None


def _holds(averaged: bool, model_dtype: torch.dtype, dtype: torch.dtype) -> bool:
    """Whether a shadow of ``dtype`` can hold the model's ``model_dtype`` tensor."""
    if averaged:
        return dtype.is_floating_point and lossless(model_dtype, dtype)
    return dtype == model_dtype
