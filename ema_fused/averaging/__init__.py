"""Weighted averaging of k saved checkpoints (SWA as run on the last k saves).

    average.py   average_checkpoints: checks every source first, then one source at a time
    sources.py   the sources: loading one at a time, picking the state dict, names and shapes

Builds on the op layer (``ema_weighted_sum_``) and on ``ema_fused.ema``'s key matching.
"""
from .average import average_checkpoints, average_with_progress

__all__ = ["average_checkpoints", "average_with_progress"]
