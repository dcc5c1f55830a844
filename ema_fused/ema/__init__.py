"""The ``EMA`` class and its parts.  Knows nothing of kernels: every update and read goes
through the op layer (``ema_fused.ops``).

    ema.py            the EMA class: which tensors, which decay, when; its public methods
    plan.py           one update's pass: the cached plan of pairs and backends, _average
    tracking.py       model -> named tensors (ties, frozen params, DTensor locals, wrappers)
    model_checks.py   what a model may hold, and the checks that find a changed model
    reads.py          copy_to / store / restore / average_parameters / averaged_weights
    checkpoint.py     state_dict / load_state_dict: the format and its checks
    capturable.py     device-side step and decay for CUDA-graph capture
    host_path.py      the C++ snapshot that lets a cached update plan skip re-reading the model
    staging.py        updates and copies across devices (shadows on another device), in pieces
    offload.py        shadows on the host (device="cpu"): capture, ordering, non_blocking waits
    offload_layout.py   ... the staging slots (pinned, allocated once) and the pieces
    offload_worker.py   ... the background thread, its errors, a clean exit
    as_module.py      EMA.as_module(): an nn.Module face carrying the EMA as extra state
    explicit.py       EMA.update_from(source, decay=): a caller's decay, another model or list
    placement.py      EMA.to(device, dtype), pin_memory(), stored_weights(): where shadows live
    bound.py          EMA.shadow_module() / bind_shadows(): shadows that are a module's tensors
    hooks.py          optimizer step hooks (EMA.attach and the training-loop integrations)
    rounding.py       rounding="stochastic": its checks, the seed, each update's counter words

Exported for the layers above (posthoc/, averaging/, integrations/, migrate.py): the class,
the checkpoint format, cross-device staging, the real-step hook, ``order_before_steps``
(the offload's stream wait before optimizer steps) and ``serialized`` (the lock decorator
PostHocEMA shares with its profiles).
"""
from . import checkpoint
from ..checks import ModelChangedError
from .ema import EMA, serialized
from .hooks import on_real_step, order_before_steps
from .offload import BackgroundUpdateError
from .offload_worker import WorkerDiedError
from .rounding import draw_seed
from .staging import copy_across_, update_across_

__all__ = ["EMA", "ModelChangedError", "BackgroundUpdateError", "WorkerDiedError", "checkpoint",
           "copy_across_", "update_across_", "on_real_step", "order_before_steps", "serialized",
           "draw_seed"]
