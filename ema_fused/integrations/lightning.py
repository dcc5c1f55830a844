"""``EMACallback`` for Lightning: an ``ema_fused.EMA`` of the LightningModule.

    from ema_fused.integrations.lightning import EMACallback
    trainer = L.Trainer(callbacks=[EMACallback(decay=0.999)])

When it updates: once per training batch in which at least one optimizer really
stepped, with ``update(step=trainer.global_step)``.  "Really stepped" is seen by a step
post-hook on each of the trainer's optimizers (``ema_fused.ema.hooks``), so

- under gradient accumulation it updates once per optimizer step, not per batch;
- a step that the AMP GradScaler skipped (inf/NaN gradients) is not an update;
- with several optimizers (manual optimization) it updates once per batch, after all
  of them stepped, not once per optimizer; ``step`` is still ``trainer.global_step``,
  which Lightning counts per optimizer step (two optimizers per batch: +2 per batch);
- under manual optimization the same rule holds: whatever ``opt.step()`` calls the
  ``training_step`` makes, one update follows the batch.
"""
from __future__ import annotations

import contextlib
from typing import Any, Optional

import lightning.pytorch as pl
from lightning.pytorch.callbacks import Callback

from .. import migrate
from ..ema import EMA, on_real_step, order_before_steps
from ._sharding import refuse_unsupported_sharding

_RAW_KEY = "current_model_state"  # where the raw weights go when the average is exported


def _sharding_strategy(trainer: "pl.Trainer") -> Optional[str]:
    """The strategy's name if it shards in a way EMA cannot follow (FSDP1, DeepSpeed);
    ModelParallelStrategy (FSDP2, tensor parallel: DTensors) is followed shard by shard."""
    from lightning.pytorch.strategies import DeepSpeedStrategy, FSDPStrategy
    strategy = trainer.strategy
    return type(strategy).__name__ if isinstance(strategy, (FSDPStrategy,
                                                           DeepSpeedStrategy)) else None


class EMACallback(Callback):
    """Keep an EMA of the LightningModule's weights; validate and test with it.

    Args:
        decay: the constant decay (``EMA(decay=...)``; a ``schedule=`` replaces it).
        validate_with_ema: validation runs on the averaged weights (swapped in and out
            with ``EMA.average_parameters()``, never before the first update).
        test_with_ema: the same for ``trainer.test``.
        export_ema_on_save: checkpoints hold the averaged weights in ``state_dict`` (so
            ``Model.load_from_checkpoint`` gives the averaged model) and the raw weights in
            ``checkpoint["current_model_state"]``, from which a resume restores them.
        **ema_kwargs: passed to :class:`ema_fused.EMA` (``schedule``, ``update_after_step``,
            ``buffers``, ``dtype``, ``device``, ``backend``, ...).

    The EMA (``callback.ema``) is made at fit start, after ``configure_model`` and after
    the strategy moved and wrapped the module.  Its state is the callback's
    ``state_dict``, so a resume with ``ckpt_path=`` continues it bit-identically.  A
    checkpoint written by Lightning's ``EMAWeightAveraging`` is taken over on resume.
    """

    def __init__(self, decay: float = 0.9999, *, validate_with_ema: bool = True,
                 test_with_ema: bool = True, export_ema_on_save: bool = False,
                 **ema_kwargs: Any) -> None:
        self.decay = decay
        self.validate_with_ema = validate_with_ema
        self.test_with_ema = test_with_ema
        self.export_ema_on_save = export_ema_on_save
        self.ema_kwargs = ema_kwargs
        self.ema: Optional[EMA] = None
        self._module: Optional[pl.LightningModule] = None
        self._pending: Optional[tuple[str, dict]] = None  # a state loaded before the EMA exists
        self._stepped = False  # an optimizer really stepped since the last update
        self._step_hooks: list = []
        self._swap: Optional[contextlib.ExitStack] = None

    @property
    def state_key(self) -> str:
        return self._generate_state_key(decay=self.decay)

    # ------------------------------------------------------------------ the EMA
    def _ensure_ema(self, pl_module: "pl.LightningModule") -> Optional[EMA]:
        """The EMA of ``pl_module``: made now if a checkpoint's state waits for it."""
        if self.ema is None and self._pending is not None:
            self._make(pl_module)
        return self.ema

    def _make(self, pl_module: "pl.LightningModule") -> None:
        self.ema = EMA(pl_module, self.decay, **self.ema_kwargs)
        self._module = pl_module
        self._load_pending()

    def _load_pending(self) -> None:
        if self.ema is None or self._pending is None:
            return
        kind, state = self._pending
        if kind == "ema":
            self.ema.load_state_dict(state)
        else:  # a checkpoint of Lightning's EMAWeightAveraging
            migrate.load_peer_state_dict(self.ema, state, "lightning")
        self._pending = None

    def _mark_step(self) -> None:
        self._stepped = True

    # ------------------------------------------------------------------ training
    def on_fit_start(self, trainer: "pl.Trainer", pl_module: "pl.LightningModule") -> None:
        refuse_unsupported_sharding(_sharding_strategy(trainer))
        if self.ema is None or self._module is not pl_module:
            self._make(pl_module)
        self._step_hooks = [on_real_step(opt, self._mark_step) for opt in trainer.optimizers]
        # offloaded shadows (device="cpu"): the params' copy is waited for by the next
        # optimizer step, not at the end of each update
        self._step_hooks.append(order_before_steps(self.ema))

    def on_train_batch_end(self, trainer: "pl.Trainer", pl_module: "pl.LightningModule",
                           outputs: Any, batch: Any, batch_idx: int) -> None:
        if self._stepped:
            self._stepped = False
            self.ema.update(step=trainer.global_step)

    def on_fit_end(self, trainer: "pl.Trainer", pl_module: "pl.LightningModule") -> None:
        self._remove_hooks()

    def on_exception(self, trainer: "pl.Trainer", pl_module: "pl.LightningModule",
                     exception: BaseException) -> None:
        self._swap_out()
        self._remove_hooks()

    def _remove_hooks(self) -> None:
        for handle in self._step_hooks:
            handle.remove()
        self._step_hooks = []

    # ------------------------------------------------------------------ evaluation
    def _swap_in(self, pl_module: "pl.LightningModule", wanted: bool) -> None:
        ema = self._ensure_ema(pl_module) if wanted else None
        # ema.decay is None until an update changed the shadows: never swap in a copy
        # of the initial weights (the sanity check runs before any update).
        if ema is not None and ema.decay is not None and self._swap is None:
            self._swap = contextlib.ExitStack()
            # into the module being evaluated, which trainer.validate(other) may have changed
            self._swap.enter_context(ema.average_parameters(pl_module))

    def _swap_out(self) -> None:
        if self._swap is not None:
            swap, self._swap = self._swap, None
            swap.close()

    def on_validation_epoch_start(self, trainer: "pl.Trainer",
                                  pl_module: "pl.LightningModule") -> None:
        self._swap_in(pl_module, self.validate_with_ema)

    def on_validation_epoch_end(self, trainer: "pl.Trainer",
                                pl_module: "pl.LightningModule") -> None:
        self._swap_out()

    def on_test_epoch_start(self, trainer: "pl.Trainer", pl_module: "pl.LightningModule") -> None:
        self._swap_in(pl_module, self.test_with_ema)

    def on_test_epoch_end(self, trainer: "pl.Trainer", pl_module: "pl.LightningModule") -> None:
        self._swap_out()

    # ------------------------------------------------------------------ checkpoints
    def state_dict(self) -> dict:
        if self.ema is not None:
            return {"ema": self.ema.state_dict()}
        return {"ema": self._pending[1]} if self._pending and self._pending[0] == "ema" else {}

    def load_state_dict(self, state_dict: dict) -> None:
        if "ema" in state_dict:
            self._pending = ("ema", state_dict["ema"])
            self._load_pending()

    def on_save_checkpoint(self, trainer: "pl.Trainer", pl_module: "pl.LightningModule",
                           checkpoint: dict) -> None:
        if not self.export_ema_on_save or self.ema is None or self.ema.decay is None:
            return
        raw = checkpoint["state_dict"]
        averaged = self.ema.averaged_weights()
        # in the raw tensors' dtypes: exactly what copy_to() would leave in the model
        checkpoint["state_dict"] = {k: averaged[k].to(v.dtype) if k in averaged else v
                                    for k, v in raw.items()}
        checkpoint[_RAW_KEY] = raw

    def on_load_checkpoint(self, trainer: "pl.Trainer", pl_module: "pl.LightningModule",
                           checkpoint: dict) -> None:
        if _RAW_KEY not in checkpoint:
            return
        ours = self.state_key in checkpoint.get("callbacks", {})
        if not ours and "averaging_state" in checkpoint:  # EMAWeightAveraging wrote it
            self._pending = ("peer", {k: checkpoint[k] for k in
                                      ("state_dict", _RAW_KEY, "averaging_state", "global_step")})
            self._load_pending()
        # The model was just loaded from "state_dict", which holds the average: put the
        # raw weights back, so that training resumes from them.
        trainer.strategy.load_model_state_dict({"state_dict": checkpoint[_RAW_KEY]},
                                               strict=pl_module.strict_loading)
