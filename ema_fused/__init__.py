"""ema_fused: a fast, drop-in exponential moving average of model weights for PyTorch.

    ema = EMA(model, decay=0.9999)
    for batch in data:
        ...; optimizer.step()
        ema.update()
    with ema.average_parameters():
        evaluate(model)
"""
from . import schedules
from .backends import BackendUnavailableError, available_backends
from ._tracking import ModelChangedError
from .ema import EMA
from .averaging import average_checkpoints
from .ops import ema_copy_, ema_multi_update_, ema_swap_, ema_update_, ema_weighted_sum_
from .posthoc import PostHocEMA

__version__ = "0.1.0"

__all__ = [
    "EMA", "PostHocEMA", "ema_update_", "ema_copy_", "ema_swap_", "ema_multi_update_",
    "ema_weighted_sum_", "average_checkpoints", "available_backends", "schedules",
    "BackendUnavailableError", "ModelChangedError", "__version__",
]
