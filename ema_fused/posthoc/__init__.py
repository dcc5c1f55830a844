"""Post-hoc EMA (EDM2, Karras et al. 2024): K power-function EMA profiles updated in one
pass, snapshots taken during training, any other profile width synthesized afterwards.

    posthoc_ema.py   the PostHocEMA class
    profiles.py      the K profiles: one leader EMA updating every profile in one pass
    snapshots.py     snapshot payloads, in memory or as files
    synthesis.py     a profile at any width, from the snapshots, through ema_weighted_sum_
    solve.py         the EDM2 least-squares math (Algorithm 3), from the paper's equations
    state.py         PostHocEMA.state_dict / load_state_dict

Builds on ``ema_fused.ema`` (each profile is an ``EMA``) and the op layer.
"""
from . import solve
from .posthoc_ema import PostHocEMA, Profile

__all__ = ["PostHocEMA", "Profile", "solve"]
