"""``EMA(capturable=True)``: the step counter and the decay live in device tensors.

Each ``advance()`` is a fixed sequence of device ops on tensors whose addresses never
change, with no host sync, so one captured CUDA graph of ``ema.update()`` replays
correctly while the schedule changes the decay from step to step.  The kernels read
the weight ``1 - decay`` through a pointer (``weight``).
"""
from __future__ import annotations

from typing import Optional

import torch

from ..schedules import Schedule


class DeviceSchedule:
    """Step, decay, weight and product of decays on ``device``, advanced without syncs."""

    def __init__(self, device: torch.device, schedule: Schedule, update_after_step: int,
                 update_every: int) -> None:
        if not isinstance(schedule, Schedule):
            raise TypeError("EMA: capturable=True needs a schedule from ema_fused.schedules "
                            f"(they have a device form, decay_tensor); got {schedule!r}")
        self.schedule, self.after, self.every = schedule, update_after_step, update_every
        self.step = torch.zeros((), dtype=torch.int64, device=device)
        self.decay = torch.full((), float("nan"), dtype=torch.float64, device=device)
        self.product = torch.ones((), dtype=torch.float64, device=device)
        self.active = torch.zeros((), dtype=torch.bool, device=device)
        self.weight = torch.zeros(1, dtype=torch.float32, device=device)  # read by kernels

    def advance(self) -> None:
        """One ``update()``: step += 1, then decay, weight and product for that step."""
        self.step.add_(1)
        n = (self.step - self.after).to(torch.float64)
        decay = torch.where(self.step <= self.after, torch.zeros_like(n),
                            self.schedule.decay_tensor(n))
        active = torch.remainder(self.step, self.every) == 0
        self.active.copy_(active)
        self.weight.copy_(torch.where(active, 1.0 - decay, torch.zeros_like(decay)).reshape(1))
        self.decay.copy_(torch.where(active, decay, self.decay))
        self.product.mul_(torch.where(active, decay, torch.ones_like(decay)))

    # host views (each syncs; for logging and checkpoints, not for the training step)
    def num_updates(self) -> int:
        return int(self.step.item())

    def last_decay(self) -> Optional[float]:
        value = float(self.decay.item())
        return None if value != value else value

    def load(self, step: int, decay: Optional[float], product: float) -> None:
        """Set the counters in place (the captured graph keeps their addresses)."""
        self.step.fill_(step)
        self.decay.fill_(float("nan") if decay is None else decay)
        self.product.fill_(product)
