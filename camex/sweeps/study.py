"""Study storage, the lock that serialises "what runs next" between workers, worker bookkeeping,
and the best configuration per (task, model, merge).

Storage is any SQLAlchemy URL; the default is a SQLite file under the outputs directory. SQLite
serialises writers, so connections wait (up to `SQLITE_TIMEOUT_S`) instead of failing when two
workers write at once; a database server needs nothing special.
"""

from __future__ import annotations

import json
import os
import socket
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import optuna
from optuna.trial import FrozenTrial, TrialState

SQLITE_TIMEOUT_S = 300
STUDY_DIR = "sweeps"  # under paths.output_root: the default storage, locks and trial run directories
GROUP_KEYS = ("task", "model", "merge")


def default_storage(output_root: str | Path) -> str:
    return f"sqlite:///{Path(output_root).resolve() / STUDY_DIR / 'optuna.db'}"


def open_storage(url: str) -> optuna.storages.RDBStorage:
    """An RDB storage for `url`; a SQLite file's folder is created and its writers wait for each other."""
    engine_kwargs: dict[str, Any] = {}
    if url.startswith("sqlite:///"):
        Path(url.removeprefix("sqlite:///")).parent.mkdir(parents=True, exist_ok=True)
        engine_kwargs["connect_args"] = {"timeout": SQLITE_TIMEOUT_S}
    return optuna.storages.RDBStorage(url, engine_kwargs=engine_kwargs)


def study_lock(output_root: str | Path, study_name: str):
    """A file lock every worker of `study_name` on this file system takes while it decides and
    claims its next trials, so two workers never claim the same grid point or overshoot a budget."""
    from filelock import FileLock

    folder = Path(output_root).resolve() / STUDY_DIR / "locks"
    folder.mkdir(parents=True, exist_ok=True)
    return FileLock(str(folder / f"{study_name}.lock"))


def this_worker() -> dict[str, Any]:
    """Who runs a trial: host, process id and the process start time (pids get reused)."""
    import psutil

    return {"host": socket.gethostname(), "pid": os.getpid(), "started": psutil.Process().create_time()}


def _process_alive(pid: int, started: float) -> bool:
    import psutil

    try:
        return abs(psutil.Process(pid).create_time() - started) < 1.0
    except psutil.Error:
        return False


def is_orphan(trial: FrozenTrial, stale_after_s: float, now: float | None = None) -> bool:
    """A RUNNING trial whose worker is gone: its process on this host has exited, or (another
    host) its heartbeat is older than `stale_after_s`."""
    if trial.state != TrialState.RUNNING:
        return False
    worker = trial.user_attrs.get("worker") or {}
    if worker.get("host") == socket.gethostname():
        return not _process_alive(int(worker["pid"]), float(worker["started"]))
    start = trial.datetime_start.timestamp() if trial.datetime_start else 0.0
    beat = float(trial.user_attrs.get("heartbeat", start))
    return (now or time.time()) - beat > stale_after_s


def params_key(params: dict[str, Any]) -> str:
    return json.dumps(params, sort_keys=True, default=str)


@dataclass
class Best:
    """The best complete trial of one (task, model, merge) group."""

    group: dict[str, str]
    number: int
    value: float
    params: dict[str, Any]
    overrides: list[str]  # the trial's config overrides (fixed and sampled), without per-trial plumbing
    n_complete: int  # complete trials in the group

    @property
    def slug(self) -> str:
        return "-".join(str(self.group.get(k, "?")).replace("/", "_") for k in GROUP_KEYS)


def best_per_group(study: optuna.Study) -> list[Best]:
    """The best COMPLETE trial per (task, model, merge), in the study's direction, sorted by group."""
    maximize = study.direction == optuna.study.StudyDirection.MAXIMIZE
    groups: dict[tuple, list[FrozenTrial]] = {}
    for trial in study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,)):
        group = trial.user_attrs.get("group") or {}
        groups.setdefault(tuple(str(group.get(k)) for k in GROUP_KEYS), []).append(trial)
    found = []
    for key in sorted(groups):
        trials = groups[key]
        best = min(trials, key=lambda t: (-t.value if maximize else t.value, t.number))  # ties: earliest
        found.append(
            Best(
                group=dict(zip(GROUP_KEYS, key)),
                number=best.number,
                value=float(best.value),
                params=dict(best.params),
                overrides=list(best.user_attrs.get("overrides", [])),
                n_complete=len(trials),
            )
        )
    return found
