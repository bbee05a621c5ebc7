"""The MLflow parent run of a sweep: one per study, shared by every worker and every resumption.

Its id lives in the study (user attribute `mlflow_parent_run_id`), so a resumed or second worker
finds it. Trials nest under it through `tracking.parent_run_id`; after each trial the parent gets
that trial's value (metric `trial_value`, step = trial number) and the best trial so far (metric
`best_value`, tags `best.trial` and `best.param.<name>`). MLflow params cannot change once set,
so everything that moves is a metric or a tag.

Every worker writes to this one run, outside the study lock (a trial's outcome is told when it
ends). MLflow's SQLite store inserts a new tag with a select-then-insert, so two workers setting
the same new tag at once collide (`UNIQUE constraint failed: tags.key, tags.run_uuid`). Every write
therefore goes through `ParentRun._write`: under a per-study file lock (workers sharing a file
system, as a SQLite store requires) and retried with backoff on such transient store errors
(workers on other hosts writing to a server).
"""

from __future__ import annotations

import contextlib
import json
import random
import re
import time
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import optuna

from camex import tracking

PARENT_ATTR = "mlflow_parent_run_id"
WRITE_ATTEMPTS = 8  # backoff 0.05 s doubling to 2 s: ~6 s in all before a write is given up
TRANSIENT = ("UNIQUE constraint failed", "database is locked", "IntegrityError", "TEMPORARILY_UNAVAILABLE")


def _transient(exc: BaseException) -> bool:
    """A store error another writer caused, which a retry resolves."""
    while exc is not None:
        if any(t in f"{type(exc).__name__}: {exc}" for t in TRANSIENT):
            return True
        exc = exc.__cause__ or exc.__context__
    return False


def parent_lock(output_root: str | Path, study_name: str):
    """The file lock that serialises writes to a study's parent run (next to the study lock)."""
    from filelock import FileLock

    folder = Path(output_root).resolve() / "sweeps" / "locks"
    folder.mkdir(parents=True, exist_ok=True)
    return FileLock(str(folder / f"{study_name}.parent.lock"))


def mlflow_key(name: str) -> str:
    """An override key as an MLflow param or tag name (`+sweeps` -> `sweeps`, `a@b` -> `a_b`)."""
    return re.sub(r"[^\w\-. :/]", "_", name.lstrip("+~"))


class ParentRun:
    def __init__(self, client, run_id: str, lock: Any = None) -> None:
        self.client = client
        self.run_id = run_id
        self.lock = lock  # None: retries alone (a worker that cannot share a lock file)

    def _write(self, fn: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
        for attempt in range(WRITE_ATTEMPTS):
            try:
                with self.lock if self.lock is not None else contextlib.nullcontext():
                    return fn(*args, **kwargs)
            except Exception as e:
                if attempt == WRITE_ATTEMPTS - 1 or not _transient(e):
                    raise
                time.sleep(min(2.0, 0.05 * 2**attempt) * random.uniform(0.5, 1.5))
        return None

    def set_tags(self, tags: Mapping[str, str]) -> None:
        from mlflow.entities import RunTag

        self._write(self.client.log_batch, self.run_id, tags=[RunTag(k, v) for k, v in tags.items()])

    @classmethod
    def open(
        cls,
        study: optuna.Study,
        tracking_cfg: Mapping[str, Any],
        *,
        output_root: str | Path,
        experiment: str,
        description: Mapping[str, Any],
    ) -> ParentRun:
        """The study's parent run, created on first use (call under the study lock)."""
        from mlflow.tracking import MlflowClient

        uri = tracking_cfg.get("uri") or tracking.default_uri(output_root)
        client = MlflowClient(tracking_uri=uri)
        lock = parent_lock(output_root, study.study_name)
        known = study.user_attrs.get(PARENT_ATTR)
        if known:
            parent = cls(client, known, lock)
            parent._write(client.update_run, known, status="RUNNING")
            return parent
        exp_id = tracking.ensure_experiment(client, uri, experiment, tracking_cfg.get("artifact_location"))
        run = client.create_run(
            exp_id,
            run_name=f"sweep {study.study_name}",
            tags={"sweep.study": study.study_name, "sweep.role": "parent", "experiment": experiment},
        )
        for key, value in tracking.flatten(description).items():
            client.log_param(run.info.run_id, mlflow_key(key), value[:6000])
        client.set_tag(run.info.run_id, "git_commit", tracking.git_commit())
        study.set_user_attr(PARENT_ATTR, run.info.run_id)
        return cls(client, run.info.run_id, lock)

    def record(self, study: optuna.Study, number: int, value: float | None) -> None:
        """Log one finished trial, and the study's best so far."""
        if value is not None:
            self._write(self.client.log_metric, self.run_id, "trial_value", value, step=number)
        self._log_best(study, step=number)

    def _log_best(self, study: optuna.Study, step: int) -> None:
        complete = study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.COMPLETE,))
        if not complete:
            return
        best = study.best_trial
        self._write(self.client.log_metric, self.run_id, "best_value", float(best.value), step=step)
        tags = {"best.trial": str(best.number)}
        tags.update({f"best.param.{mlflow_key(name)}": str(param) for name, param in best.params.items()})
        self.set_tags(tags)

    def finish(self, study: optuna.Study, status: str, best_groups: list) -> None:
        """Counts, the best per (task, model, merge) as an artifact, and the final status."""
        states = [t.state.name for t in study.get_trials(deepcopy=False)]
        # parallel workers tell trials out of order: the best over all of them goes last
        self._log_best(study, step=len(states))
        for state in ("COMPLETE", "FAIL", "RUNNING"):
            self._write(self.client.log_metric, self.run_id, f"trials_{state.lower()}", states.count(state))
        table = [{"group": b.group, "trial": b.number, "value": b.value, "params": b.params} for b in best_groups]
        self._write(self.client.log_text, self.run_id, json.dumps(table, indent=2, default=str), "best_per_group.json")
        self._write(self.client.set_terminated, self.run_id, status=status)
