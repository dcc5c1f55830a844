"""Shadows on the host (``EMA(device="cpu")``): the pinned, pipelined update path, and
with ``non_blocking=True`` its background half.

One update: (1) capture, on the calling thread: CPU params are copied into their slots
(:meth:`Layout.capture_cpu`); for CUDA params a side stream waits for the work already
queued on the current stream (an event, no host sync) and copies the early pieces
(buffers: the next forward writes them), and the current stream waits for those small
copies.  (2) The rest, in the background with ``non_blocking=True`` (else on the calling
thread, which then waits): the params' device-to-host copies are queued on the side
stream, piece by piece with an event each, and each piece is averaged by the ``cpu``
kernel as soon as its copy has landed, so the transfer of piece i+1 overlaps the
averaging of piece i.

The params must not be written before their copies have run.  The current stream waits
for the copies' last event (a stream wait, no host sync): at the end of ``update()``, or,
once :meth:`Offload.defer_fences` was asked for (``EMA.attach`` and the training-loop
callbacks), just before the next optimizer step, so that the forward and backward in
between overlap the transfer.  The next update waits for the previous one to finish
(back-pressure: never a dropped or merged step); so does every read.
"""
from __future__ import annotations

import threading
import weakref
from typing import Callable, Optional

import torch
from torch.optim.optimizer import register_optimizer_step_pre_hook
from torch.utils.hooks import RemovableHandle

from .offload_layout import Layout, StagingPool
from .offload_worker import Job, Worker


def default_threads() -> int:
    """The background worker's CPU kernel threads when ``offload_threads`` is None: all
    of torch's intra-op threads but one, which is left to the training thread."""
    return max(1, torch.get_num_threads() - 1)


def for_ema(device: Optional[torch.device], non_blocking: bool, threads: Optional[int],
            capturable: bool) -> Optional["Offload"]:
    """The host update path of an EMA with these options, or None where its shadows are
    not on the host (``device="cpu"``) or it is capturable (its step and decay live in
    device tensors: it keeps the staged path).  Refuses the options that do not fit."""
    host = device is not None and device.type == "cpu"
    if non_blocking and not host:
        raise ValueError("EMA: non_blocking=True is for shadows kept on the host: pass "
                         f"device='cpu' (got device={device})")
    if threads is not None and not non_blocking:
        raise ValueError("EMA: offload_threads sets the threads of the background "
                         "averaging: pass non_blocking=True (and device='cpu')")
    if non_blocking and capturable:
        raise ValueError("EMA: non_blocking=True and capturable=True do not go together "
                         "(a captured CUDA graph cannot hand work to a host thread)")
    return Offload(non_blocking, threads) if host and not capturable else None


class BackgroundUpdateError(RuntimeError):
    """A background update failed; raised by the EMA's next call, naming the step."""


class Offload:
    """The host-side update of one EMA's shadows: staging, side streams, worker, waits."""

    def __init__(self, non_blocking: bool, threads: Optional[int]) -> None:
        self.non_blocking = non_blocking
        self.threads = threads
        self.pool = StagingPool()
        self.deferred = 0  # > 0: the stream waits go before optimizer steps
        self.last_seconds = 0.0  # background time of the last finished update
        self._worker: Optional[Worker] = None
        self._job: Optional[Job] = None
        self._sides: dict[torch.device, torch.cuda.Stream] = {}
        self._tails: dict[torch.device, torch.cuda.Event] = {}
        self._fence: Optional[tuple] = None
        self._fence_lock = threading.Lock()

    # ------------------------------------------------------------------ one update
    def update(self, plan, entries: list, weight: float, copy: bool, skip: bool,
               copied_value: Callable, step: int, backend: str,
               seed: Optional[int] = None) -> None:
        """``EMA._average`` for host shadows: ``plan``'s pairs (copied tensors included)
        through the plan's :class:`Layout`, made at its first update.  ``seed``: round
        16-bit shadows stochastically, the random bits keyed by (seed, step)."""
        if plan.layout is None:
            is_buffer = [e.is_buffer for e in entries if e.averaged]
            plan.layout = Layout(self.pool, plan.ema_s, plan.ema_p, is_buffer, plan.copy_s,
                                 plan.copy_p, backend, positions=plan.positions)
        self.run(plan.layout, weight, copy, skip, lambda s, p: copied_value(s, p, None), step,
                 seed)

    def run(self, layout: Layout, weight: float, copy: bool, skip: bool,
            copied_value: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
            step: int, seed: Optional[int] = None) -> None:
        """Capture this step's values, then average them: in the background with
        ``non_blocking=True`` (the previous update must be finished: :meth:`wait`)."""
        layout.capture_cpu()
        for dev in layout.cuda_devices:
            self._capture_early(layout, dev)
        enqueued = threading.Event()

        @torch.no_grad()  # grad mode is per thread: params that require grad make no graph
        def work() -> None:
            try:
                for dev in layout.cuda_devices:
                    self._queue_late(layout, dev)
            finally:
                enqueued.set()
            for piece in layout.pieces:
                piece.average(weight, copy, skip, copied_value,
                              None if seed is None else (seed, step))

        if not self.non_blocking:
            work()
            return
        if self._worker is None:
            self._worker = Worker(self.threads or default_threads())
        self._job = Job(step, work)
        if layout.cuda_devices:
            with self._fence_lock:
                self._fence = (enqueued, self._job, [(d, self._tails[d])
                                                     for d in layout.cuda_devices])
        self._worker.submit(self._job)
        if not self.deferred:
            self.fence()

    def _side(self, dev: torch.device) -> torch.cuda.Stream:
        if dev not in self._sides:
            self._sides[dev] = torch.cuda.Stream(dev)
            self._tails[dev] = torch.cuda.Event()
        return self._sides[dev]

    def _capture_early(self, layout: Layout, dev: torch.device) -> None:
        """Calling thread: the side stream starts after the work queued so far; buffers
        and copied tensors are copied first, and the current stream waits for them."""
        side, current = self._side(dev), torch.cuda.current_stream(dev)
        side.wait_stream(current)
        with torch.cuda.device(dev), torch.cuda.stream(side):
            for piece in layout.pieces:
                if piece.device == dev and piece.early:
                    for slot, src in piece.captures:
                        slot.copy_(src, non_blocking=True)
                    piece.event.record(side)
                    current.wait_event(piece.event)

    def _queue_late(self, layout: Layout, dev: torch.device) -> None:
        """The params' copies on the side stream, an event after each piece, and the
        tail event (recorded whatever happens) that the fence waits for."""
        side = self._side(dev)
        with torch.cuda.device(dev), torch.cuda.stream(side):
            try:
                for piece in layout.pieces:
                    if piece.device == dev and not piece.early:
                        for slot, src in piece.captures:
                            slot.copy_(src, non_blocking=True)
                        piece.event.record(side)
            finally:
                self._tails[dev].record(side)

    # ------------------------------------------------------------------ ordering
    def fence(self) -> None:
        """Make each current CUDA stream wait for the last update's copies of the params
        (a stream wait, no host sync).  Waits on the host only until the worker has
        queued them.  Nothing to do without a pending update of CUDA params."""
        with self._fence_lock:
            pending, self._fence = self._fence, None
        if pending is None:
            return
        enqueued, job, tails = pending
        while not enqueued.wait(0.05):
            if job.done.is_set() or not self._worker.alive():
                break  # it failed before queuing anything, or died: next call reports it
        for dev, event in tails:
            torch.cuda.current_stream(dev).wait_event(event)

    def defer_fences(self) -> "Deferral":
        """Place the stream waits just before the next step of any torch optimizer
        (a global step pre-hook) instead of at the end of every update."""
        ref = weakref.ref(self)

        def before_step(optimizer, args, kwargs) -> None:
            target = ref()
            if target is not None:
                target.fence()

        hook = register_optimizer_step_pre_hook(before_step)
        self.deferred += 1
        return Deferral(self, hook)

    # ------------------------------------------------------------------ waiting
    def wait(self) -> None:
        """Block until the pending update is in the shadows; raise what it hit."""
        job = self._job
        if job is None:
            return
        try:
            self._worker.join(job)
        finally:
            self._job = None
        self.last_seconds = job.seconds
        if job.error is not None:
            raise BackgroundUpdateError(
                f"EMA: the background update of step {job.step} failed "
                f"({type(job.error).__name__}: {job.error}); the shadows may hold part of "
                "that step. Load a checkpoint (load_state_dict) to continue from a known "
                "state") from job.error

    def poll(self) -> None:
        """:meth:`wait` if the pending update already ended (reports its error), else nothing."""
        if self._job is not None and self._job.done.is_set():
            self.wait()


class Deferral:
    """The handle of :meth:`Offload.defer_fences`: ``remove()`` puts the waits back at
    the end of each update (and places any pending one now).  ``Deferral()`` is the
    handle of an EMA with nothing to defer: its ``remove()`` does nothing."""

    def __init__(self, offload: Optional[Offload] = None,
                 hook: Optional[RemovableHandle] = None) -> None:
        self._offload = weakref.ref(offload) if offload is not None else None
        self._hook = hook

    def remove(self) -> None:
        if self._hook is None:
            return
        self._hook.remove()
        self._hook = None
        offload = self._offload()
        if offload is not None:
            offload.deferred -= 1
            if not offload.deferred:
                offload.fence()
