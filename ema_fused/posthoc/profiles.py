"""The K power-function profiles of ``PostHocEMA``, updated in one pass.

Each profile is a real :class:`ema_fused.EMA` (checks, model-change following, buffers
policy, devices, state_dict).  Profile 0 is a :class:`ProfileLeader`: its ``update()``
runs EMA's step rules once, and its one pass (``_average``) averages every profile,
through one multi-shadow update per device that reads each parameter once for all K
shadows.  The other profiles are plain EMAs whose counters the leader keeps in step.
"""
from __future__ import annotations

from typing import Optional, Sequence

import torch

from ..checks import rounding as _rounding
from ..ema import EMA, copy_across_, update_across_, draw_seed
from ..schedules import Schedule, karras_power
from . import snapshots as _snaps


def profile_seeds(ema_kwargs: dict, k_count: int) -> list[dict]:
    """Each profile's ``seed=`` keyword (popped from ``ema_kwargs``): ``seed + k`` for
    profile k with stochastic rounding (a seed drawn once for all when None), nothing
    otherwise (EMA then refuses a seed without stochastic rounding)."""
    seed = ema_kwargs.pop("seed", None)
    if ema_kwargs.get("rounding", "nearest") != "stochastic":
        return [{} if seed is None else {"seed": seed}] + [{}] * (k_count - 1)
    base = draw_seed() if seed is None else _rounding.check_u64("PostHocEMA: seed", seed)
    return [{"seed": (base + k) % _rounding.U64} for k in range(k_count)]


class PowerProfile(karras_power):
    """``karras_power(sigma_rel=s)`` evaluated at the number of averaged updates.

    EMA's ``update_every=k`` averages only at steps divisible by k, with
    ``n = step - update_after_step``; EDM2's power function (eq. 1 with the update of
    its Sec. 3.1, ``beta(j) = (1 - 1/j)**(gamma + 1)``) needs ``j``, the count of
    averages so far, for the profile to stay a power function of time.  ``j = step // k
    - update_after_step // k``, which is ``n`` itself when ``k == 1``: then every decay
    is the very float ``karras_power(sigma_rel=s)`` gives.
    """

    def __init__(self, sigma_rel: float, update_every: int = 1,
                 update_after_step: int = 0) -> None:
        super().__init__(sigma_rel=sigma_rel)
        self.sigma_rel = float(sigma_rel)
        self.update_every = update_every
        self.update_after_step = update_after_step

    def averages_at(self, step: int) -> int:
        """How many averaging updates have run by ``step`` (0 while it only copied)."""
        return _snaps.averages_at(step, self.update_every, self.update_after_step)

    def decay(self, n: int) -> float:
        return super().decay(self.averages_at(n + self.update_after_step))

    def decay_tensor(self, n: torch.Tensor) -> torch.Tensor:
        k, u = self.update_every, self.update_after_step
        j = torch.div(n + u, k, rounding_mode="floor") - u // k
        return super().decay_tensor(j)


class AllProfiles(Schedule):
    """The leader's schedule: profile 0's decay, keeping every profile's decay at that
    ``n`` in :attr:`last` for the pass that follows (EMA calls the schedule right
    before it averages, and only when it averages)."""

    def __init__(self, profiles: Sequence[PowerProfile]) -> None:
        self.profiles = tuple(profiles)
        self.last: list[float] = []

    def decay(self, n: int) -> float:
        self.last = [p(n) for p in self.profiles]
        return self.last[0]

    def __repr__(self) -> str:
        return f"AllProfiles({list(self.profiles)!r})"


class ProfileLeader(EMA):
    """Profile 0 of a ``PostHocEMA``; its update moves every profile (``followers``)."""

    followers: list[EMA]

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.followers = []
        self._pending: Optional[list[float]] = None

    def update(self, step: Optional[int] = None) -> None:
        """EMA's update (step rules, checks); the followers' counters follow it."""
        self._pending = None
        super().update(step)
        for f, decay in zip(self.followers, (self._pending or [])[1:]):
            f._decay = decay
            f._decay_product *= decay
        for f in self.followers:
            f._step = self._step

    def _average(self, weight, copy: bool, active=None, step: int = 0) -> None:
        decays = [0.0] * (1 + len(self.followers)) if copy else list(self.schedule.last)
        seeds = ([e.seed for e in [self, *self.followers]]
                 if self.rounding == "stochastic" else None)
        update_profiles(self._synced_plans(), decays, self._backend_request, step, seeds)
        self._pending = decays

    def _synced_plans(self) -> list:
        """Every profile's plan for the model as it is now.  The leader's plan is checked
        as EMA checks it; the followers' are remade with it, from the same read, so
        that pair i of every plan is the same model tensor."""
        plan, live = self._plan, None
        if plan is None or plan.snapshot is None or not plan.snapshot.still_valid():
            live = self._tracked.read(check_shapes=False)
            plan = self._plan_for(live)
        # the mark lives on the plan (a new plan has none), not as a reference here,
        # which would keep an old plan and its C++ snapshot alive
        if not getattr(plan, "followers_synced", False) or any(
                f._plan is None for f in self.followers):
            live = live if live is not None else self._tracked.read(check_shapes=False)
            for f in self.followers:
                f._plan_for(live)
            plan.followers_synced = True
        return [plan] + [f._plan for f in self.followers]


def _copy_group(impl, shadows, params, prepared) -> None:
    if prepared is not None:
        prepared.copy_(1.0)
    else:
        impl.copy_(shadows, params, 1.0)


def _update_profiles(groups: list, weights: list[float],
                     stochastic: Optional[_rounding.MultiStochastic] = None) -> None:
    """The averaging step of one device group for several profiles: ``groups[k]`` is
    profile k's ``(backend impl, shadows, params, prepared)``, ``weights[k]`` its
    ``1 - decay``.  The kernel backends run one multi-shadow update (``multi_update_``
    of the backend EMA chose for the device: the pairs are EMA's own, checked as it
    checks them, so the op layer's per-call checks are skipped as EMA skips them).
    ``foreach`` has no one-pass kernel (it would read the params K times anyway): each
    profile runs its own prepared update, the very calls its EMA would make.
    ``stochastic``: the counter words of a stochastic update (profile k: its EMA's)."""
    impl = groups[0][0]
    if impl.multi_update_ is not None and impl.name != "foreach":
        extra = {} if stochastic is None else {"stochastic": stochastic}
        impl.multi_update_([g[1] for g in groups], groups[0][2], weights, **extra)
        return
    for k, ((impl, shadows, params, prepared), w) in enumerate(zip(groups, weights)):
        extra = {} if stochastic is None else {"stochastic": stochastic.profile(k)}
        if prepared is not None:
            prepared.update_(w, **extra)
        else:
            impl.update_(shadows, params, w, **extra)


def update_profiles(plans: list, decays: list[float], backend: str, step: int = 0,
                    seeds: Optional[list[int]] = None) -> None:
    """One pass for all profiles: ``shadow_k <- lerp(shadow_k, param, 1 - decay_k)``
    (a decay of 0 copies), then the copied (non-averaged) tensors of each.

    Same-device plans: per device, one multi-shadow update for the profiles that
    average (each parameter read once for all of them; bit for bit what K separate
    updates give).  Shadows on another device than the model (``device=``): staged
    per profile, as EMA does.  ``seeds``: the profiles' seeds of a stochastic update
    (its offset is ``step``), None for nearest rounding."""
    with torch.no_grad():
        if any(p.groups is None for p in plans):
            for k, (p, d) in enumerate(zip(plans, decays)):
                if d == 0.0:
                    copy_across_(p.ema_s, p.ema_p, 1.0, backend)
                else:
                    spec = None if seeds is None else _rounding.Stochastic(
                        seeds[k], step, tuple(p.positions), (0,) * len(p.positions))
                    update_across_(p.ema_s, p.ema_p, 1.0 - d, backend, stochastic=spec)
        else:
            averaging = [k for k, d in enumerate(decays) if d != 0.0]
            weights = [1.0 - decays[k] for k in averaging]
            for g, groups in enumerate(zip(*(p.groups for p in plans))):
                for k, d in enumerate(decays):
                    if d == 0.0:
                        _copy_group(*groups[k])
                if averaging:
                    positions = tuple(plans[0].group_positions[g])
                    spec = None if seeds is None else _rounding.MultiStochastic(
                        tuple(seeds[k] for k in averaging), step, positions,
                        (0,) * len(positions))
                    _update_profiles([groups[k] for k in averaging], weights, spec)
        for p in plans:
            for s, t in zip(p.copy_s, p.copy_p):
                s.copy_(t)
