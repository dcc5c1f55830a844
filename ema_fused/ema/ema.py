"""The ``EMA`` class: which tensors, which decay, when; the kernels live below ``ops``."""
from __future__ import annotations

import functools
import threading
from typing import Callable, Iterable, Optional, Sequence, Union

import torch
from torch import nn

from .. import distributed as _distributed
from ..backends import selection as _backend
from ..checks import as_flag, as_int, as_real
from ..checks import devices as _devices
from ..checks import tensors as _validate
from ..schedules import constant
from . import checkpoint as _checkpoint
from . import hooks as _hooks
from . import rounding as _rounding
from .as_module import EMAStateModule
from .bound import BoundShadows
from .capturable import DeviceSchedule
from .explicit import ExplicitUpdates
from .offload import Deferral, Offload, for_ema
from .placement import ShadowPlacement
from .plan import PlannedPass, _Plan
from .reads import AveragedReads
from .tracking import Tracked

_BUFFER_POLICIES = ("ema", "copy", "ignore")


def serialized(method):
    """Run ``method`` holding the EMA's lock: public methods called from several threads
    run one at a time (the lock is re-entrant, so they may call each other)."""
    @functools.wraps(method)
    def locked(self, *args, **kwargs):
        with self._lock:
            return method(self, *args, **kwargs)
    return locked


class EMA(PlannedPass, AveragedReads, ExplicitUpdates, ShadowPlacement, BoundShadows):
    """Exponential moving average of a model's weights, with FP32 master shadows.

    Each :meth:`update` does ``shadow <- decay * shadow + (1 - decay) * param`` for
    every floating-point tensor in one fused pass per device.  See the README for
    the step rules, the schedules and the backends.

    Args:
        model_or_params: an ``nn.Module`` (parameters and buffers, named as in its
            ``state_dict()``) or an iterable of tensors (named ``"0"``, ``"1"``, ...).
        decay: the constant decay, used when ``schedule`` is None.
        schedule: a callable ``n -> decay`` (see :mod:`ema_fused.schedules`).
        update_after_step: steps ``<=`` this copy the model instead of averaging.
        update_every: only steps divisible by this change the shadows.
        buffers: ``"ema"`` average float buffers, ``"copy"`` copy them, ``"ignore"``.
        dtype: shadow dtype for floating tensors (None: each tensor's own).  A
            tensor wider than ``dtype`` (e.g. float64) raises instead of downcasting.
        device: where the shadows live (None: beside each tensor, following it).
        backend: ``"auto"``, ``"cuda"``, ``"triton"``, ``"cpu"`` or ``"foreach"``.
        bias_correction: start shadows at zero and divide every read by
            ``1 - prod(decays so far)``.
        exclude: fnmatch patterns of tensor names to leave out entirely.
        capturable: keep the step and the decay in device tensors so that a captured
            CUDA graph of ``update()`` replays correctly with a changing decay (needs a
            schedule from :mod:`ema_fused.schedules` and all shadows on one device;
            ``update()`` then takes no ``step``; reading ``decay``/``num_updates`` syncs).
        trainable_only: leave out parameters with ``requires_grad=False`` (frozen
            weights: no shadow, never read or written); one that becomes trainable
            later raises :class:`ModelChangedError` naming it.  Buffers follow ``buffers``.
        skip_nonfinite: where an element of a model tensor is NaN or +-Inf, leave its
            shadow element as it is (averaging and copying steps alike), so one bad
            value does not poison the average forever.  Decided inside the kernels per
            element, with no extra pass and no host sync; nothing is reported (check the
            model yourself if you need to know).  Not with ``bias_correction`` (refused:
            the one global correction would over-correct the elements that skipped).
        non_blocking: with ``device="cpu"``: ``update()`` returns once this step's values
            are captured and averages them in the background (see the README's
            "Offloading the EMA to the host"); every read, and :meth:`wait`, waits for it.
        offload_threads: with ``non_blocking=True``: the CPU kernel threads of the
            background averaging (None: ``torch.get_num_threads() - 1``, at least 1,
            leaving a core to the training thread).
        rounding: ``"nearest"``, or ``"stochastic"`` for bfloat16/float16 shadows (``dtype``):
            each update's fp32 result is rounded up or down at random, up with the
            probability of the remainder's share of one ulp, so the 16-bit shadow is an
            unbiased estimate of an FP32 one at half its memory (README, "16-bit shadows
            with stochastic rounding").  Copy steps stay exact.
        seed: the stochastic rounding's seed (an integer in [0, 2**64)); None draws one
            from torch's default generator without advancing it.  Stored in
            :meth:`state_dict`: a resume continues bit for bit.

    Every public method may be called from several threads: they serialize, and a call
    refused because another thread is inside :meth:`average_parameters` changes nothing.

    An ``EMA`` is not an ``nn.Module``: kept as an attribute of a model or a
    LightningModule it is *not* in their ``state_dict()``.  Save ``ema.state_dict()``
    yourself, or register ``owner.ema_state = ema.as_module()`` to carry it there.
    """

    def __init__(self, model_or_params: Union[nn.Module, Iterable[torch.Tensor]],
                 decay: float = 0.9999, *, schedule: Optional[Callable[[int], float]] = None,
                 update_after_step: int = 0, update_every: int = 1, buffers: str = "ema",
                 dtype: Optional[torch.dtype] = torch.float32,
                 device: Optional[Union[torch.device, str]] = None, backend: str = "auto",
                 bias_correction: bool = False, exclude: Sequence[str] = (),
                 capturable: bool = False, trainable_only: bool = False,
                 skip_nonfinite: bool = False, non_blocking: bool = False,
                 offload_threads: Optional[int] = None, rounding: str = "nearest",
                 seed: Optional[int] = None) -> None:
        if schedule is None:
            schedule = constant(as_real("EMA: decay", decay))
        elif not callable(schedule):
            raise TypeError(f"EMA: schedule must be callable n -> decay, got {schedule!r}")
        if buffers not in _BUFFER_POLICIES:
            raise ValueError(f"EMA: buffers must be one of {_BUFFER_POLICIES}, got {buffers!r}")
        if dtype is not None and dtype not in _validate.FLOAT_DTYPES:
            raise TypeError(f"EMA: dtype must be one of {_validate.FLOAT_DTYPES} or None, "
                            f"got {dtype}")
        if isinstance(exclude, str):
            exclude = (exclude,)
        self.rounding, self.seed = _rounding.check_arguments(
            rounding, seed, dtype, as_flag("EMA: capturable", capturable))
        self.schedule = schedule
        self.update_after_step = as_int("EMA: update_after_step", update_after_step, 0)
        self.update_every = as_int("EMA: update_every", update_every, 1)
        self.bias_correction = as_flag("EMA: bias_correction", bias_correction)
        self.skip_nonfinite = as_flag("EMA: skip_nonfinite", skip_nonfinite)
        if self.skip_nonfinite and self.bias_correction:
            # the correction divides every element by 1 - (one global product of decays);
            # an element that skipped steps had fewer decays applied, so it would read
            # too small (constant weights 1.0 and one NaN read 0.53, 0.70, ...), and a
            # per-element product would cost a float per element
            raise ValueError("EMA: skip_nonfinite=True with bias_correction=True is not "
                             "supported: the correction divides by one product of decays for "
                             "all elements, so it would over-correct every element that "
                             "skipped a step. Use one of the two (e.g. update_after_step= or a "
                             "warmup schedule instead of bias_correction)")
        self._device = torch.device(device) if device is not None else None
        self._backend_request = backend
        _backend.resolve_name(backend)  # unknown names fail now, not at the first update
        if self._device is not None and self._device.type == "meta":
            raise ValueError("EMA: device='meta' cannot hold an average; pick a real device")
        missing = _devices.unavailable(self._device) if self._device is not None else None
        if missing is not None:
            raise RuntimeError(f"EMA: device={str(self._device)!r}: {missing}")
        self._tracked = Tracked(model_or_params, buffers, tuple(exclude),
                                as_flag("EMA: trainable_only", trainable_only))
        with torch.no_grad():
            self._shadows = [self._make_shadow(e, t, dtype) for e, t in
                             zip(self._tracked.entries, self._tracked.read())]
        if self.rounding == "stochastic":
            _rounding.check_shadows(self._shadows, [e.averaged for e in self._tracked.entries])
        for dev in {_distributed.local(s).device for s in self._shadows}:
            _backend.select(backend, dev)  # a backend named but unusable fails now
        self._step = 0
        self._decay: Optional[float] = None
        self.backend: Optional[str] = None
        self._device_schedule: Optional[DeviceSchedule] = None
        if as_flag("EMA: capturable", capturable):
            devices = {_distributed.local(sh).device for sh in self._shadows}
            if len(devices) != 1:
                raise ValueError(f"EMA: capturable=True needs every shadow on one device, got "
                                 f"{sorted(map(str, devices))}")
            self._device_schedule = DeviceSchedule(devices.pop(), schedule,
                                                   self.update_after_step, self.update_every)
        self._decay_product = 1.0
        self._plan: Optional[_Plan] = None
        self._backup: Optional[list[torch.Tensor]] = None
        self._lock = threading.RLock()
        self._inside: Optional[int] = None  # thread inside average_parameters(), if any
        self._swapped = False  # ... on the swap path: the shadows hold the model's weights
        self.non_blocking = as_flag("EMA: non_blocking", non_blocking)
        self._offload_threads = (None if offload_threads is None else
                                 as_int("EMA: offload_threads", offload_threads, 1))
        self._offload = self._new_offload()
        self._updating_step = 0  # the step update() is averaging (named by offload errors)

    def _new_offload(self) -> Optional[Offload]:
        return for_ema(self._device, self.non_blocking, self._offload_threads,
                       self._device_schedule is not None)

    @property
    def decay(self) -> Optional[float]:
        """Decay used by the last update (0.0 when it copied; None before any)."""
        if self._device_schedule is not None:
            return self._device_schedule.last_decay()
        return self._decay

    @property
    def num_updates(self) -> int:
        """Step of the last ``update()`` call."""
        if self._device_schedule is not None:
            return self._device_schedule.num_updates()
        return self._step

    def _guard(self, what: str, reads_shadows: bool = False, owner: str = "EMA",
               settle: bool = True) -> None:
        """Refuse ``what`` while a thread is inside :meth:`average_parameters` (before it
        changed anything).  Calls that only read the shadows (``reads_shadows``) are
        refused only while the shadows hold the model's weights (the swap path).
        ``owner`` names the object the user called (a PostHocEMA guards its profiles).
        With ``settle`` a pending background update is waited for first (its error is
        raised); else only one that already ended is reported."""
        if self._offload is not None and settle:
            self._offload.wait()
        elif self._offload is not None:
            self._offload.poll()
        if self._inside is None or (reads_shadows and not self._swapped):
            return
        where = ("the shadows and the model's weights are swapped" if self._swapped else
                 "the model holds the averaged weights")
        if self._inside == threading.get_ident():
            raise RuntimeError(f"{owner}.{what}: not allowed inside average_parameters(), where "
                               f"{where}")
        raise RuntimeError(f"{owner}.{what}: refused, nothing changed: another thread is inside "
                           f"average_parameters(), where {where}. To evaluate while training "
                           "goes on, evaluate a second model filled by copy_to(..., other)")

    def __getstate__(self) -> dict:
        """For ``copy.deepcopy``, ``pickle`` and ``torch.save``: the cached plan (kernel
        tables, C++ snapshots) and the lock are left out and made again when needed.
        The tracked model is copied with the EMA (a bare ``deepcopy(ema)`` tracks a
        private copy of the model; see the README's "Copies and pickling")."""
        with self._lock:
            self._guard("__getstate__ (deepcopy/pickle)")
            state = dict(self.__dict__)
        del state["_lock"]
        state["_plan"] = None
        state["_offload"] = None  # threads, streams and staging: made again
        return state

    def __setstate__(self, state: dict) -> None:
        # an EMA pickled before the offload and rounding options existed has none of them
        self.__dict__.update({"non_blocking": False, "_offload_threads": None,
                              "_updating_step": 0, "rounding": "nearest", "seed": None,
                              **state})
        self._lock = threading.RLock()
        self._offload = self._new_offload()

    def _make_shadow(self, entry, t: torch.Tensor, dtype) -> torch.Tensor:
        """A new shadow of model tensor ``t``: of its local shard, laid out like it."""
        src = _distributed.local(t)
        device = self._device or src.device
        if not entry.averaged:
            return _distributed.wrap_like(t, src.detach().to(device, copy=True))
        if dtype is not None and not _validate.lossless(t.dtype, dtype):
            raise TypeError(f"EMA: tensor {entry.name!r} is {t.dtype}; shadows of dtype {dtype} "
                            "would lose precision. Pass dtype=None or a wider dtype")
        dtype = dtype or t.dtype
        if self.bias_correction:
            return _distributed.wrap_like(t, torch.zeros(src.shape, dtype=dtype, device=device))
        return _distributed.wrap_like(t, src.detach().to(device, dtype, copy=True))

    # ------------------------------------------------------------------ update
    @serialized
    def update(self, step: Optional[int] = None) -> None:
        """Advance the average; call after each optimizer step.

        ``step`` is the caller's 1-based optimizer step (default: an internal
        counter, 1 at the first call): an int, a numpy integer or a 0-dim integer
        tensor (a CUDA one syncs).  A step equal to the last one does nothing (so
        ``update(step=global_step)`` is right under gradient accumulation); a smaller
        one raises.  Steps not divisible by ``update_every`` change no shadow; steps
        ``<= update_after_step`` copy the model; others average with
        ``decay = schedule(step - update_after_step)``.  An update that raises (a
        schedule that failed, a changed model) leaves the step where it was.
        """
        self._guard("update", settle=False)
        self._follow_bound()
        if self._device_schedule is not None:
            self._update_on_device(step)
            return
        if step is None:
            step = self._step + 1
        else:
            step = as_int("EMA.update: step", step, 1)
            if step == self._step:
                return  # this step is averaged already (gradient accumulation)
            if step < self._step:
                raise ValueError(f"EMA.update: step {step} comes before the last step "
                                 f"{self._step}; steps must not go back (to restart, "
                                 "load a checkpoint with load_state_dict)")
        if step % self.update_every:
            self._step = step
            return
        if step <= self.update_after_step:
            decay = 0.0
        else:
            decay = _validate.check_scalar(
                "EMA", f"decay from schedule {self.schedule!r} at n={step - self.update_after_step}",
                self.schedule(step - self.update_after_step))
        self._settle_before(step)
        self._average(0.0 if decay == 0.0 else 1.0 - decay, copy=decay == 0.0, step=step)
        self._step = step
        self._decay = decay
        self._decay_product *= decay

    def _settle_before(self, step: int) -> None:
        """Offloaded shadows: wait until the previous update is in them (back-pressure)
        and name ``step`` as the one being averaged (background errors name it)."""
        if self._offload is not None:
            self._offload.wait()
            self._updating_step = step

    def _update_on_device(self, step: Optional[int]) -> None:
        """The capturable update: the same rules, evaluated by device ops (no host sync)."""
        if step is not None:
            raise ValueError("EMA: with capturable=True the step is counted on the device; "
                             "call update() without a step")
        sched = self._device_schedule
        sched.advance()
        self._average(sched.weight, copy=False, active=sched.active)

    # ------------------------------------------------------------------ checkpoints
    @serialized
    def state_dict(self) -> dict:
        """Shadows and counters; loads with ``torch.load(weights_only=True)``.

        Shadows of DTensors are DTensors, so ``torch.distributed.checkpoint`` can save
        ``{"ema": ema}`` (an ``EMA`` is DCP ``Stateful``) shard by shard and reshard it
        on load, across world sizes."""
        self._guard("state_dict", reads_shadows=True)
        self._sync_sharding()
        return _checkpoint.state_of(self)

    @serialized
    def load_state_dict(self, state_dict: dict, strict: bool = True) -> None:
        """Load :meth:`state_dict` output; checks everything before changing anything.

        Missing or unexpected shadows raise under ``strict``; keys with ``module.`` or
        ``_orig_mod.`` segments match their plain names; nothing is ever downcast.  A
        DTensor shadow takes a DTensor of its own mesh and placements, or a full plain
        tensor (each rank copies its shard of it); sharded checkpoints of another
        layout need ``torch.distributed.checkpoint``, which reshards.
        """
        self._guard("load_state_dict")
        self._sync_sharding()
        _checkpoint.load_into(self, state_dict, strict)

    @serialized
    def broadcast_shadows(self, src: int = 0, group: Optional[object] = None) -> None:
        """Make every rank's shadows those of rank ``src`` (a global rank), one broadcast
        per shadow: a collective, every rank of ``group`` (default: the world) calls it.

        For replicated models (DDP) whose EMA was made before ``DDP(model)`` from weights
        that differ across ranks (an unseeded init): DDP broadcasts rank 0's weights into
        the model, not into the shadows, which hold each rank's own.  Call it once, where
        every rank has made the same updates (e.g. right after ``DDP(model)``); the step
        counters are not touched.  Sharded (DTensor) shadows are refused."""
        self._guard("broadcast_shadows")
        _distributed.broadcast_replicas("EMA.broadcast_shadows",
                                        [e.name for e in self._tracked.entries],
                                        self._shadows, as_int("EMA.broadcast_shadows: src",
                                                              src, 0), group)

    def as_module(self) -> "nn.Module":
        """An ``nn.Module`` holding this EMA, to register in a model or LightningModule
        (``self.ema_state = ema.as_module()``) so that their ``state_dict()`` /
        ``load_state_dict()`` save and restore the EMA (one key, ``<name>._extra_state``,
        holding :meth:`state_dict`).  It has no parameters or buffers, so the owner's
        ``.to()``/``.half()`` never move or cast the shadows."""
        return EMAStateModule(self)

    def wait(self) -> None:
        """Block until every pending background update (``non_blocking=True``) is in the
        shadows; re-raise, naming the step, an error it hit.  Every read waits by itself."""
        with self._lock:
            if self._offload is not None:
                self._offload.wait()

    def _defer_fences(self) -> Deferral:
        """Offloaded CUDA params: order their capture before the next optimizer step
        (a stream wait just before any optimizer's step) instead of at the end of each
        update.  For ``attach`` and the training-loop callbacks; ``remove()`` undoes it."""
        if self._offload is None:
            return Deferral()
        return self._offload.defer_fences()

    # ------------------------------------------------------------------ training loops
    def attach(self, optimizer: torch.optim.Optimizer) -> "_hooks.AttachHandle":
        """Call :meth:`update` after every real step of ``optimizer``; returns a handle
        whose ``remove()`` detaches it.

        A step that ``GradScaler`` skips (inf/NaN gradients) is not counted.  Wrapped
        optimizers (accelerate, Lightning) are hooked at the optimizer that really steps.
        An EMA attached to one optimizer is refused by another (both stepping in one
        iteration would update it twice): ``remove()`` the first handle to move it.
        """
        return _hooks.attach(self, optimizer)
