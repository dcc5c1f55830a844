"""The offload worker as a thread (issue 23): it releases the GIL, uses the threads it is
given, serves many threads, orders itself before optimizer steps when attached, dies
loudly and never hangs the interpreter's exit."""
from __future__ import annotations

import gc
import os
import subprocess
import sys
import textwrap
import threading
import time

import pytest
import torch
import torch.optim.optimizer as _optim

from ema_fused import EMA
from ema_fused.backends import extension as _extension
from ema_fused.ema import offload_layout, offload_worker
from ema_fused.ema.offload import default_threads
from ema_fused.ema.offload_worker import WorkerDiedError

from helpers.ema_reference import make_model
from helpers.numerics import seeded
from helpers.paths import ROOT


def _big(n=1 << 23):
    torch.manual_seed(0)
    return [torch.randn(n)]


def test_background_update_releases_the_gil():
    """While one large piece is averaged, the calling thread keeps running Python at a
    good fraction of its idle speed (with the GIL held it would stop for the whole call)."""
    params = _big()
    ema = EMA(params, decay=0.9, device="cpu", non_blocking=True, offload_threads=1)
    ema.update()
    ema.wait()

    def spin(until):
        n = 0
        while not until():
            n += 1
        return n

    window = threading.Event()  # the same predicate as below: an Event's is_set
    threading.Timer(0.05, window.set).start()
    t0 = time.perf_counter()
    idle = spin(window.is_set) / (time.perf_counter() - t0)
    rates = []
    for _ in range(3):
        params[0].add_(1.0)
        ema.update()
        job = ema._offload._job
        t0 = time.perf_counter()
        count = spin(job.done.is_set)
        rates.append(count / max(time.perf_counter() - t0, 1e-6))
        ema.wait()
        assert ema._offload.last_seconds > 0.002  # long enough to tell the two apart
    assert max(rates) > 0.05 * idle, (rates, idle)


def test_thread_count_default_and_setting(monkeypatch):
    if not (_extension.load(build=False) and hasattr(_extension.module(), "cpu_threads")):
        pytest.skip("the extension with the offload helpers is not built here")
    seen = []
    real = offload_layout.Piece.average

    def record(self, *args, **kwargs):
        seen.append(_extension.module().cpu_threads())
        return real(self, *args, **kwargs)

    monkeypatch.setattr(offload_layout.Piece, "average", record)
    for threads, expect in ((None, default_threads()), (3, 3)):
        seen.clear()
        ema = EMA(make_model(), device="cpu", non_blocking=True, offload_threads=threads)
        ema.update()
        ema.wait()
        assert seen and set(seen) == {expect}
    assert default_threads() == max(1, torch.get_num_threads() - 1)
    assert _extension.module().cpu_threads() == 0  # the worker's setting is its own


def test_many_threads_never_see_a_half_written_average():
    """Readers in other threads always get the average of a whole number of steps."""
    params = [torch.zeros(300_000)]
    ema = EMA(params, decay=0.5, device="cpu", non_blocking=True)
    # param value k at step k: after k steps every element equals the same number
    wanted = [0.0]
    for k in range(1, 9):
        wanted.append(0.5 * wanted[-1] + 0.5 * k)
    stop, bad = threading.Event(), []

    def reader():
        while not stop.is_set():
            s = ema.averaged_weights()["0"]
            if not (s == s[0]).all() or float(s[0]) not in wanted:
                bad.append(float(s[0]))

    readers = [threading.Thread(target=reader) for _ in range(3)]
    for r in readers:
        r.start()
    for k in range(1, 9):
        params[0].fill_(k)
        ema.update()
    stop.set()
    for r in readers:
        r.join(30)
    assert not bad, bad[:5]
    assert float(ema.averaged_weights()["0"][0]) == wanted[-1]


def test_attach_orders_before_optimizer_steps_and_matches_blocking():
    before = len(_optim._global_optimizer_pre_hooks)
    results = []
    for non_blocking in (False, True):
        model = make_model(torch.float32)
        opt = torch.optim.SGD(model.parameters(), lr=0.1)
        ema = EMA(model, decay=0.9, device="cpu", non_blocking=non_blocking)
        handle = ema.attach(opt)
        assert ema._offload.deferred == 1
        assert len(_optim._global_optimizer_pre_hooks) == before + 1
        gen = seeded("attach")
        for _ in range(6):
            x = torch.randn(9, 7, generator=gen)
            model(x).square().mean().backward()
            opt.step()
            opt.zero_grad()
        handle.remove()
        assert ema._offload.deferred == 0
        assert len(_optim._global_optimizer_pre_hooks) == before
        results.append({k: v.clone() for k, v in ema.named_shadows()})
        assert ema.num_updates == 6
    for k in results[0]:
        assert torch.equal(results[0][k], results[1][k]), k


def test_a_dead_worker_is_reported_not_waited_on(monkeypatch):
    monkeypatch.setattr(offload_worker, "_loop", lambda jobs, threads: None)  # ends at once
    ema = EMA(make_model(), decay=0.5, device="cpu", non_blocking=True)
    ema.update()
    with pytest.raises(WorkerDiedError, match="step 1"):
        ema.wait()
    monkeypatch.undo()
    ema.update(2)  # a new worker takes over
    ema.wait()
    assert ema.num_updates == 2


def test_a_collected_ema_stops_its_thread():
    ema = EMA(make_model(), decay=0.5, device="cpu", non_blocking=True)
    ema.update()
    ema.wait()
    thread = ema._offload._worker._thread
    assert thread.is_alive()
    del ema
    gc.collect()
    thread.join(10)
    assert not thread.is_alive()


def _run_python(code: str, timeout: float = 60) -> subprocess.CompletedProcess:
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([ROOT, os.path.join(ROOT, "tests")]))
    return subprocess.run([sys.executable, "-c", textwrap.dedent(code)], capture_output=True,
                          text=True, timeout=timeout, env=env, cwd=ROOT)


@pytest.mark.parametrize("ending", ["exit", "exception"])
def test_exit_with_pending_work_does_not_hang(ending):
    """The interpreter exits promptly with an update still running, whatever ends it."""
    code = f"""
        import torch
        from ema_fused import EMA
        params = [torch.randn(1 << 22) for _ in range(4)]
        ema = EMA(params, decay=0.9, device="cpu", non_blocking=True)
        ema.update()
        for p in params:
            p.add_(1.0)
        ema.update()
        print("pending", ema._offload._job is not None, flush=True)
        {'pass' if ending == 'exit' else 'raise SystemError("boom")'}
    """
    proc = _run_python(code)
    assert "pending True" in proc.stdout, proc.stderr
    assert proc.returncode == {"exit": 0, "exception": 1}[ending], proc.stderr
    assert "Fatal" not in proc.stderr and "Segmentation" not in proc.stderr, proc.stderr
