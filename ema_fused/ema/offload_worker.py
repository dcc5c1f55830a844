"""The background thread of an offloaded EMA: one update at a time, its error kept for
the next call, and a clean interpreter exit.

The thread is a daemon that holds only its queue (never the EMA), so an EMA that is
garbage collected stops its thread (a finalizer queues the stop).  At interpreter exit
an ``atexit`` handler lets every pending update finish (a finite amount of work; at most
:data:`EXIT_WAIT_S` seconds each) and stops the threads: the process never hangs on an
EMA, and no kernel is left running while the interpreter tears torch down.  A worker
that died (its thread ended with work pending) is reported by :meth:`Worker.join`, never
waited on forever.
"""
from __future__ import annotations

import atexit
import queue
import threading
import time
import weakref
from typing import Callable, Optional

from ..backends import extension as _extension

#: how long the exit handler waits for one pending update before giving up on it
EXIT_WAIT_S = 60.0
_POLL_S = 0.05  # how often a waiting caller checks that the worker is still alive


class Job:
    """One update's background work.  ``done`` is set when it ended; ``error`` holds
    what it raised; ``seconds`` how long it ran (the benchmark reads it)."""

    def __init__(self, step: int, work: Callable[[], None]) -> None:
        self.step = step
        self._work: Optional[Callable[[], None]] = work
        self.done = threading.Event()
        self.error: Optional[BaseException] = None
        self.seconds = 0.0

    def run(self) -> None:
        start = time.perf_counter()
        try:
            self._work()
        except BaseException as exc:  # kept for the caller; the worker lives on
            self.error = exc
        finally:
            self._work = None  # the tensors it held are released now, not at the next job
            self.seconds = time.perf_counter() - start
            self.done.set()


def _loop(jobs: "queue.SimpleQueue[Optional[Job]]", threads: int) -> None:
    """The worker thread: run jobs until a ``None`` arrives.  ``threads`` caps the CPU
    kernels' threads on this thread only (csrc/cpu_offload.cpp)."""
    if _extension.load(build=False) and hasattr(_extension.module(), "set_cpu_threads"):
        _extension.module().set_cpu_threads(threads)
    while True:
        job = jobs.get()
        if job is None:
            return
        job.run()


class WorkerDiedError(RuntimeError):
    """The background thread ended while an update was pending."""


class Worker:
    """One daemon thread running :class:`Job` s in order (started at the first job)."""

    def __init__(self, threads: int) -> None:
        self.threads = threads
        self._jobs: "queue.SimpleQueue[Optional[Job]]" = queue.SimpleQueue()
        self._thread: Optional[threading.Thread] = None
        self.pending: Optional[Job] = None
        weakref.finalize(self, self._jobs.put, None)  # a dropped EMA stops its thread
        _LIVE.add(self)

    def alive(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    def submit(self, job: Job) -> None:
        if not self.alive():
            self._thread = threading.Thread(target=_loop, args=(self._jobs, self.threads),
                                            name="ema_fused-offload", daemon=True)
            self._thread.start()
        self.pending = job
        self._jobs.put(job)

    def join(self, job: Job, timeout: Optional[float] = None) -> bool:
        """Wait for ``job``; False if ``timeout`` passed first.  Raises
        :class:`WorkerDiedError` if the thread ended with the job unfinished."""
        deadline = None if timeout is None else time.monotonic() + timeout
        while not job.done.wait(_POLL_S):
            if not self.alive() and not job.done.is_set():
                self.pending = None
                raise WorkerDiedError(
                    f"EMA: the background worker stopped before it finished the update of "
                    f"step {job.step}: that step is missing from the shadows (it may be "
                    "partly applied). Load a checkpoint (load_state_dict) to continue from a "
                    "known state")
            if deadline is not None and time.monotonic() > deadline:
                return False
        if self.pending is job:
            self.pending = None
        return True

    def close(self, timeout: float = EXIT_WAIT_S) -> None:
        """Let the pending job finish (at most ``timeout`` seconds), then stop the thread."""
        job = self.pending
        if job is not None:
            try:
                self.join(job, timeout)
            except WorkerDiedError:
                pass
        if self.alive():
            self._jobs.put(None)
            self._thread.join(1.0)


_LIVE: "weakref.WeakSet[Worker]" = weakref.WeakSet()


@atexit.register
def _close_all() -> None:
    for worker in list(_LIVE):
        worker.close()
