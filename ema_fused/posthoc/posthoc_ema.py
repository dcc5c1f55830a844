"""``PostHocEMA``: EDM2's post-hoc EMA (Karras et al. 2024, "Analyzing and Improving the
Training Dynamics of Diffusion Models", Sec. 3 and Appendix C).

K power-function EMA profiles of one model, updated in one pass, snapshotted during
training, and after training any other profile width ``sigma_rel`` synthesized from the
snapshots by least squares.  The profiles are :class:`ema_fused.EMA` objects
(:mod:`.profiles`); snapshots live in :mod:`.snapshots`, synthesis in
:mod:`.synthesis` (its least-squares math in :mod:`.solve`), checkpoints in :mod:`.state`.
"""
from __future__ import annotations

import contextlib
import os
import threading
from pathlib import Path
from typing import Iterator, NamedTuple, Optional, Sequence, Union

import torch
from torch import nn

from ..checks import FLOAT_DTYPES, as_int
from ..ema import EMA, serialized
from . import profiles as _profiles
from . import sharded_snapshots as _sharded
from . import snapshots as _snaps
from . import state as _state
from . import synthesis as _synthesis

#: EMA keyword arguments a PostHocEMA passes on to every profile.
PASSED_ON = ("update_after_step", "update_every", "buffers", "dtype", "device", "backend",
             "exclude", "trainable_only", "rounding", "seed")
_REFUSED = {
    "decay": "each profile's decay comes from its sigma_rel (schedules.karras_power)",
    "schedule": "each profile's schedule is karras_power(sigma_rel=s); pass sigma_rels",
    "bias_correction": "a power-function profile copies the model at its first update, "
                       "so there is no start-up bias to correct",
    "capturable": "the K profiles' decays are computed on the host; capturable=True is not "
                  "supported for PostHocEMA",
    "skip_nonfinite": "not supported by PostHocEMA yet (the multi-shadow update has no "
                      "per-element skip)",
}


class Profile(NamedTuple):
    """One tracked profile: its relative width and the power-function exponent (EDM2 eq. 3)."""
    sigma_rel: float
    gamma: float


def _check_sigma_rels(sigma_rels: object) -> Sequence[float]:
    if isinstance(sigma_rels, (str, bytes)) or not isinstance(sigma_rels, Sequence):
        raise TypeError(f"PostHocEMA: sigma_rels must be a sequence of numbers such as "
                        f"(0.05, 0.10), got {sigma_rels!r}")
    if not sigma_rels:
        raise ValueError("PostHocEMA: sigma_rels is empty; give at least one profile width")
    return sigma_rels


class PostHocEMA:
    """K power-function EMAs of ``model`` in one pass, with snapshots and synthesis (EDM2).

    Args:
        model: an ``nn.Module`` or a list of tensors, as for :class:`ema_fused.EMA`.
        sigma_rels: the tracked profiles' relative widths (EDM2 Sec. 3.1), each > 0 and
            distinct; profile k is ``EMA(model, schedule=karras_power(sigma_rel=sigma_rels[k]))``
            bit for bit (with ``update_every=1``; see :class:`.profiles.PowerProfile`).
        snapshot_every: take a snapshot after each update whose step crosses a multiple of
            this (a multiple of ``update_every``); None: only when :meth:`snapshot` is called.
        snapshot_dir: folder for snapshot files (one ``phema-<step>.pt`` per snapshot);
            None keeps snapshots in host memory: K x (averaged elements) x
            ``snapshot_dtype`` bytes each (2K bytes per element for float16), and
            :meth:`state_dict` then holds them all.
        snapshot_dtype: the dtype snapshots store averaged tensors in (a float dtype).
        **ema_kwargs: passed to every profile's EMA: ``update_after_step``,
            ``update_every``, ``buffers``, ``dtype``, ``device``, ``backend``, ``exclude``,
            ``trainable_only``, ``rounding``, ``seed``.  ``decay``, ``schedule``,
            ``bias_correction`` and ``capturable`` are refused.  With
            ``rounding="stochastic"`` (bf16/fp16 ``dtype``: K profiles at half the memory)
            profile k draws with ``seed + k`` (``seed=None``: one drawn as EMA draws it),
            so that no two profiles share random bits.
    """

    def __init__(self, model: Union[nn.Module, Sequence[torch.Tensor]],
                 sigma_rels: Sequence[float] = (0.05, 0.10), *,
                 snapshot_every: Optional[int] = None,
                 snapshot_dir: Optional[Union[str, os.PathLike]] = None,
                 snapshot_dtype: torch.dtype = torch.float16, **ema_kwargs) -> None:
        for key in ema_kwargs:
            if key in _REFUSED:
                raise TypeError(f"PostHocEMA: {key}= is not accepted: {_REFUSED[key]}")
            if key not in PASSED_ON:
                raise TypeError(f"PostHocEMA: unknown keyword argument {key!r}; EMA "
                                f"arguments accepted: {', '.join(PASSED_ON)}")
        every = as_int("PostHocEMA: update_every", ema_kwargs.get("update_every", 1), 1)
        after = as_int("PostHocEMA: update_after_step", ema_kwargs.get("update_after_step", 0), 0)
        schedules = []
        for i, s in enumerate(_check_sigma_rels(sigma_rels)):
            try:
                schedules.append(_profiles.PowerProfile(s, every, after))
            except (TypeError, ValueError) as err:
                raise type(err)(f"PostHocEMA: sigma_rels[{i}]={s!r}: {err}") from None
        gammas = [p.gamma for p in schedules]
        for i, g in enumerate(gammas):
            if g in gammas[:i]:
                raise ValueError(f"PostHocEMA: sigma_rels[{i}]={sigma_rels[i]!r} repeats "
                                 f"sigma_rels[{gammas.index(g)}]; the profiles must differ")
        if not isinstance(snapshot_dtype, torch.dtype) or snapshot_dtype not in FLOAT_DTYPES:
            raise TypeError(f"PostHocEMA: snapshot_dtype must be one of {FLOAT_DTYPES}, got "
                            f"{snapshot_dtype!r}")
        if snapshot_every is not None:
            snapshot_every = as_int("PostHocEMA: snapshot_every", snapshot_every, 1)
            if snapshot_every % every:
                raise ValueError(f"PostHocEMA: snapshot_every={snapshot_every} is not a "
                                 f"multiple of update_every={every}: snapshots would fall "
                                 "between averaging steps")
        self.snapshot_every = snapshot_every
        self.snapshot_dtype = snapshot_dtype
        self.snapshot_dir = Path(snapshot_dir) if snapshot_dir is not None else None
        if self.snapshot_dir is not None:
            self.snapshot_dir.mkdir(parents=True, exist_ok=True)
        seeds = _profiles.profile_seeds(ema_kwargs, len(schedules))
        self._leader = _profiles.ProfileLeader(model, schedule=_profiles.AllProfiles(schedules),
                                               **ema_kwargs, **seeds[0])
        followers = [EMA(model, schedule=s, **ema_kwargs, **seed)
                     for s, seed in zip(schedules[1:], seeds[1:])]
        self._leader.followers = followers
        self._emas: list[EMA] = [self._leader, *followers]
        self.profiles = tuple(Profile(p.sigma_rel, p.gamma) for p in schedules)
        self._schedule = schedules[0]
        self._snapshots: list[tuple[int, Union[Path, dict]]] = []  # (step, file or payload)
        self._lock = threading.RLock()
        self._share_lock()

    # ------------------------------------------------------------------ one lock, one guard
    def _share_lock(self) -> None:
        """One re-entrant lock for the whole object: every public method of this class and
        of each profile takes it, so a call runs across all K profiles with no other
        thread in between (an update writes every profile, a block swaps one)."""
        for ema in self._emas:
            ema._lock = self._lock

    def _guard(self, what: str, reads_shadows: bool = False,
               profiles: Optional[Sequence[EMA]] = None) -> None:
        """EMA's guard over ``profiles`` (default: all K): while a thread is inside
        :meth:`average_parameters` of any profile, what would change a shadow or the model
        is refused, and so is a read of the swapped profile's shadows (swap path)."""
        for ema in self._emas if profiles is None else profiles:
            ema._guard(what, reads_shadows, owner="PostHocEMA")

    def __getstate__(self) -> dict:
        """For ``copy.deepcopy`` and ``pickle``: the lock is left out and made again."""
        with self._lock:
            self._guard("__getstate__ (deepcopy/pickle)")
            state = dict(self.__dict__)
        del state["_lock"]
        return state

    def __setstate__(self, state: dict) -> None:
        self.__dict__.update(state)
        self._lock = threading.RLock()
        self._share_lock()

    # ------------------------------------------------------------------ read-only facts
    @property
    def sigma_rels(self) -> tuple[float, ...]:
        """The tracked profiles' widths, in order."""
        return tuple(p.sigma_rel for p in self.profiles)

    @property
    def gammas(self) -> tuple[float, ...]:
        """The tracked profiles' power-function exponents (EDM2 eq. 3), in order."""
        return tuple(p.gamma for p in self.profiles)

    @property
    def num_updates(self) -> int:
        """Step of the last :meth:`update` call."""
        return self._leader.num_updates

    @property
    def backend(self) -> Optional[str]:
        """The backend the last update ran on (None before any)."""
        return self._leader.backend

    @property
    def snapshot_steps(self) -> tuple[int, ...]:
        """Steps of the snapshots taken (or resumed), in order."""
        return tuple(step for step, _ in self._snapshots)

    def _profile(self, k: int) -> EMA:
        k = as_int("PostHocEMA: profile index k", k, 0)
        if k >= len(self._emas):
            raise IndexError(f"PostHocEMA: profile {k} does not exist; there are "
                             f"{len(self._emas)} (sigma_rels {list(self.sigma_rels)})")
        return self._emas[k]

    # ------------------------------------------------------------------ training
    @serialized
    def update(self, step: Optional[int] = None) -> None:
        """Advance every profile in one pass; step rules as :meth:`ema_fused.EMA.update`.
        Takes a snapshot afterwards when the step crossed a multiple of ``snapshot_every``."""
        self._guard("update")
        before = self.num_updates
        self._leader.update(step)
        now = self.num_updates
        every = self.snapshot_every
        if every is not None and now // every > before // every \
                and self._schedule.averages_at(now) >= 1:
            self._snapshot(None)

    @serialized
    def named_shadows(self, k: int) -> dict[str, torch.Tensor]:
        """Profile ``k``'s shadows by name (every tracked name, tied ones too); the live
        tensors, not copies.  Refused while profile ``k`` is swapped into the model."""
        ema = self._profile(k)
        self._guard("named_shadows", reads_shadows=True, profiles=[ema])
        return dict(ema.named_shadows())

    @serialized
    def copy_to(self, k: int, model: Optional[nn.Module] = None) -> None:
        """Write profile ``k``'s average into ``model`` (default: the tracked model)."""
        ema = self._profile(k)
        self._guard("copy_to")
        ema.copy_to(model)

    @contextlib.contextmanager
    def average_parameters(self, k: int, model: Optional[nn.Module] = None) -> Iterator[None]:
        """Evaluate with profile ``k``'s average inside the block (``EMA.average_parameters``).

        Inside it, from any thread, what would change a profile or the model is refused
        (``update``, ``copy_to``, ``synthesize_to``, ``load_state_dict``, a second block of
        any profile), and on the swap path (shadows of the model's dtypes and devices) so
        are the reads of profile ``k``'s shadows, which hold the model's weights then
        (``snapshot``, ``state_dict``, ``named_shadows(k)``)."""
        ema = self._profile(k)
        with contextlib.ExitStack() as block:
            with self._lock:
                self._guard("average_parameters")
                block.enter_context(ema.average_parameters(model))
            yield

    # ------------------------------------------------------------------ snapshots
    def snapshot(self, step: Optional[int] = None) -> Optional[Path]:
        """Record the K profiles as they are now (averaged tensors in ``snapshot_dtype``,
        copied tensors as they are), labelled with the step of the last update.

        ``step``, if given, must be that step (a check that the caller's count agrees).
        Written to ``snapshot_dir`` (returns the file, or for a sharded model the DCP
        folder every rank wrote its shards into: every rank must call it) or kept in
        memory (returns None); a second snapshot of the same step replaces the first."""
        with self._lock:
            self._guard("snapshot", reads_shadows=True)
            return self._snapshot(step)

    def _snapshot(self, step: Optional[int]) -> Optional[Path]:
        now = self.num_updates
        if step is not None and as_int("PostHocEMA.snapshot: step", step, 0) != now:
            raise ValueError(f"PostHocEMA.snapshot: step {step} is not the step of the last "
                             f"update ({now}); snapshots record the profiles as they are")
        t = self._schedule.averages_at(now)
        if t < 1:
            raise ValueError(f"PostHocEMA.snapshot: no profile has averaged yet (step {now}, "
                             f"update_after_step={self._schedule.update_after_step}); "
                             "call update() first")
        where = _snaps.take(self._emas, now, t, self.snapshot_dtype, self._meta(),
                            self.snapshot_dir)
        self._snapshots = [s for s in self._snapshots if s[0] != now] + [(now, where)]
        return where if isinstance(where, Path) else None

    def _meta(self) -> dict:
        return {"sigma_rels": list(self.sigma_rels), "gammas": list(self.gammas),
                "update_every": self._schedule.update_every,
                "update_after_step": self._schedule.update_after_step}

    # ------------------------------------------------------------------ synthesis
    def synthesize(self, sigma_rel: float, step: Optional[int] = None) -> dict[str, torch.Tensor]:
        """The EMA of width ``sigma_rel`` at ``step`` (default: the last snapshot's),
        synthesized from this run's snapshots with a step ``<= step`` (EDM2 Algorithm 3,
        coefficients normalised to sum 1).  Returns name -> CPU tensor (fp32 for averaged
        tensors; copied ones from the latest snapshot used), for ``model.load_state_dict``
        or :meth:`synthesize_to`.  On a sharded model, each rank reads only its own
        shards of the snapshots and gets DTensors laid out like the model's."""
        step = None if step is None else as_int("PostHocEMA.synthesize: step", step, 0)
        # the sums run on the CPU, where the training backend (e.g. "cuda") may not
        return _synthesis.synthesize([w for _, w in self._snapshots], sigma_rel, step,
                                     targets=_sharded.targets(self._emas))

    def synthesize_to(self, model: Union[nn.Module, Sequence[torch.Tensor]], sigma_rel: float,
                      step: Optional[int] = None) -> None:
        """:meth:`synthesize`, written into ``model`` (cast to its dtypes, on its devices):
        any model whose tensors sit at the tracked model's paths.  Refused, like
        :meth:`copy_to`, while a thread is inside :meth:`average_parameters`."""
        weights = self.synthesize(sigma_rel, step)  # reads snapshots only: no lock held
        with self._lock:
            self._guard("synthesize_to")
            targets = self._leader._tracked.read(model)
            with torch.no_grad():
                for e, t in zip(self._leader._tracked.entries, targets):
                    _sharded.copy_into(e.name, t, weights[e.name])

    @classmethod
    def synthesize_from(cls, snapshot_dir: Union[str, os.PathLike], sigma_rel: float,
                        step: Optional[int] = None, *,
                        out: Optional[Union[str, os.PathLike]] = None
                        ) -> Optional[dict[str, torch.Tensor]]:
        """:meth:`synthesize` after training, from the snapshots in ``snapshot_dir`` alone
        (no model, no PostHocEMA): every ``phema-*.pt`` file and complete ``phema-*/``
        folder (sharded snapshots, written by any number of ranks) there with a step
        ``<= step``, in this process; full tensors, streamed one tensor at a time.
        ``out``: a ``.safetensors`` file (or a directory, for a DCP checkpoint) written
        a tensor at a time instead of returning the dict (returns None)."""
        step = None if step is None else as_int("PostHocEMA.synthesize_from: step", step, 0)
        return _synthesis.synthesize(_snaps.list_dir(snapshot_dir), sigma_rel, step, out=out)

    # ------------------------------------------------------------------ checkpoints
    @serialized
    def state_dict(self) -> dict:
        """Every profile's EMA state, the snapshot bookkeeping (file names, or the
        in-memory snapshots themselves) and the settings; loads with
        ``torch.load(weights_only=True)``."""
        self._guard("state_dict", reads_shadows=True)
        return _state.state_of(self)

    @serialized
    def load_state_dict(self, state_dict: dict, strict: bool = True) -> None:
        """Resume from :meth:`state_dict`: everything is checked (settings, every
        profile's tensors, snapshot files present) before anything changes."""
        self._guard("load_state_dict")
        _state.load_into(self, state_dict, strict)
