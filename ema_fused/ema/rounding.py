"""``EMA(rounding="stochastic", seed=...)``: the checks at construction, the seed, and the
counter words of each update (the op layer's :class:`~ema_fused.checks.rounding.Stochastic`).

The random bits of an update are a function of (seed, step, tensor, element): the offset
is the EMA's step, which no two averaging updates share (a repeated step does nothing,
``update_every`` skips steps without averaging, and a resume restores the step), and
the position is the tensor's index among the EMA's tracked tensors (the same on every
device and backend, and after a resume).
"""
from __future__ import annotations

from typing import Optional, Sequence

import torch

from ..checks import rounding as _rounding


def draw_seed() -> int:
    """A seed from torch's default CPU generator, which is left as it was (so an EMA does
    not shift the training's random numbers, ``torch.manual_seed(n)`` makes the seed
    reproducible, and processes seeded alike draw the same one)."""
    state = torch.random.get_rng_state()
    try:
        return int(torch.randint(0, 1 << 62, (), dtype=torch.int64).item())
    finally:
        torch.random.set_rng_state(state)


def check_arguments(rounding: object, seed: object, dtype: Optional[torch.dtype],
                    capturable: bool) -> tuple[str, Optional[int]]:
    """``(rounding, seed)`` checked; ``seed=None`` with stochastic rounding draws one."""
    rounding = _rounding.check_rounding("EMA", rounding)
    if rounding == "nearest":
        if seed is not None:
            raise ValueError("EMA: seed= is for rounding='stochastic'")
        return rounding, None
    if dtype is not None and dtype not in _rounding.ROUNDED_DTYPES:
        raise ValueError(f"EMA: rounding='stochastic' rounds into bfloat16 or float16 shadows; "
                         f"dtype={dtype} shadows need no rounding (use dtype=torch.bfloat16, "
                         "or rounding='nearest')")
    if capturable:
        raise ValueError("EMA: rounding='stochastic' is not supported with capturable=True "
                         "(its random bits are keyed by the step, which capturable mode keeps "
                         "on the device)")
    return rounding, draw_seed() if seed is None else _rounding.check_u64("EMA: seed", seed)


def check_shadows(shadows: Sequence[torch.Tensor], averaged: Sequence[bool]) -> None:
    """With ``dtype=None`` the shadows take the model's dtypes: at least one averaged
    shadow must then be 16-bit, or there is nothing to round."""
    if not any(a and s.dtype in _rounding.ROUNDED_DTYPES for s, a in zip(shadows, averaged)):
        raise ValueError("EMA: rounding='stochastic' rounds into bfloat16 or float16 shadows, "
                         "and this model's averaged tensors have none (pass "
                         "dtype=torch.bfloat16, or rounding='nearest')")


def spec(seed: int, step: int, positions: Sequence[int]) -> _rounding.Stochastic:
    """The counter words of the update at ``step`` of the tensors at ``positions``."""
    return _rounding.Stochastic(seed, step, tuple(positions), (0,) * len(positions))


def checkpoint_fields(rounding: str, seed: Optional[int]) -> dict:
    """What ``EMA.state_dict`` stores about the rounding."""
    return {"rounding": rounding, "seed": seed}


def loaded_seed(state_dict, rounding: str, seed: Optional[int]) -> Optional[int]:
    """The seed an EMA with (``rounding``, ``seed``) keeps after loading ``state_dict``:
    a stochastic checkpoint's seed when the EMA rounds stochastically too (the resume
    then continues bit for bit), else its own.  Checkpoints written before stochastic
    rounding existed have neither key and read as ``rounding="nearest"``.  The rounding
    itself stays the EMA's choice, so a run may switch to stochastic rounding at a resume."""
    theirs = _rounding.check_rounding("EMA.load_state_dict",
                                      state_dict.get("rounding", "nearest"))
    their_seed = state_dict.get("seed")
    if theirs == "stochastic":
        their_seed = _rounding.check_u64("EMA.load_state_dict: seed", their_seed)
    elif their_seed is not None:
        raise ValueError("EMA.load_state_dict: the checkpoint has a seed but "
                         "rounding='nearest'")
    return their_seed if theirs == rounding == "stochastic" else seed
