"""Which tensors of a model an EMA follows, and reading them fresh at every use.

Tensors are never cached: each read goes through the owning module's
``_parameters`` / ``_buffers`` dict (or the tensor object the user passed), so
``model.to(...)``, ``p.data = ...`` and ``load_state_dict(assign=True)`` are
followed and old storage is never touched.  Removed, added or reshaped tensors, ties
that came apart or together, and frozen parameters that became trainable raise
:class:`ModelChangedError` naming them (the checks are in :mod:`.model_checks`).
"""
from __future__ import annotations

import fnmatch
from dataclasses import dataclass
from typing import Iterable, Optional, Sequence, Union

import torch
from torch import nn

from .as_module import tensor_names_only
from .model_checks import (ModelChangedError, Slot, check_frozen, check_holdable, check_ties,
                            resolve, unwrap)
from ..checks import FLOAT_DTYPES

__all__ = ["ModelChangedError", "Tracked", "Entry", "Source", "unwrap"]

Source = Union[nn.Module, Sequence[torch.Tensor]]


@dataclass
class Entry:
    """One distinct tensor: its state_dict name, where to read it, and how to average it."""
    name: str
    module_path: str  # "" for the root module, None-equivalent unused for tensor lists
    key: str          # attribute name in the module, or the list index as a string
    is_buffer: bool
    averaged: bool    # True: float math; False: copied each update
    shape: torch.Size


class _ListOwner:
    """A tensor list seen as a module whose parameters are its items (for the slot checks)."""

    def __init__(self, items: dict) -> None:
        self._parameters, self._buffers = items, {}


def _matches(name: str, patterns: Sequence[str]) -> bool:
    return any(fnmatch.fnmatchcase(name, p) for p in patterns)


class Tracked:
    """The distinct tensors of a module (named as in its state_dict) or of a tensor list."""

    def __init__(self, source: Union[nn.Module, Iterable[torch.Tensor]], buffers: str,
                 exclude: Sequence[str], trainable_only: bool = False) -> None:
        source = unwrap(source)
        self.module: Optional[nn.Module] = source if isinstance(source, nn.Module) else None
        self.entries: list[Entry] = []
        self.aliases: dict[str, int] = {}  # every name (aliases too) -> entry index
        self.alias_slots: list[Slot] = []  # names that share an entry's tensor (tied)
        self.frozen: list[Slot] = []  # parameters trainable_only=True left out
        if self.module is not None:
            self._from_module(self.module, buffers, exclude, trainable_only)
        else:
            self.tensors = list(source)
            seen: dict[int, int] = {}
            for i, t in enumerate(self.tensors):
                if not isinstance(t, torch.Tensor):
                    raise TypeError(f"EMA: item {i} of the parameter list is a "
                                    f"{type(t).__name__}, not a tensor")
                name = str(i)
                if _matches(name, exclude):
                    continue
                if trainable_only and not t.requires_grad:
                    self.frozen.append(Slot(name, "", name, False, -1))
                    continue
                self._add(name, "", name, False, t, seen)
        if not self.entries:
            frozen = (f", and trainable_only=True left out {len(self.frozen)} parameters with "
                      "requires_grad=False (freeze fewer, or pass trainable_only=False)"
                      if self.frozen else "")
            raise ValueError("EMA: nothing to average: no tensors left after applying "
                             f"buffers={buffers!r} and exclude={list(exclude)!r}{frozen}")

    def _add(self, name, path, key, is_buffer, t, seen, averaged_buffers=True) -> None:
        if t.is_complex():
            raise TypeError(f"EMA: tensor {name!r} is complex ({t.dtype}); complex tensors are "
                            "not supported, leave them out with exclude=[...]")
        if id(t) in seen:  # tied weights, shared modules: one shadow, several names
            self.aliases[name] = seen[id(t)]
            self.alias_slots.append(Slot(name, path, key, is_buffer, seen[id(t)]))
            return
        check_holdable(name, t)
        seen[id(t)] = len(self.entries)
        self.aliases[name] = len(self.entries)
        # float8 and other floats the kernels and foreach do no math in are copied, like
        # integer tensors: never averaged (README "What is averaged")
        averaged = t.dtype in FLOAT_DTYPES and averaged_buffers
        self.entries.append(Entry(name, path, key, is_buffer, averaged, t.shape))

    def _from_module(self, model: nn.Module, buffers: str, exclude: Sequence[str],
                     trainable_only: bool) -> None:
        param_ids = {id(p) for _, p in model.named_parameters(remove_duplicate=False)}
        seen: dict[int, int] = {}
        with tensor_names_only():  # an EMA registered in the model would be asked its state
            state = model.state_dict(keep_vars=True)
        self._all_names = {n for n, t in state.items() if isinstance(t, torch.Tensor)}
        for name, t in state.items():
            if not isinstance(t, torch.Tensor) or _matches(name, exclude):
                continue
            path, _, key = name.rpartition(".")
            owner = model.get_submodule(path)
            is_buffer = id(t) not in param_ids
            table = owner._buffers if is_buffer else owner._parameters
            if table.get(key) is not t:
                raise TypeError(f"EMA: state_dict entry {name!r} is not a parameter or buffer "
                                "of its module (a state_dict hook changed it); exclude it")
            if is_buffer and buffers == "ignore":
                continue
            if trainable_only and not is_buffer and not t.requires_grad:
                self.frozen.append(Slot(name, path, key, False, -1))
                continue
            self._add(name, path, key, is_buffer, t, seen,
                      averaged_buffers=not (is_buffer and buffers == "copy"))
        # module tree, parents first: (path, parent path, child name) and its shape
        self._tree = [(path, *path.rpartition(".")[::2])
                      for path, _ in model.named_modules(remove_duplicate=False) if path]
        self._shape = self._tree_shape(self._modules_of(model))

    def _modules_of(self, model: nn.Module) -> Optional[dict[str, nn.Module]]:
        """Every module path resolved afresh through ``_modules`` (None if one is gone)."""
        mods = {"": model}
        for path, parent, child in self._tree:
            owner = mods.get(parent)
            m = owner._modules.get(child) if owner is not None else None
            if m is None:
                return None
            mods[path] = m
        return mods

    @staticmethod
    def _tree_shape(mods: dict[str, nn.Module]) -> list[tuple[int, int, int]]:
        return [(len(m._parameters), len(m._buffers), len(m._modules)) for m in mods.values()]

    def read(self, target: Optional[Source] = None, check_shapes: bool = True
             ) -> list[torch.Tensor]:
        """The current tensor of every entry, from the tracked model or from ``target``.

        Parameters come back as they are (not detached): use them under ``torch.no_grad()``.
        ``check_shapes=False``: the caller compares shapes itself and calls
        :meth:`check_shapes` when they differ (``EMA`` folds it into its plan check).
        """
        if target is None:
            target = self.module if self.module is not None else self.tensors
        target = unwrap(target)
        if isinstance(target, nn.Module):
            if self.module is None:
                raise TypeError("EMA: this EMA was made from a list of tensors; pass a list")
            out = self._read_module(target)
            return self.check_shapes(out) if check_shapes else out
        if self.module is not None:
            raise TypeError(f"EMA: this EMA was made from a module; got a {type(target).__name__}")
        tensors = list(target)
        if len(tensors) != len(self.tensors):
            raise ModelChangedError(f"EMA: expected {len(self.tensors)} tensors, got {len(tensors)}")
        out = [tensors[int(e.key)] for e in self.entries]
        slots = {s.key: tensors[int(s.key)] for s in self.alias_slots + self.frozen}
        self._check_slots(out, {"": _ListOwner(slots)}, tracked=target is self.tensors)
        return self.check_shapes(out) if check_shapes else out

    def _read_module(self, model: nn.Module) -> list[torch.Tensor]:
        if model is self.module:
            mods = self._modules_of(model)
            if mods is None or self._tree_shape(mods) != self._shape:
                self._explain_structure_change(model)
                mods = self._modules_of(model)
            missing = "the model has no tensor {!r} any more"
        else:  # another model (an eval copy, the module inside a wrapper): match by path
            paths = {s.module_path for s in self.entries + self.alias_slots + self.frozen}
            mods = {p: resolve(model, p) for p in paths}
            missing = "the model given has no tensor {!r} (the EMA was made for another model)"
        out = []
        for e in self.entries:
            owner = mods.get(e.module_path) if mods is not None else None
            t = None
            if owner is not None:
                t = (owner._buffers if e.is_buffer else owner._parameters).get(e.key)
            if t is None:
                raise ModelChangedError("EMA: " + missing.format(e.name))
            out.append(t)
        self._check_slots(out, mods, tracked=model is self.module)
        return out

    def _check_slots(self, out: list[torch.Tensor], mods: dict, tracked: bool) -> None:
        """Ties must be as they were, in any model read; frozen parameters must stay
        frozen only in the tracked one (``trainable_only`` chose what is averaged: a read
        into another model writes those tensors, whatever its requires_grad flags)."""
        if self.alias_slots or len(out) > 1:
            check_ties([e.name for e in self.entries], out, self.alias_slots, mods)
        if self.frozen and tracked:
            check_frozen(self.frozen, mods)

    def frozen_tensors(self) -> list[torch.Tensor]:
        """The frozen parameters left out by ``trainable_only=True``, as they are now."""
        if self.module is None:
            return [self.tensors[int(s.key)] for s in self.frozen]
        mods = self._modules_of(self.module) or {}
        out = []
        for s in self.frozen:
            owner = mods.get(s.module_path)
            t = owner._parameters.get(s.key) if owner is not None else None
            if t is not None:
                out.append(t)
        return out

    def watch_lists(self) -> Optional[tuple[list, list, list, list, list, list]]:
        """Where :meth:`read` finds every tensor, as plain lists for a C++ snapshot
        (``host_path``): module-tree edges ``(parent dicts, keys, children)``, the dicts
        whose sizes must not change (every module's ``_modules``, ``_parameters`` and
        ``_buffers``: an added or removed tensor or module), and each entry's
        ``(dict, key)`` slot.  Empty edges and slots for a tensor list, whose tensors
        this object holds itself.  None if the tree cannot be resolved."""
        if self.module is None:
            return [], [], [], [], [], []
        mods = self._modules_of(self.module)
        if mods is None:
            return None
        link_dicts, link_keys, link_children = [], [], []
        for path, parent, child in self._tree:
            link_dicts.append(mods[parent]._modules)
            link_keys.append(child)
            link_children.append(mods[path])
        sized = [d for m in mods.values() for d in (m._modules, m._parameters, m._buffers)]
        slot_dicts, slot_keys = [], []
        for e in self.entries:
            owner = mods[e.module_path]
            slot_dicts.append(owner._buffers if e.is_buffer else owner._parameters)
            slot_keys.append(e.key)
        # aliases and frozen parameters: their slots must keep holding the same objects
        # (an untied weight, a replaced frozen parameter); a link checks just that
        for s in self.alias_slots + self.frozen:
            table = mods[s.module_path]._buffers if s.is_buffer else mods[s.module_path]._parameters
            if table.get(s.key) is not None:
                link_dicts.append(table)
                link_keys.append(s.key)
                link_children.append(table[s.key])
        return link_dicts, link_keys, link_children, sized, slot_dicts, slot_keys

    def check_shapes(self, tensors: list[torch.Tensor]) -> list[torch.Tensor]:
        """``tensors`` if every shape is the one the EMA was made with; else raise naming it."""
        for e, t in zip(self.entries, tensors):
            if t.shape != e.shape:
                raise ModelChangedError(f"EMA: tensor {e.name!r} changed shape from "
                                        f"{tuple(e.shape)} to {tuple(t.shape)}")
        return tensors

    def _explain_structure_change(self, model: nn.Module) -> None:
        """Raise naming what was added or removed; else accept the new tree (modules swapped)."""
        with tensor_names_only():  # the names only: never ask an EMA registered in it
            now = {n for n, t in model.state_dict(keep_vars=True).items()
                   if isinstance(t, torch.Tensor)}
        added, removed = sorted(now - self._all_names), sorted(self._all_names - now)
        if added or removed:
            raise ModelChangedError("EMA: the model changed after the EMA was made: "
                                    f"tensors added {added}, removed {removed}")
        if model is self.module:
            self._tree = [(path, *path.rpartition(".")[::2])
                          for path, _ in model.named_modules(remove_duplicate=False) if path]
            self._shape = self._tree_shape(self._modules_of(model))
