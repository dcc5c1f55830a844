"""ema_fused: a fast, drop-in exponential moving average of model weights for PyTorch.

    ema = EMA(model, decay=0.9999)
    for batch in data:
        ...; optimizer.step()
        ema.update()
    with ema.average_parameters():
        evaluate(model)
"""
import sys as _sys

from . import schedules
from .backends import BackendUnavailableError, available_backends
from .ema import EMA, BackgroundUpdateError, ModelChangedError, WorkerDiedError
from .averaging import average_checkpoints
from .ops import ema_copy_, ema_multi_update_, ema_swap_, ema_update_, ema_weighted_sum_
from .posthoc import PostHocEMA
from .posthoc import solve as posthoc_solve

# ``ema_fused.posthoc_solve`` was a module of its own before the package was regrouped
# (README and user code import it): it stays importable under that name.
_sys.modules[__name__ + ".posthoc_solve"] = posthoc_solve

__version__ = "0.1.0"

__all__ = [
    "EMA", "PostHocEMA", "ema_update_", "ema_copy_", "ema_swap_", "ema_multi_update_",
    "ema_weighted_sum_", "average_checkpoints", "available_backends", "schedules",
    "BackendUnavailableError", "ModelChangedError", "BackgroundUpdateError", "WorkerDiedError",
    "__version__",
]
