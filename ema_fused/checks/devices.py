"""Whether a device named by the user can hold tensors here, said before torch's own
error ("Found no NVIDIA driver on your system") would say it from deep inside a call."""
from __future__ import annotations

import functools
from typing import Optional

import torch


@functools.lru_cache(maxsize=64)  # asked at every backend selection: a dict look-up after
def unavailable(device: torch.device) -> Optional[str]:
    """Why ``device`` cannot hold tensors in this process (None: it can).  Only CUDA
    devices are checked; asking never initializes CUDA where it is not available."""
    if device.type != "cuda":
        return None
    if not torch.cuda.is_available():
        return ("CUDA is not available here (torch.cuda.is_available() is False: no NVIDIA "
                "GPU or driver, or a CPU-only build of torch)")
    count = torch.cuda.device_count()
    if device.index is not None and device.index >= count:
        return f"there is no {device} here (torch.cuda.device_count() is {count})"
    return None
