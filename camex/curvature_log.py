"""Logs the curvature diagnostic (`camex.moe.diagnostics`) to MLflow at every evaluation.

A Trainer callback: after each evaluation it runs the model on the first eval batch (eval mode,
no gradients, the random state put back afterwards so the run's results do not change) and
logs the diagnostic's keys at the current step. Models without curvature-aware layers log nothing.
"""

from __future__ import annotations

import torch

from camex.moe.diagnostics import CurvatureProbe


def first_eval_batch(trainer) -> dict:
    """The first batch of the (first named) eval set, on the training device."""
    named = trainer.eval_dataset if isinstance(trainer.eval_dataset, dict) else None  # e.g. MNLI's two splits
    batch = next(iter(trainer.get_eval_dataloader(next(iter(named)) if named else None)))
    device = trainer.args.device
    return {k: v.to(device) if torch.is_tensor(v) else v for k, v in batch.items()}


def curvature_callback(trainer, model: torch.nn.Module, tracker):
    """A TrainerCallback logging the diagnostic of `model` (create it before training starts)."""
    from transformers import TrainerCallback

    probe = CurvatureProbe(model)

    class Callback(TrainerCallback):
        last_step = -1

        def on_evaluate(self, args, state, control, **kwargs):
            if not probe or state.global_step == self.last_step:  # MNLI: one evaluation per split
                return
            self.last_step = state.global_step
            devices = [torch.cuda.current_device()] if torch.cuda.is_available() else []
            was_training = model.training
            model.eval()
            try:  # a DataLoader draws its base seed from the global generator: fork it for that too
                with torch.random.fork_rng(devices=devices):
                    batch = first_eval_batch(trainer)
                    values = probe.measure(lambda: model(**batch))
            finally:
                model.train(was_training)
            tracker.log_metrics(values, step=state.global_step)

    return Callback()
