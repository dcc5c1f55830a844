"""Offloaded shadows of CUDA params (issue 23), skipped without a GPU: the pinned pool is
allocated once and nothing of the EMA stays in GPU memory, ``update()`` does not wait for
the GPU, the params' copy is ordered before the next write to them (at the end of
``update()``, or before the next optimizer step when attached), and a long run is bit
for bit the synchronous offload's."""
from __future__ import annotations

import time

import pytest
import torch
from torch import nn

from ema_fused import EMA
from ema_fused.ema import order_before_steps

from helpers.numerics import seeded

pytestmark = [pytest.mark.gpu,
              pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]


def _linear_model(width=2048, depth=6, seed=0):
    """No buffers: nothing is copied early, so only the ordering of params is tested."""
    torch.manual_seed(seed)
    return nn.Sequential(*[nn.Linear(width, width) for _ in range(depth)]).cuda().bfloat16()


def _bn_model(seed=0):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(64, 512), nn.BatchNorm1d(512), nn.ReLU(),
                         nn.Linear(512, 64)).cuda().bfloat16()


def _sleep_cycles(seconds: float) -> int:
    """``torch.cuda._sleep`` cycles for about ``seconds`` on this GPU (measured)."""
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    torch.cuda._sleep(10_000_000)
    end.record()
    end.synchronize()
    return int(10_000_000 * seconds / (start.elapsed_time(end) / 1e3))


def _shadows(ema):
    return {k: v.clone() for k, v in ema.named_shadows()}


def test_pinned_pool_once_and_no_gpu_memory():
    model = _linear_model(depth=3)
    before = torch.cuda.memory_allocated()
    ema = EMA(model, decay=0.99, device="cpu", non_blocking=True)
    for _ in range(20):
        with torch.no_grad():
            for p in model.parameters():
                p.add_(0.01)
        ema.update()
    ema.wait()
    torch.cuda.synchronize()
    pool = ema._offload.pool
    assert pool.allocations == 1
    assert pool.buffer.is_pinned()
    need = sum(-(-p.numel() * p.element_size() // 64) * 64 for p in model.parameters())
    assert pool.buffer.numel() == need  # the params in their own dtype, nothing more
    assert torch.cuda.memory_allocated() == before  # no EMA state in GPU memory
    assert all(s.device.type == "cpu" for _, s in ema.named_shadows())
    # the worker's copies made no autograd graph (grad mode is per thread)
    assert not any(t.requires_grad for pc in ema._plan.layout.pieces for t in pc.staged)


@pytest.mark.parametrize("attached", [False, True])
def test_update_does_not_wait_for_the_gpu(attached):
    """With the GPU busy for ~0.3 s, update() returns in a small fraction of that."""
    model = _linear_model()
    ema = EMA(model, decay=0.99, device="cpu", non_blocking=True)
    handle = order_before_steps(ema) if attached else None
    ema.update()
    ema.wait()
    torch.cuda.synchronize()
    torch.cuda._sleep(_sleep_cycles(0.3))
    t0 = time.perf_counter()
    ema.update()
    took = time.perf_counter() - t0
    ema.wait()
    assert took < 0.1, took
    if handle is not None:
        handle.remove()


@pytest.mark.parametrize("attached", [False, True])
def test_params_are_copied_before_the_next_write(attached):
    """The copy is ordered before the next in-place write to the params, without a host
    sync: with the side stream held back, a write right after ``update()`` (plain) or
    the next optimizer step (attached: only optimizer steps are ordered) must not leak
    into the average."""
    model = _linear_model(depth=4)
    opt = torch.optim.SGD(model.parameters(), lr=0.5)
    seen = []  # each update's values, cloned on the current stream (in order) first
    opt.register_step_post_hook(lambda *args: seen.append(
        {k: v.detach().clone() for k, v in model.named_parameters()}))
    ema = EMA(model, decay=0.5, device="cpu", non_blocking=True)
    if attached:
        ema.attach(opt)
    hold, gen = _sleep_cycles(0.05), seeded("race", attached)
    for _ in range(5):
        x = torch.randn(32, 2048, generator=gen).cuda().bfloat16()
        model(x).float().square().mean().backward()
        for side in ema._offload._sides.values():  # made at the first update
            with torch.cuda.stream(side):
                torch.cuda._sleep(hold)
        opt.step()
        opt.zero_grad()
        if not attached:
            ema.update()
            with torch.no_grad():
                for p in model.parameters():
                    p.neg_()  # written right after update() returned
                    p.neg_()
    ref_model = _linear_model(depth=4).cpu()
    ref = EMA(ref_model, decay=0.5, device="cpu")
    for state in seen:
        ref_model.load_state_dict({k: v.cpu() for k, v in state.items()})
        ref.update()
    got, want = _shadows(ema), _shadows(ref)
    for k in want:
        assert torch.equal(got[k], want[k]), k


def test_buffers_written_by_the_next_forward_are_captured_before_it():
    model = _bn_model()
    ema = EMA(model, decay=0.5, device="cpu", non_blocking=True)
    handle = order_before_steps(ema)  # the params' wait moves to the optimizer step
    ema.update()
    ema.wait()
    gen = seeded("bn")
    expected = []
    for _ in range(4):
        model.train()
        model(torch.randn(16, 64, generator=gen).cuda().bfloat16())
        expected.append(model[1].running_mean.detach().cpu().clone())
        ema.update()
        model(torch.randn(16, 64, generator=gen).cuda().bfloat16())  # writes the buffers
        ema.wait()
    handle.remove()
    ref = torch.zeros(512)  # running_mean starts at 0
    for value in expected:
        ref = 0.5 * ref + 0.5 * value.float()
    assert torch.allclose(dict(ema.named_shadows())["1.running_mean"], ref, atol=1e-6)


def test_long_run_bit_identical_to_synchronous_offload():
    """One model, two EMAs of it: attached with non_blocking=True, and the synchronous
    offload updated by hand after the same steps."""
    model = _bn_model()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    background = EMA(model, decay=0.999, device="cpu", non_blocking=True)
    blocking = EMA(model, decay=0.999, device="cpu")
    background.attach(opt)
    gen = seeded("long")
    for _ in range(200):
        model(torch.randn(16, 64, generator=gen).cuda().bfloat16()).float().square().mean() \
            .backward()
        opt.step()  # background.update() runs here
        opt.zero_grad()
        blocking.update()
    got, want = _shadows(background), _shadows(blocking)
    for k in want:
        assert torch.equal(got[k], want[k]), k
    assert background.num_updates == blocking.num_updates == 200
