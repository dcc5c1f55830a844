"""Training-loop integrations: thin adapters over :class:`ema_fused.EMA`.

- :mod:`ema_fused.integrations.lightning`: ``EMACallback`` for Lightning's ``Trainer``.
- :mod:`ema_fused.integrations.transformers`: ``EMACallback`` for Hugging Face's ``Trainer``.

Each module imports its framework itself, so ``import ema_fused`` (and this package)
never needs Lightning or transformers.  For a plain loop or accelerate, use
``ema.attach(optimizer)``; ``accelerator.register_for_checkpointing(ema)`` saves and
restores an EMA with accelerate's checkpoints.
"""
