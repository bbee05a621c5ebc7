"""Checkpoints that are either complete or absent: the Trainer writes each one into a hidden
staging folder, which is renamed to `checkpoint-N` only once every file is on disk.

A process killed mid-save (SIGKILL, OOM, power loss) therefore leaves a `.partial-checkpoint-N`
folder that nothing loads — `get_last_checkpoint` and the Trainer's rotation only look at
`checkpoint-N` — and the previous checkpoint stays the one `resume=true` continues from.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import Any

PARTIAL_PREFIX = ".partial-"


def _fsync_tree(folder: Path) -> None:
    """Flush every file and the folder itself, so the rename below publishes data, not promises."""
    for path in sorted(folder.rglob("*")):
        if path.is_file():
            with open(path, "rb") as f:
                os.fsync(f.fileno())
    _fsync_dir(folder)


def _fsync_dir(folder: Path) -> None:
    fd = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def publish(staged: Path, final: Path) -> None:
    """Atomically make the finished folder `staged` visible as `final` (same parent filesystem).

    A folder cannot be renamed over a non-empty one, so an existing `final` (the same step saved
    twice) is first moved aside; at every moment one complete copy is in place.
    """
    _fsync_tree(staged)
    aside = None
    if final.exists():
        aside = final.with_name(f"{PARTIAL_PREFIX}old-{final.name}")
        shutil.rmtree(aside, ignore_errors=True)
        os.replace(final, aside)
    os.replace(staged, final)
    _fsync_dir(final.parent)
    if aside is not None:
        shutil.rmtree(aside, ignore_errors=True)


def remove_partial(checkpoint_dir: Path) -> list[Path]:
    """Delete staging folders left by a save that was killed; returns what was removed."""
    removed = []
    if checkpoint_dir.is_dir():
        for path in checkpoint_dir.iterdir():
            if path.name.startswith(PARTIAL_PREFIX) and path.is_dir():
                shutil.rmtree(path, ignore_errors=True)
                removed.append(path)
    return removed


def atomic_write_text(path: Path, text: str) -> None:
    """Write a small file via a temporary sibling and a rename: readers see old or new, never half."""
    tmp = path.with_name(f"{PARTIAL_PREFIX}{path.name}")
    with open(tmp, "w", encoding="utf-8") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


class AtomicCheckpoints:
    """Trainer mixin: every `checkpoint-N` folder appears complete or not at all.

    The Trainer's `_save_checkpoint` is reused unchanged, pointed at a staging root through
    `_get_output_dir` (the one place it reads the output folder), so model, optimizer, scheduler,
    RNG and trainer state are all written there first. Inside the staging root the Trainer cannot
    see the other checkpoints, so the best-checkpoint pointer and the rotation are redone here.
    """

    def _save_checkpoint(self, model: Any, trial: Any) -> None:
        from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR, rotate_checkpoints

        root = Path(self._get_output_dir(trial=trial))
        name = f"{PREFIX_CHECKPOINT_DIR}-{self.state.global_step}"
        staging = root / f"{PARTIAL_PREFIX}{name}"
        if self.is_world_process_zero():
            shutil.rmtree(staging, ignore_errors=True)
        self.accelerator.wait_for_everyone()  # under torchrun: no rank writes where rank 0 is clearing
        self._get_output_dir = lambda trial=None: str(staging)  # instance attribute shadows the method
        try:
            super()._save_checkpoint(model, trial)
        finally:
            del self._get_output_dir
        staged = staging / name

        best = self.state.best_global_step
        if best:
            best_dir = root / f"{PREFIX_CHECKPOINT_DIR}-{best}"
            if best == self.state.global_step or best_dir.is_dir():
                self.state.best_model_checkpoint = str(best_dir)
            state_file = staged / "trainer_state.json"
            if self.is_world_process_zero() and state_file.exists():  # the real path, not the staging one
                state = json.loads(state_file.read_text())
                state["best_model_checkpoint"] = self.state.best_model_checkpoint
                state_file.write_text(json.dumps(state, indent=2, sort_keys=True) + "\n")

        # Under torchrun every rank saved into the staging folder (its RNG state at least); rank 0
        # publishes it once all have, and no rank goes on before the checkpoint is in place.
        self.accelerator.wait_for_everyone()
        if self.is_world_process_zero():
            publish(staged, root / name)
            shutil.rmtree(staging, ignore_errors=True)
        if self.args.should_save:
            rotate_checkpoints(
                output_dir=str(root),
                save_total_limit=self.args.save_total_limit,
                best_model_checkpoint=self.state.best_model_checkpoint,
                use_mtime=True,
            )
        self.accelerator.wait_for_everyone()
