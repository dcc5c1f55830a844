"""Set-up shared by every test; the helpers themselves are in tests/helpers/."""
from __future__ import annotations

import os

import torch

# Without a GPU, run the Triton kernels through Triton's interpreter.  It must be set
# before ema_fused's kernels are imported (they are imported on first use).
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
