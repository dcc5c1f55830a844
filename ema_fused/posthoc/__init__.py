"""Post-hoc EMA (EDM2, Karras et al. 2024): K power-function EMA profiles updated in one
pass, snapshots taken during training, any other profile width synthesized afterwards.

    posthoc_ema.py   the PostHocEMA class
    profiles.py      the K profiles: one leader EMA updating every profile in one pass
    snapshots.py     snapshot payloads, in memory or as files
    sharded_snapshots.py  sharded models' snapshots: local shards, one DCP folder each
    synthesis.py     a profile at any width, from the snapshots, through ema_weighted_sum_
    streamed_synthesis.py  the same through ema_fused.averaging's streamed weighted sum:
                     sharded snapshots, shard-local results, out= files
    solve.py         the EDM2 least-squares math (Algorithm 3), from the paper's equations
    state.py         PostHocEMA.state_dict / load_state_dict

Builds on ``ema_fused.ema`` (each profile is an ``EMA``), the op layer, and
``ema_fused.averaging`` (its streamed weighted sum and DCP helpers).
"""
from . import solve
from .posthoc_ema import PostHocEMA, Profile

__all__ = ["PostHocEMA", "Profile", "solve"]
