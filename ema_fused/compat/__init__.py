"""The peers' EMA classes over ema_fused: same constructor signatures, methods,
attributes, checkpoint formats and numbers, with the fused update.  Change one import:

    from ema_fused.compat.timm import ModelEmaV3            # was: from timm.utils import ModelEmaV3

- :mod:`ema_fused.compat.timm`: ``ModelEmaV2``, ``ModelEmaV3``
- :mod:`ema_fused.compat.torch_ema`: ``ExponentialMovingAverage``
- :mod:`ema_fused.compat.ema_pytorch`: ``EMA``
- :mod:`ema_fused.compat.diffusers`: ``EMAModel``
- :mod:`ema_fused.compat.swa_utils`: ``AveragedModel`` and the ``get_*_avg_fn`` factories
- :mod:`ema_fused.compat.lightning`: ``WeightAveraging``, ``EMAWeightAveraging``

Each class is a thin layer over :class:`ema_fused.EMA` (the shadows are the EMA's; the
averaged copy of the model that timm, ema-pytorch and ``AveragedModel`` expose is
``EMA.shadow_module()``, whose tensors *are* the shadows) and computes only the peer's
decay from the peer's counters (with :mod:`ema_fused.schedules`).  This package imports
no peer framework; only :mod:`~ema_fused.compat.lightning` needs its framework (Lightning)
installed.  The README's "Migrating from a peer" lists every difference that remains.
"""
