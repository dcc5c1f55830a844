"""``EMACallback`` for Hugging Face ``transformers.Trainer``: an ``ema_fused.EMA`` of the model.

    from ema_fused.integrations.transformers import EMACallback
    trainer = Trainer(model=model, args=args, ..., callbacks=[EMACallback(decay=0.999)])

Updates: in ``on_optimizer_step`` with ``update(step=state.global_step + 1)`` (the
step being finished), once per real optimizer step: under gradient accumulation once
per accumulated step, and not after a step that the fp16 GradScaler skipped (a step
post-hook on the optimizer that really steps tells which steps ran).

Evaluations during training run on the EMA weights.  The callback API has no event
before an evaluation, so the way in is the ``on_step_end`` / ``on_epoch_end`` event that
precedes it: the ``DefaultFlowCallback`` (always first in the list) has just set
``control.should_evaluate``, and this callback swaps the EMA weights in when it sees
it.  The way out is ``on_evaluate``, which the Trainer fires at the end of each
``evaluate()``.  With several eval datasets (a dict) ``evaluate()`` runs once per
dataset and fires ``on_evaluate`` after each, so while the evaluation window is open a
forward pre-hook on the model swaps the EMA weights back in at the next eval-mode
forward.  The window closes (weights raw, hook gone) at the next step, epoch, save or
train end.  A callback placed after this one that itself sets ``should_evaluate`` in
``on_step_end`` is not seen.  For a standalone evaluation use
``callback.evaluate(trainer)``.
"""
from __future__ import annotations

import contextlib
import os
from typing import Any, Optional

import torch
from transformers import TrainerCallback

from ..ema import EMA, on_real_step, order_before_steps
from ._sharding import has_dtensor, refuse_unsupported_sharding

STATE_FILE = "ema_fused_state.pt"  # beside the model weights in each checkpoint-N folder


def _sharding(args: Any, model: Any) -> Optional[str]:
    """What shards ``model`` in a way EMA cannot follow: FSDP1 (``args.fsdp`` whose model
    holds no DTensor; FSDP2 makes DTensors, followed shard by shard) or ZeRO-3."""
    if getattr(args, "fsdp", None) and not has_dtensor(model):
        return "TrainingArguments.fsdp (FSDP1)"
    from transformers.integrations.deepspeed import is_deepspeed_zero3_enabled
    return "DeepSpeed ZeRO-3" if is_deepspeed_zero3_enabled() else None


class EMACallback(TrainerCallback):
    """Keep an EMA of the Trainer's model; evaluate with it during training.

    Args:
        decay: the constant decay (``EMA(decay=...)``; a ``schedule=`` replaces it).
        evaluate_with_ema: evaluations during training (``eval_strategy``) run on the EMA
            weights; the raw weights are back afterwards, exactly.
        copy_to_model_at_end: at train end write the EMA weights into the model (after
            ``load_best_model_at_end``, which they then replace).
        **ema_kwargs: passed to :class:`ema_fused.EMA`.

    The EMA (``callback.ema``) is made in ``on_train_begin`` from the model the Trainer
    holds then.  It is saved as ``ema_fused_state.pt`` in each ``checkpoint-N`` folder
    (``on_save``; nothing goes into the JSON trainer state) and loaded back when training
    resumes: from ``args.resume_from_checkpoint`` if it names a folder holding that file,
    else from ``output_dir/checkpoint-{global_step}``.
    """

    def __init__(self, decay: float = 0.9999, *, evaluate_with_ema: bool = True,
                 copy_to_model_at_end: bool = False, **ema_kwargs: Any) -> None:
        self.decay = decay
        self.evaluate_with_ema = evaluate_with_ema
        self.copy_to_model_at_end = copy_to_model_at_end
        self.ema_kwargs = ema_kwargs
        self.ema: Optional[EMA] = None
        self._stepped = False  # the optimizer really stepped since the last update
        self._step_hook = None
        self._fences = None  # offloaded shadows: the copy is waited for by the next step
        self._swap: Optional[contextlib.ExitStack] = None  # open while EMA weights are in
        self._window = None  # the forward pre-hook while an evaluation may run

    # ------------------------------------------------------------------ training
    def on_train_begin(self, args, state, control, model=None, optimizer=None, **kwargs):
        refuse_unsupported_sharding(_sharding(args, model))
        self.ema = EMA(model, self.decay, **self.ema_kwargs)
        if state.global_step > 0:
            self.ema.load_state_dict(torch.load(self._resume_file(args, state),
                                                map_location="cpu", weights_only=True))
        self._step_hook = on_real_step(optimizer, self._mark_step)
        self._fences = order_before_steps(self.ema)

    def _mark_step(self) -> None:
        self._stepped = True

    def on_optimizer_step(self, args, state, control, **kwargs):
        if self._stepped:
            self._stepped = False
            self.ema.update(step=state.global_step + 1)  # the Trainer counts it just after

    def on_train_end(self, args, state, control, **kwargs):
        self._close_window()
        if self._step_hook is not None:
            self._step_hook.remove()
            self._step_hook = None
        if self._fences is not None:
            self._fences.remove()
            self._fences = None
        if self.copy_to_model_at_end and self.ema is not None and self.ema.decay is not None:
            self.ema.copy_to()

    # ------------------------------------------------------------------ evaluation
    def evaluate(self, trainer: Any, **kwargs: Any) -> dict:
        """``trainer.evaluate(**kwargs)`` on the EMA weights; the raw weights are back after."""
        if self.ema is None:
            raise RuntimeError("EMACallback.evaluate: no EMA yet; it is made when training "
                               "starts")
        with self.ema.average_parameters():
            return trainer.evaluate(**kwargs)

    def _swap_in(self) -> None:
        if self._swap is None:
            self._swap = contextlib.ExitStack()
            self._swap.enter_context(self.ema.average_parameters())

    def _swap_out(self) -> None:
        if self._swap is not None:
            swap, self._swap = self._swap, None
            swap.close()

    def _open_window(self, control, model) -> None:
        self._close_window()
        # never before an update changed the shadows (they would be the initial weights)
        if not (self.evaluate_with_ema and control.should_evaluate and self.ema is not None
                and self.ema.decay is not None):
            return
        self._swap_in()

        @torch.compiler.disable
        def reswap(module, args):  # a second eval dataset: EMA weights back in
            if not module.training:
                self._swap_in()

        self._window = model.register_forward_pre_hook(reswap)

    def _close_window(self) -> None:
        self._swap_out()
        if self._window is not None:
            self._window.remove()
            self._window = None

    def on_step_end(self, args, state, control, model=None, **kwargs):
        self._open_window(control, model)

    def on_epoch_end(self, args, state, control, model=None, **kwargs):
        self._open_window(control, model)

    def on_evaluate(self, args, state, control, **kwargs):
        self._swap_out()  # the window stays open for a next dataset of the same evaluate()

    def on_step_begin(self, args, state, control, **kwargs):
        self._close_window()

    def on_epoch_begin(self, args, state, control, **kwargs):
        self._close_window()

    # ------------------------------------------------------------------ checkpoints
    def on_save(self, args, state, control, **kwargs):
        self._close_window()
        if self.ema is None or not args.should_save:
            return
        folder = os.path.join(args.output_dir, f"checkpoint-{state.global_step}")
        if not os.path.isdir(folder):
            raise FileNotFoundError(f"EMACallback: the checkpoint folder {folder} does not exist; "
                                    "the EMA state could not be saved beside it")
        torch.save(self.ema.state_dict(), os.path.join(folder, STATE_FILE))

    @staticmethod
    def _resume_file(args, state) -> str:
        folders = [args.resume_from_checkpoint] if isinstance(args.resume_from_checkpoint,
                                                              str) else []
        folders.append(os.path.join(args.output_dir, f"checkpoint-{state.global_step}"))
        for folder in folders:
            if os.path.isfile(os.path.join(folder, STATE_FILE)):
                return os.path.join(folder, STATE_FILE)
        raise FileNotFoundError(
            f"EMACallback: training resumes at step {state.global_step} but no {STATE_FILE} "
            f"was found in {folders}. If the checkpoint lies elsewhere, set "
            "TrainingArguments(resume_from_checkpoint=...) to the folder given to train()")
