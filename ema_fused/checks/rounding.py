"""How an update rounds into 16-bit shadows: the ``rounding``, ``seed`` and ``offset``
arguments of the ops and of ``EMA``, checked, and the :class:`Stochastic` spec that the
op layer hands down to the backends with each pair's counter words.

The random bits of element ``e`` of pair ``i`` are a pure function of (seed, offset,
``positions[i]``, ``starts[i] + e``): Philox4x32-10 under key ``seed`` of counter
``((starts[i] + e) // 8, positions[i], offset % 2**32, offset // 2**32)``, 16 bits per
element (``csrc/stochastic.h`` documents the layout and the rounding).
"""
from __future__ import annotations

import numbers
from typing import NamedTuple, Optional, Sequence

import torch

ROUNDINGS = ("nearest", "stochastic")
#: 16-bit shadow dtypes: the ones a stochastic update rounds into
ROUNDED_DTYPES = (torch.bfloat16, torch.float16)
U64 = 1 << 64
#: element indices the counter addresses (element // 8 in 32 bits)
MAX_ELEMENTS = 8 << 32


class Stochastic(NamedTuple):
    """One stochastic update's counter words: ``positions[i]`` and ``starts[i]`` (the index
    in its tensor of the pair's first element; nonzero for pieces of a tensor) per pair."""

    seed: int
    offset: int
    positions: tuple[int, ...]
    starts: tuple[int, ...]

    def pick(self, indices: Sequence[int]) -> "Stochastic":
        """The spec of the pairs at ``indices`` (in that order)."""
        return self._replace(positions=tuple(self.positions[i] for i in indices),
                             starts=tuple(self.starts[i] for i in indices))

    def signed(self) -> tuple[int, int]:
        """(seed, offset) as the kernel ops' int64 arguments (two's complement)."""
        return to_int64(self.seed), to_int64(self.offset)


class MultiStochastic(NamedTuple):
    """A multi-shadow update's counter words: profile k draws with ``seeds[k]``; positions
    and starts are the params' (one each per param)."""

    seeds: tuple[int, ...]
    offset: int
    positions: tuple[int, ...]
    starts: tuple[int, ...]

    def pick(self, indices: Sequence[int]) -> "MultiStochastic":
        """The spec of the params at ``indices`` (in that order)."""
        return self._replace(positions=tuple(self.positions[i] for i in indices),
                             starts=tuple(self.starts[i] for i in indices))

    def profile(self, k: int) -> Stochastic:
        """Profile k's single-update spec: the multi update gives it exactly its bits."""
        return Stochastic(self.seeds[k], self.offset, self.positions, self.starts)


def to_int64(value: int) -> int:
    """A 64-bit unsigned number as the int64 with the same bits."""
    return value - U64 if value >= 1 << 63 else value


def check_rounding(what: str, rounding: object) -> str:
    """``rounding`` if it is ``"nearest"`` or ``"stochastic"``."""
    if not isinstance(rounding, str) or rounding not in ROUNDINGS:
        raise ValueError(f"{what}: rounding must be 'nearest' or 'stochastic', got {rounding!r}")
    return rounding


def check_u64(what: str, value: object) -> int:
    """``value`` as an int in [0, 2**64): ints and numpy integers, never bools."""
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise TypeError(f"{what} must be an integer in [0, 2**64), got {value!r} "
                        f"({type(value).__name__})")
    value = int(value)
    if not 0 <= value < U64:
        raise ValueError(f"{what} must be an integer in [0, 2**64), got {value}")
    return value


def multi_spec(op: str, n: int, k_count: int, rounding: object, seed: object,
               offset: object) -> Optional[MultiStochastic]:
    """The checked spec of a multi-shadow call over ``n`` params and ``k_count`` profiles:
    ``seed`` is one integer per profile, or one integer s for profile k to draw with
    s + k (mod 2**64), so that no two profiles share random bits."""
    if isinstance(seed, (str, bytes)) or not isinstance(seed, Sequence):
        single = spec(op, n, rounding, seed, offset)
        if single is None:
            return None
        seeds = tuple((single.seed + k) % U64 for k in range(k_count))
        return MultiStochastic(seeds, single.offset, single.positions, single.starts)
    check_rounding(op, rounding)
    if rounding != "stochastic":
        raise ValueError(f"{op}: seed= and offset= are for rounding='stochastic'")
    if len(seed) != k_count:
        raise ValueError(f"{op}: {len(seed)} seeds for {k_count} profiles (give one per "
                         "profile, or one integer)")
    seeds = tuple(check_u64(f"{op}: seed[{k}]", s) for k, s in enumerate(seed))
    first = spec(op, n, rounding, seeds[0] if seeds else 0, offset)
    return MultiStochastic(seeds, first.offset, first.positions, first.starts)


def spec(op: str, n: int, rounding: object, seed: object, offset: object,
         positions: Optional[Sequence[int]] = None) -> Optional[Stochastic]:
    """The checked spec of an op call over ``n`` pairs (None for nearest rounding).  With
    ``rounding="stochastic"`` both ``seed`` and ``offset`` are required: a call that
    repeated an offset would repeat its random bits, and the rounding of a step that
    repeats would no longer average out."""
    rounding = check_rounding(op, rounding)
    if rounding == "nearest":
        if seed is not None or offset is not None:
            raise ValueError(f"{op}: seed= and offset= are for rounding='stochastic'")
        return None
    if seed is None or offset is None:
        raise TypeError(f"{op}: rounding='stochastic' needs seed= (an integer) and offset= "
                        "(an integer that changes at every call, e.g. the step): the random "
                        "bits are a function of both")
    return Stochastic(check_u64(f"{op}: seed", seed), check_u64(f"{op}: offset", offset),
                      tuple(range(n)) if positions is None else tuple(positions), (0,) * n)
