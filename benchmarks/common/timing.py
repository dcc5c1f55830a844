"""How one update is measured: time, CPU time, extra peak memory, kernel launches, host syncs.

Timing.  Providers run round-robin (each round starts with the next provider, so
none always runs first or last) after warm-up rounds; a provider's figure is the
median and the 20th/80th percentiles of its timed calls.  On a GPU each call sits
between two CUDA events and the stream is synchronized after it, so the event time
is the update's device time including any gaps while the host launches kernels;
on the CPU the time is ``time.perf_counter`` around the call.  ``cpu_ms`` is
``time.process_time`` around the call: host CPU time of all threads (on a GPU, the
cost of launching; on a multi-threaded CPU run it can exceed the wall time).

Caches.  Each call gets inputs that the previous calls did not leave in the cache:
a case whose tensors are smaller than twice the last-level cache (GPU L2, CPU L3)
is built several times (up to 8 copies, each with its own provider state) and
successive calls rotate through the copies.  The built-in full-size models are
larger than any cache, so they run on one copy (the tiny CI models stay cache-sized).

CPU caveat: providers that allocate large temporaries pay page faults whenever
glibc hands the memory back to the kernel between calls, so their times depend on
what ran before them; round-robin gives every provider the same mix, and the
warm-up rounds absorb the first touches of a fresh process.
"""
from __future__ import annotations

import contextlib
import ctypes
import gc
import os
import sys
import time
from dataclasses import dataclass, field
from typing import Callable, Optional, Sequence

import torch

Update = Callable[[], None]


@dataclass
class Samples:
    """Per-call measurements of one provider, in milliseconds."""

    times_ms: list[float] = field(default_factory=list)
    cpu_ms: list[float] = field(default_factory=list)
    host_ms: list[float] = field(default_factory=list)


def percentile(xs: Sequence[float], q: float) -> float:
    """Linear-interpolated percentile, ``q`` in [0, 1]."""
    xs = sorted(xs)
    pos = (len(xs) - 1) * q
    lo = int(pos)
    hi = min(lo + 1, len(xs) - 1)
    return xs[lo] + (xs[hi] - xs[lo]) * (pos - lo)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def round_robin(fns: dict[str, Sequence[Update]], device: torch.device, repeats: int,
                warmup: int, on_round: Optional[Callable[[int], None]] = None
                ) -> dict[str, Samples]:
    """Time each provider's update ``repeats`` times, all providers interleaved.

    ``fns[name]`` holds one update per input copy; call number ``c`` (counted over
    all providers) uses copy ``c % copies``, so consecutive calls never share inputs.
    ``on_round(r)`` is called after each round (progress display).
    """
    names = list(fns)
    out = {n: Samples() for n in names}
    if not names:
        return out
    cuda = device.type == "cuda"
    call = 0
    gc.disable()  # a collection inside a timed call is noise, not the update's cost
    try:
        for r in range(warmup + repeats):
            k = r % len(names)
            for name in names[k:] + names[:k]:
                copies = fns[name]
                fn = copies[call % len(copies)]
                call += 1
                _sync(device)
                if cuda:
                    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(
                        enable_timing=True)
                    start.record()
                c0, t0 = time.process_time(), time.perf_counter()
                fn()
                t1, c1 = time.perf_counter(), time.process_time()
                if cuda:
                    end.record()
                    end.synchronize()
                if r < warmup:
                    continue
                s = out[name]
                s.host_ms.append((t1 - t0) * 1e3)
                s.cpu_ms.append((c1 - c0) * 1e3)
                s.times_ms.append(start.elapsed_time(end) if cuda else (t1 - t0) * 1e3)
            if on_round:
                on_round(r)
    finally:
        gc.enable()
    return out


# --------------------------------------------------------------------- memory
@contextlib.contextmanager
def _quiet_stderr():
    """Hide the profiler's C++ log lines (they go to file descriptor 2)."""
    try:
        saved, null = os.dup(2), os.open(os.devnull, os.O_WRONLY)
    except OSError:
        yield
        return
    os.dup2(null, 2)
    try:
        yield
    finally:
        with contextlib.suppress(OSError, AttributeError):
            ctypes.CDLL(None).fflush(None)
        os.dup2(saved, 2)
        os.close(saved)
        os.close(null)


def _peak_cpu(fn: Update) -> Optional[int]:
    """Running peak of (allocated - freed) bytes from the profiler's CPU memory events.

    Every CPU tensor allocation goes through the allocator the profiler records, so
    this is exact; it uses a private profiler API, hence None when that fails.
    """
    from torch.profiler import ProfilerActivity, profile
    try:
        with _quiet_stderr(), profile(activities=[ProfilerActivity.CPU],
                                      profile_memory=True) as prof:
            fn()
        events = sorted((e.start_ns(), e.nbytes()) for e in
                        prof.profiler.kineto_results.events() if e.name() == "[memory]")
    except Exception as exc:
        print(f"  (profiler memory measurement failed: {exc!r})", file=sys.stderr)
        return None
    peak = live = 0
    for _, nbytes in events:
        live += nbytes
        peak = max(peak, live)
    return peak


def peak_extra_bytes(fn: Update, device: torch.device) -> Optional[int]:
    """Bytes one update allocates beyond what existed before it, at its peak."""
    if device.type != "cuda":
        return _peak_cpu(fn)
    torch.cuda.synchronize(device)
    torch.cuda.reset_peak_memory_stats(device)
    before = torch.cuda.memory_allocated(device)
    fn()
    torch.cuda.synchronize(device)
    return torch.cuda.max_memory_allocated(device) - before


# --------------------------------------------------------------------- GPU only
def device_launches(fn: Update, device: torch.device) -> Optional[dict]:
    """Kernels, memcpys and memsets one update ran on the GPU (None off a GPU or on failure)."""
    if device.type != "cuda":
        return None
    from torch.autograd import DeviceType
    from torch.profiler import ProfilerActivity, profile
    try:
        torch.cuda.synchronize(device)
        with _quiet_stderr(), profile(activities=[ProfilerActivity.CPU,
                                                  ProfilerActivity.CUDA]) as prof:
            fn()
            torch.cuda.synchronize(device)
        names = [e.name() for e in prof.profiler.kineto_results.events()
                 if e.device_type() == DeviceType.CUDA]
    except Exception as exc:
        print(f"  (profiler launch count failed: {exc!r})", file=sys.stderr)
        return None
    copies = sum(n.startswith(("Memcpy", "Memset")) for n in names)
    return {"total": len(names), "kernels": len(names) - copies, "memcpy_memset": copies}


def host_sync(fn: Update, device: torch.device) -> Optional[bool]:
    """Whether one update made the host wait for the GPU (``set_sync_debug_mode('error')``).

    The error aborts that update part-way, so this runs after everything else.
    """
    if device.type != "cuda":
        return None
    torch.cuda.synchronize(device)
    previous = torch.cuda.get_sync_debug_mode()
    torch.cuda.set_sync_debug_mode("error")
    try:
        fn()
    except RuntimeError as exc:
        if "synchroniz" in str(exc):
            return True
        raise
    finally:
        torch.cuda.set_sync_debug_mode(previous)
        torch.cuda.synchronize(device)
    return False


# --------------------------------------------------------------------- the machine
def cache_bytes(device: torch.device) -> int:
    """Last-level cache: the GPU's L2, the CPU's L3 (32 MiB when it cannot be read)."""
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        return int(getattr(props, "L2_cache_size", 0) or 50 * 2**20)
    for index in (3, 2):
        try:
            with open(f"/sys/devices/system/cpu/cpu0/cache/index{index}/size") as f:
                text = f.read().strip()
        except OSError:
            continue
        scale = {"K": 2**10, "M": 2**20, "G": 2**30}.get(text[-1:].upper(), 1)
        return int(text.rstrip("KMGkmg")) * scale
    return 32 * 2**20


def free_bytes(device: torch.device) -> int:
    """Memory a case may use: free device memory, or the host's MemAvailable."""
    if device.type == "cuda":
        return torch.cuda.mem_get_info(device)[0]
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_AVPHYS_PAGES")


def release(device: torch.device) -> None:
    """Return freed memory before the next provider or case is built."""
    gc.collect()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.empty_cache()
