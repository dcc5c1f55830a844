"""Weighted averaging of k saved checkpoints (SWA as run on the last k saves), streamed.

    average.py            average_checkpoints: its checks, then the streamed sum
    plan.py               the checks run before anything is read (weights, names, like=)
    engine.py             the streamed weighted sum, a few tensors at a time (also used by
                          PostHocEMA's synthesis from DCP snapshots), and open_source
    sources.py            what every source shares: names, key= selection, layouts
    readers.py            state dicts and torch.save files (memory-mapped, pages handed back)
    dcp_sources.py        DCP checkpoint directories, read chunk by chunk
    safetensors_files.py  safetensors files read, and the format's header for writing
    writers.py            where the average goes: a dict, a safetensors file, a DCP directory
    progress.py           the command line's progress bar over tensors and bytes

Builds on the op layer (``ema_weighted_sum_``) and on ``ema_fused.ema``'s key matching.
"""
from .average import average_checkpoints, average_with_progress
from .dcp_sources import calling_dcp, is_dcp_dir
from .engine import open_source, weighted_sum
from .plan import check_plan
from .progress import ProgressBar
from .writers import check_out

__all__ = ["average_checkpoints", "average_with_progress", "calling_dcp", "check_out",
           "check_plan", "is_dcp_dir", "open_source", "weighted_sum", "ProgressBar"]
