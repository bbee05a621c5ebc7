"""What a run does when something goes wrong mid-training, and switches that make it go wrong.

- `TrainingDiverged`: a NaN or infinite training loss stops the run at once, naming the step
  (`FiniteLossGuard`); the MLflow run ends FAILED and `run.py` exits with status 3.
- `RunInterrupted`: SIGINT (Ctrl-C) or SIGTERM (a scheduler's kill) during training saves a
  checkpoint at the end of the current step and stops (`SignalGuard`); the MLflow run ends KILLED
  and `run.py` exits with 128 + the signal number (130, 143). `resume=true` finishes the run.

Fault injection for tests (environment variables, read when a run starts; none is set normally):

    CAMEX_FAULT_KILL_AT_STEP=N      SIGKILL this process at the end of optimizer step N
    CAMEX_FAULT_KILL_IN_SAVE=N      SIGKILL while checkpoint-N is half written (model saved, optimizer not)
    CAMEX_FAULT_SIGNAL_AT_STEP=N:S  send this process signal S (INT or TERM) at the end of step N
    CAMEX_FAULT_NAN_AT_STEP=N       make the weights NaN just before step N, so its loss is NaN
"""

from __future__ import annotations

import math
import os
import signal
import threading
from typing import Any

import torch

KILL_AT_STEP = "CAMEX_FAULT_KILL_AT_STEP"
KILL_IN_SAVE = "CAMEX_FAULT_KILL_IN_SAVE"
SIGNAL_AT_STEP = "CAMEX_FAULT_SIGNAL_AT_STEP"
NAN_AT_STEP = "CAMEX_FAULT_NAN_AT_STEP"
SIGNALS = {"INT": signal.SIGINT, "TERM": signal.SIGTERM}


class TrainingDiverged(RuntimeError):
    """The training loss became NaN or infinite; continuing would only write garbage."""

    def __init__(self, step: int, loss: float) -> None:
        self.step, self.loss = step, loss
        super().__init__(
            f"training diverged: the loss is {loss} at optimizer step {step}; the run is stopped "
            "(try a lower trainer.learning_rate, trainer.max_grad_norm > 0 or trainer.precision=fp32)"
        )


class RunInterrupted(KeyboardInterrupt):
    """SIGINT or SIGTERM stopped the run. A KeyboardInterrupt, so the MLflow run ends KILLED."""

    def __init__(self, signum: int, step: int | None = None, checkpoint: str | None = None) -> None:
        self.signum, self.step, self.checkpoint = signum, step, checkpoint
        name = signal.Signals(signum).name
        if checkpoint:
            text = f"interrupted by {name} at step {step}; checkpoint saved in {checkpoint}; continue with resume=true"
        elif step is not None:
            text = f"interrupted by {name} at step {step}; no checkpoint was written yet"
        else:  # outside the training loop: before it (nothing to save) or after it (checkpoints are on disk)
            text = f"interrupted by {name}; continue with resume=true"
        super().__init__(text)

    @property
    def exit_code(self) -> int:
        return 128 + self.signum  # the shell's convention: 130 for SIGINT, 143 for SIGTERM


class SignalGuard:
    """Catches SIGINT and SIGTERM for the duration of a run.

    Inside `deferred()` (the training loop) the first signal only raises a flag that
    `SignalCallback` turns into "save a checkpoint after this step, then stop"; anywhere else, or
    on a second signal (an impatient Ctrl-C), `RunInterrupted` is raised at once.
    """

    def __init__(self) -> None:
        self.received: int | None = None
        self._deferring = False
        self._previous: dict[int, Any] = {}

    def __enter__(self) -> SignalGuard:
        if threading.current_thread() is threading.main_thread():  # Python only allows handlers there
            for signum in SIGNALS.values():
                self._previous[signum] = signal.signal(signum, self._handle)
        return self

    def __exit__(self, *exc: object) -> None:
        for signum, handler in self._previous.items():
            signal.signal(signum, handler)
        self._previous.clear()

    def _handle(self, signum: int, frame: Any) -> None:
        first = self.received is None
        self.received = signum
        if not (self._deferring and first):
            raise RunInterrupted(signum)

    def deferred(self) -> _Deferred:
        return _Deferred(self)


class _Deferred:
    def __init__(self, guard: SignalGuard) -> None:
        self.guard = guard

    def __enter__(self) -> None:
        self.guard._deferring = True

    def __exit__(self, *exc: object) -> None:
        self.guard._deferring = False


def signal_callback(guard: SignalGuard):
    """Trainer callback: after a signal, checkpoint at the end of the current step and stop."""
    from transformers import TrainerCallback

    class SignalCallback(TrainerCallback):
        def on_step_end(self, args, state, control, **kwargs):
            if guard.received is not None:
                control.should_save = True
                control.should_training_stop = True

        def on_epoch_end(self, args, state, control, **kwargs):
            # Stopping breaks out of the epoch, and the Trainer then runs its end-of-epoch
            # evaluation and save. For an unfinished epoch that would add an evaluation an
            # uninterrupted run never does (and could change the selected best epoch): skip it.
            if guard.received is not None and not float(state.epoch).is_integer():
                control.should_evaluate = False
                control.should_save = False

    return SignalCallback()


class FiniteLossGuard:
    """Trainer mixin: a NaN or infinite training loss raises `TrainingDiverged` naming the step.

    The Trainer by default hides such a loss (`logging_nan_inf_filter` swaps in the running mean)
    and keeps stepping on NaN weights. The check reads the loss on the host once per micro-batch,
    which the Trainer's own filter already does, so it adds no synchronisation.
    """

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        result = super().compute_loss(model, inputs, return_outputs, num_items_in_batch)
        loss = result[0] if return_outputs else result
        if model.training and not bool(torch.isfinite(loss.detach()).all()):
            raise TrainingDiverged(self.state.global_step + 1, float(loss.detach().float().mean()))
        return result


def _step_from_env(name: str) -> int | None:
    value = os.environ.get(name)
    return int(value) if value else None


class KillInSave:
    """Trainer mixin for fault injection: with CAMEX_FAULT_KILL_IN_SAVE=N, checkpoint-N's save is
    killed after the weights are written and before the optimizer state is."""

    def _save_optimizer_and_scheduler(self, output_dir: str) -> None:
        if _step_from_env(KILL_IN_SAVE) == self.state.global_step:
            os.kill(os.getpid(), signal.SIGKILL)
        super()._save_optimizer_and_scheduler(output_dir)


def injected_callbacks() -> list:
    """Trainer callbacks for the faults the environment asks for (none in normal use)."""
    from transformers import TrainerCallback

    kill_at = _step_from_env(KILL_AT_STEP)
    nan_at = _step_from_env(NAN_AT_STEP)
    signal_at = os.environ.get(SIGNAL_AT_STEP)
    out: list = []

    if kill_at is not None:

        class KillAtStep(TrainerCallback):
            def on_step_end(self, args, state, control, **kwargs):
                if state.global_step >= kill_at:
                    os.kill(os.getpid(), signal.SIGKILL)

        out.append(KillAtStep())

    if signal_at:
        step_text, _, name = signal_at.partition(":")
        step, signum = int(step_text), SIGNALS[name.upper()]

        class SignalAtStep(TrainerCallback):
            sent = False

            def on_step_end(self, args, state, control, **kwargs):
                if state.global_step == step and not self.sent:
                    self.sent = True
                    os.kill(os.getpid(), signum)  # a real signal, delivered to the real handler

        out.append(SignalAtStep())

    if nan_at is not None:

        class NaNAtStep(TrainerCallback):
            def on_step_begin(self, args, state, control, model=None, **kwargs):
                if state.global_step + 1 == nan_at:
                    with torch.no_grad():
                        for p in model.parameters():
                            p.fill_(math.nan)

        out.append(NaNAtStep())
    return out
