"""What every source of :func:`ema_fused.average_checkpoints` shares: how messages name it,
the checks of the arguments, picking the state dict inside a checkpoint (``key=``), and
its tensors' names, shapes and kinds (:class:`Entry`).

The readers of each kind of source (:mod:`.readers`: state dicts and ``torch.save``
files; :mod:`.dcp_sources`; :mod:`.safetensors_files`) build their layouts here.
"""
from __future__ import annotations

import os
from typing import Any, Callable, Mapping, NamedTuple, Optional, Union

import torch

from ..ema import checkpoint as _checkpoint

Source = Union[str, "os.PathLike[str]", Mapping[str, Any]]
Key = Union[None, str, Callable[[Any], Mapping[str, Any]]]
OP = "average_checkpoints"


class Entry(NamedTuple):
    """One tensor of a source: its key there, shape, dtype and kind."""
    key: str
    shape: tuple[int, ...]
    dtype: torch.dtype
    kind: str  # "float" (averaged) or "integer" (integers and bools: taken from the last source)


def describe(index: int, source: Source) -> str:
    """How messages name source ``index``."""
    if isinstance(source, Mapping):
        return f"source {index} (a {type(source).__name__})"
    return f"source {index} ({os.fspath(source)!r})"


def check_sources(sources) -> list:
    """The sources as a list; a single path or state dict (not in a list) is refused."""
    if isinstance(sources, (str, bytes, os.PathLike, Mapping)):
        raise TypeError(f"{OP}: sources must be a list of paths (files or DCP directories) or "
                        f"state dicts, got a single {type(sources).__name__}; pass [it]")
    try:
        sources = list(sources)
    except TypeError:
        raise TypeError(f"{OP}: sources must be a list of paths or state dicts, got "
                        f"{type(sources).__name__}") from None
    if not sources:
        raise ValueError(f"{OP}: no sources given")
    for i, s in enumerate(sources):
        if not isinstance(s, (str, os.PathLike, Mapping)):
            raise TypeError(f"{OP}: sources[{i}] is a {type(s).__name__}; expected a path or "
                            "a state dict (a mapping of names to tensors)")
    return sources


def check_key(key: Key) -> None:
    """Refuse a ``key=`` that is neither None, a string nor a callable."""
    if key is not None and not isinstance(key, str) and not callable(key):
        raise TypeError(f"{OP}: key must be None, a string (a dotted path such as "
                        f"'model' or 'state.ema') or a callable, got {type(key).__name__}")


def load_file(index: int, path, map_location) -> tuple[Any, bool]:
    """``torch.load(path, mmap=True, weights_only=True)`` and whether it is mapped (a
    file in the legacy, pre-zip format cannot be: it is read whole)."""
    where = describe(index, path)
    try:
        return torch.load(path, mmap=True, weights_only=True, map_location=map_location), True
    except RuntimeError as exc:
        if "mmap can only be used" not in str(exc):
            raise RuntimeError(f"{OP}: {where} cannot be loaded: {exc}") from exc
    except Exception as exc:  # unpickling refused (weights_only), missing file, ...
        raise type(exc)(f"{OP}: {where} cannot be loaded with torch.load(weights_only=True) "
                        f"({type(exc).__name__}: {str(exc)[:400]}); if you trust the file, "
                        "load it yourself and pass the state dict") from exc
    # a file in the legacy (pre-zip) format cannot be mapped: read it whole
    try:
        return torch.load(path, weights_only=True, map_location=map_location), False
    except Exception as exc:
        # torch writes float8 storages into that format but cannot read them back
        # (its legacy reader asks the untyped storage for a dtype): say so, and how to fix
        hint = ("torch cannot read float8 tensors back from that format" if
                isinstance(exc, AttributeError) else "it may hold what weights_only refuses")
        raise RuntimeError(f"{OP}: {where} is in torch's legacy (non-zip) format and cannot be "
                           f"loaded ({type(exc).__name__}: {str(exc)[:400]}); {hint}: re-save "
                           "it with torch.save's default format (or load it yourself and pass "
                           "the state dict)") from exc


def select(obj: Any, key: Key, where: str) -> Mapping[str, Any]:
    """The mapping of tensors ``key`` names in ``obj`` (a whole key first, then dotted)."""
    if callable(key):
        sub = key(obj)
    elif key is None:
        sub = obj
    elif isinstance(obj, Mapping) and key in obj:
        sub = obj[key]
    else:
        sub = obj
        for part in key.split("."):
            if not isinstance(sub, Mapping) or part not in sub:
                keys = ", ".join(repr(k) for k in list(sub)[:12]) if isinstance(sub, Mapping) \
                    else f"a {type(sub).__name__}"
                raise KeyError(f"{OP}: {where} has no {key!r} (no {part!r} in: {keys})")
            sub = sub[part]
    if not isinstance(sub, Mapping):
        raise TypeError(f"{OP}: {where}: key {key!r} gives a {type(sub).__name__}, not a "
                        "mapping of names to tensors")
    return sub


def add_entry(out: dict[str, Entry], where: str, key: str, shape, dtype: torch.dtype,
              inner: Optional[str] = None) -> None:
    """Record tensor ``key`` of a source under the plain name (wrapper prefixes removed)
    of ``inner`` (its name inside the chosen state dict; default ``key``); raises
    naming it for a complex tensor, or two keys with one plain name."""
    if dtype.is_complex:
        raise TypeError(f"{OP}: {where}: tensor {key!r} is complex ({dtype}); only real "
                        "tensors are averaged")
    name = _checkpoint.plain_name(key if inner is None else inner)
    if name in out:
        raise ValueError(f"{OP}: {where}: keys {out[name].key!r} and {key!r} name the same "
                         "tensor once wrapper prefixes (module., _orig_mod.) are removed")
    kind = "float" if dtype.is_floating_point else "integer"
    out[name] = Entry(key, tuple(shape), dtype, kind)


def not_a_tensor(where: str, key: str, what: str, hint: bool = True) -> TypeError:
    """The error for a non-tensor entry inside the chosen state dict."""
    tail = " (pick the state dict inside the checkpoint with key=)" if hint else ""
    return TypeError(f"{OP}: {where}: entry {key!r} is {what}, not a tensor{tail}")


def layout(index: int, source: Source, sd: Mapping[str, Any]) -> dict[str, Entry]:
    """Plain name (wrapper prefixes removed) -> :class:`Entry`; raises naming the entry
    for a value that is not a real tensor, or two keys with one plain name."""
    where = describe(index, source)
    out: dict[str, Entry] = {}
    for k, t in sd.items():
        if not isinstance(t, torch.Tensor):
            raise not_a_tensor(where, k, f"a {type(t).__name__}",
                               isinstance(t, (Mapping, int, float, str)))
        add_entry(out, where, k, t.shape, t.dtype)
    return out


def select_flat(keys, key: Key, where: str) -> dict[str, str]:
    """For a flat source (DCP checkpoint, safetensors file) whose tensors are named by
    dotted paths: inner name -> full key of the entries under ``key`` (all for None)."""
    if key is None:
        return {k: k for k in keys}
    if callable(key):
        raise TypeError(f"{OP}: {where}: key= as a callable needs the checkpoint as a Python "
                        "object; inside a DCP checkpoint or a safetensors file, name the "
                        "state dict with a dotted string such as 'model' or 'ema.shadows'")
    prefix = key + "."
    out = {k[len(prefix):]: k for k in keys if k.startswith(prefix)}
    if not out:
        if key in keys:
            raise TypeError(f"{OP}: {where}: key {key!r} gives a single entry, not a "
                            "state dict")
        tops = sorted({k.split(".", 1)[0] for k in keys})
        raise KeyError(f"{OP}: {where} has no {key!r} (top-level names: "
                       f"{listed(tops, 12)})")
    return out


def listed(names, limit: Optional[int] = None) -> str:
    """``'a', 'b' and 3 more``."""
    names = list(names)
    shown = names if limit is None else names[:limit]
    more = f" and {len(names) - len(shown)} more" if len(names) > len(shown) else ""
    return ", ".join(repr(n) for n in shown) + more
