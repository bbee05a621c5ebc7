"""Checkpoints that are either complete or absent: the Trainer writes each one into a hidden
staging folder, which is renamed to `checkpoint-N` only once every file is on disk.

A process killed mid-save (SIGKILL, OOM, power loss) therefore leaves a `.partial-checkpoint-N`
folder that nothing loads — `get_last_checkpoint` and the Trainer's rotation only look at
`checkpoint-N` — and the previous checkpoint stays the one `resume=true` continues from.

A checkpoint damaged after it was published (a truncated file, a garbled `trainer_state.json`, an
emptied folder) is found by `verified_checkpoints`, which reads each one's metadata (never its
tensors): `resume=true` then continues from the newest whole one and says which it skipped.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import Any

PARTIAL_PREFIX = ".partial-"
DAMAGED_PREFIX = ".damaged-"  # a damaged checkpoint moved aside: kept for inspection, never loaded or rotated
ZIP_STATES = ("optimizer.pt", "scheduler.pt", "scaler.pt", "rng_state*.pth")  # torch.save files: zip archives


class CheckpointError(RuntimeError):
    """No checkpoint of a run can be resumed from."""


def checkpoint_problem(folder: Path) -> str | None:
    """Why `folder` cannot be resumed from, read from metadata only (JSON, safetensors headers,
    zip directories); None when it looks whole."""
    import zipfile

    from safetensors import SafetensorError, safe_open

    state = folder / "trainer_state.json"
    if not state.is_file():
        return "trainer_state.json is missing"
    try:
        step = json.loads(state.read_text())["global_step"]
        if not isinstance(step, int):
            raise TypeError
    except (ValueError, KeyError, TypeError, UnicodeDecodeError):
        return "trainer_state.json is not a trainer state"
    weights = sorted(folder.glob("*.safetensors"))
    if not weights and not list(folder.glob("global_step*")):  # DeepSpeed keeps its own layout
        return "no model weights (*.safetensors)"
    for path in weights:
        try:
            with safe_open(str(path), "pt"):  # checks the header against the file's length
                pass
        except (SafetensorError, OSError) as e:
            return f"{path.name}: {one_line_of(e)}"
    for pattern in ZIP_STATES:
        for path in folder.glob(pattern):
            try:
                zipfile.ZipFile(path).close()  # the central directory sits at the end: truncation fails here
            except (zipfile.BadZipFile, OSError) as e:
                return f"{path.name}: {one_line_of(e)}"
    return None


def one_line_of(exc: BaseException) -> str:
    return (str(exc).strip().splitlines() or [type(exc).__name__])[0]


def verified_checkpoints(checkpoint_dir: Path) -> tuple[Path | None, list[tuple[Path, str]]]:
    """The newest checkpoint that passes `checkpoint_problem`, and the newer damaged ones with why."""
    import re

    found = []
    if checkpoint_dir.is_dir():
        for path in checkpoint_dir.iterdir():
            match = re.fullmatch(r"checkpoint-(\d+)", path.name)
            if match and path.is_dir():
                found.append((int(match[1]), path))
    damaged = []
    for _, path in sorted(found, reverse=True):
        problem = checkpoint_problem(path)
        if problem is None:
            return path, damaged
        damaged.append((path, problem))
    return None, damaged


def set_aside(damaged: list[tuple[Path, str]]) -> None:
    """Rename damaged checkpoints out of the Trainer's sight (its rotation or a later resume would
    pick them up again); they stay on disk for inspection."""
    for path, _ in damaged:
        aside = path.with_name(f"{DAMAGED_PREFIX}{path.name}")
        shutil.rmtree(aside, ignore_errors=True)
        os.replace(path, aside)


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
        except OSError:  # e.g. the disk filled up: free what the failed save took, so the run can still be marked
            if self.is_world_process_zero():
                shutil.rmtree(staging, ignore_errors=True)
            raise
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
