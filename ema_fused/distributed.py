"""Sharded tensors for ``EMA``: DTensor params read as their local shards, DTensor shadows.

An EMA is elementwise, so a rank can average its own shard of every tensor without any
communication.  The EMA layer therefore reads a DTensor parameter (FSDP2 ``fully_shard``,
``distribute_tensor``, tensor parallel, HSDP) as its local tensor (``_local_tensor``: the
real data; FSDP2's padding lies outside it), keeps each shadow as a DTensor with the
same device mesh, placements, global shape and stride around a local fp32 tensor, and
hands the op layer only the local tensors.  Only :func:`export` with
``full_state_dict=True`` communicates (one all-gather per tensor).

Nothing here imports ``torch.distributed.tensor``: a tensor can only be a DTensor once
that module was imported by someone else, so plain models pay one dict look-up.
"""
from __future__ import annotations

import sys
from typing import Callable, Optional, Sequence

import torch

from .checks import ModelChangedError


def _dtensor_class() -> Optional[type]:
    api = sys.modules.get("torch.distributed.tensor._api")
    return None if api is None else api.DTensor


def is_dtensor_possible() -> bool:
    """Whether any tensor can be a DTensor yet (``torch.distributed.tensor`` imported)."""
    return _dtensor_class() is not None


def is_dtensor(t: object) -> bool:
    """Whether ``t`` is a ``torch.distributed.tensor.DTensor`` (a sharded parameter too)."""
    cls = _dtensor_class()
    return cls is not None and isinstance(t, cls)


def local(t: torch.Tensor) -> torch.Tensor:
    """The tensor a backend works on: a DTensor's local shard, else ``t`` itself."""
    return t._local_tensor if is_dtensor(t) else t


def locals_of(tensors: Sequence[torch.Tensor]) -> list[torch.Tensor]:
    """:func:`local` of every tensor."""
    cls = _dtensor_class()
    if cls is None:
        return list(tensors)
    return [t._local_tensor if isinstance(t, cls) else t for t in tensors]


def wrap_like(like: torch.Tensor, local_tensor: torch.Tensor) -> torch.Tensor:
    """``local_tensor`` as a DTensor laid out like ``like`` (mesh, placements, global
    shape and stride), in ``local_tensor``'s dtype and on its device; ``local_tensor``
    itself when ``like`` is a plain tensor.  No communication, and the result's local
    tensor is ``local_tensor`` (shadows kept on another device than the mesh's, e.g.
    ``device="cpu"``, stay there, as FSDP2's CPU offload keeps its shards)."""
    if not is_dtensor(like):
        return local_tensor
    from torch.distributed.tensor._dtensor_spec import DTensorSpec, TensorMeta
    meta = TensorMeta(like.shape, like.stride(), local_tensor.dtype)
    spec = DTensorSpec(like.device_mesh, tuple(like.placements), tensor_meta=meta)
    return _dtensor_class()(local_tensor, spec, requires_grad=False)


def describe(t: torch.Tensor) -> str:
    """How ``t`` is laid out across ranks, for error messages."""
    if not is_dtensor(t):
        return "a plain tensor"
    return f"a DTensor with placements {tuple(t.placements)} on {t.device_mesh}"


def same_layout(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Both plain, or both DTensors on equal meshes with equal placements (so equal
    global shapes give equal local shapes on every rank)."""
    if is_dtensor(a) != is_dtensor(b):
        return False
    return not is_dtensor(a) or (a.device_mesh == b.device_mesh
                                 and tuple(a.placements) == tuple(b.placements))


def local_bounds(like: torch.Tensor) -> Optional[tuple[tuple[int, ...], tuple[int, ...]]]:
    """(global offset, shape) of ``like``'s local shard on this rank, with no
    communication; None where that shard is not a box of the full tensor (a
    ``Partial`` placement, or a layout whose local shape differs from the box's)."""
    from torch.distributed.tensor._utils import compute_local_shape_and_global_offset
    if any(p.is_partial() for p in like.placements):
        return None
    shape, offset = compute_local_shape_and_global_offset(like.shape, like.device_mesh,
                                                          like.placements)
    if tuple(shape) != tuple(like._local_tensor.shape):
        return None
    # an empty shard's offset may lie past the end: clamp it (a zero-length box)
    offset = tuple(min(o, n) for o, n in zip(offset, like.shape))
    return offset, tuple(shape)


def local_box(full: torch.Tensor, like: torch.Tensor) -> Optional[torch.Tensor]:
    """The view of the full (unsharded) tensor ``full`` that is ``like``'s local shard on
    this rank (:func:`local_bounds`), with no communication; None where there is none."""
    bounds = local_bounds(like) if full.shape == like.shape else None
    if bounds is None:
        return None
    view = full
    for dim, (start, length) in enumerate(zip(*bounds)):
        view = view.narrow(dim, start, length)
    return view


def follow_sharding(name: str, shadow: torch.Tensor, live: torch.Tensor) -> torch.Tensor:
    """The shadow to pair with the model's tensor ``live``: ``shadow`` itself if their
    layouts agree; its local box, as a DTensor like ``live``, if the model was sharded
    after the EMA was made (each rank keeps the part of its own full shadow that
    matches its own shard of the parameter, as ``fully_shard`` does with the params);
    else a :class:`ModelChangedError` naming the tensor."""
    if same_layout(shadow, live):
        return shadow
    if is_dtensor(live) and not is_dtensor(shadow):
        box = local_box(shadow, live)
        if box is not None:
            return wrap_like(live, box.contiguous().clone())
        raise ModelChangedError(
            f"EMA: tensor {name!r} became {describe(live)} after the EMA was made and its "
            "shard is not a slice of the full tensor; create the EMA after sharding "
            "(after fully_shard / distribute_tensor)")
    hint = (" (an FSDP2 module is unsharded: after a forward with reshard_after_forward="
            "False, or unshard(); call its reshard() first, or update after backward)"
            if not is_dtensor(live) else
            " (the model was resharded: save the EMA with torch.distributed.checkpoint and "
            "load it into an EMA made after resharding)")
    raise ModelChangedError(f"EMA: tensor {name!r} is now {describe(live)} but its shadow "
                            f"is {describe(shadow)}{hint}")


def check_target(name: str, shadow: torch.Tensor, target: torch.Tensor) -> None:
    """Refuse a model tensor (of a model other than the tracked one) laid out unlike its
    shadow: writing local shards into it would be wrong."""
    if not same_layout(shadow, target):
        raise ModelChangedError(f"EMA: tensor {name!r} of the given model is {describe(target)}"
                                f" but its shadow is {describe(shadow)}; use "
                                "averaged_weights(full_state_dict=True) for an unsharded model")


def reshard_fsdp(module: object) -> None:
    """Put the FSDP2 modules of ``module`` (if any) into their sharded state: FSDP2's
    ``reshard()``, which frees unsharded parameters and communicates nothing.  Used
    before shards are read or written, so that an unsharded copy kept after a forward
    (``reshard_after_forward=False``) never hides what was written."""
    fsdp = sys.modules.get("torch.distributed.fsdp")
    fsdp_module = getattr(fsdp, "FSDPModule", None)
    if fsdp_module is None or not isinstance(module, torch.nn.Module):
        return
    for m in module.modules():
        if isinstance(m, fsdp_module):
            m.reshard()


def _is_rank0() -> bool:
    dist = torch.distributed
    return not (dist.is_available() and dist.is_initialized()) or dist.get_rank() == 0


def export(shadows: Sequence[torch.Tensor], read: Callable[[int], torch.Tensor],
           full_state_dict: bool, cpu_offload: bool) -> Optional[list[torch.Tensor]]:
    """The averaged weights in the form ``EMA.averaged_weights`` returns them (names as
    in torch's ``StateDictOptions``); ``read(i)`` makes the new local tensor of shadow i.

    * ``full_state_dict=False``: DTensors laid out like their shadows (plain tensors
      where the shadow is plain); with ``cpu_offload`` their local tensors on the CPU.
    * ``full_state_dict=True``: plain full tensors, each DTensor gathered on its own
      (an all-gather per tensor, which every rank must join) so that, with
      ``cpu_offload``, the extra device memory is one full tensor at a time; with
      ``cpu_offload`` each is moved to the CPU at once and kept by global rank 0 only:
      the other ranks get None.
    """
    out = []
    keep = not (full_state_dict and cpu_offload) or _is_rank0()
    for i, shadow in enumerate(shadows):
        value = read(i)
        if full_state_dict and is_dtensor(shadow):
            # the gather runs on the mesh's device (shadows may live elsewhere)
            value = wrap_like(shadow, value.to(shadow.device_mesh.device_type)).full_tensor()
        elif not full_state_dict:
            value = wrap_like(shadow, value.cpu() if cpu_offload else value)
        if full_state_dict and cpu_offload:
            value = value.cpu() if keep else None
        out.append(value)
    return out if keep else None


def broadcast_replicas(what: str, names: Sequence[str], tensors: Sequence[torch.Tensor],
                       src: int, group: Optional[object]) -> None:
    """Overwrite each plain tensor with rank ``src``'s (``src`` a global rank, as in
    ``torch.distributed.broadcast``): one broadcast per tensor, which every rank of
    ``group`` must join.  For replicas (DDP); a DTensor, whose shards differ by design,
    raises naming it before anything is sent."""
    dist = torch.distributed
    if not (dist.is_available() and dist.is_initialized()):
        raise RuntimeError(f"{what}: no process group; call "
                           "torch.distributed.init_process_group() first")
    for name, t in zip(names, tensors):
        if is_dtensor(t):
            raise TypeError(f"{what}: shadow {name!r} is a DTensor ({describe(t)}): each rank "
                            "holds its own shard of a sharded model's average, nothing to "
                            "broadcast")
    with torch.no_grad():
        for t in tensors:
            buf = t if t.is_contiguous() else t.contiguous()  # collectives need dense tensors
            dist.broadcast(buf, src=src, group=group)
            if buf is not t:
                t.copy_(buf)
