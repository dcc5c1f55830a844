"""The multi-process harness itself: a rank's error reaches the test, a hang is killed."""
from __future__ import annotations

import time

import pytest
import torch.distributed as dist

from helpers.dist_utils import spawn


def _fails_on_rank_1(rank: int, world_size: int) -> None:
    if rank == 1:
        raise ValueError("rank 1 says no")
    dist.barrier()  # rank 0 loses its peer here: its own error must not hide rank 1's


def _hangs(rank: int, world_size: int) -> None:
    if rank == 1:
        time.sleep(600)
    dist.barrier()  # rank 0 waits here for rank 1: a hang


def test_a_rank_error_fails_the_test_with_its_message():
    with pytest.raises(Exception, match="rank 1 says no"):
        spawn(_fails_on_rank_1, 2)


def test_a_hang_is_killed_at_the_deadline():
    start = time.monotonic()
    with pytest.raises(TimeoutError, match="did not finish within 6 s"):
        spawn(_hangs, 2, timeout=6)
    assert time.monotonic() - start < 30
