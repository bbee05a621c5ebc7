"""The MLflow parent run of a sweep: one per study, shared by every worker and every resumption.

Its id lives in the study (user attribute `mlflow_parent_run_id`), so a resumed or second worker
finds it. Trials nest under it through `tracking.parent_run_id`; after each trial the parent gets
that trial's value (metric `trial_value`, step = trial number) and the best trial so far (metric
`best_value`, tags `best.trial` and `best.param.<name>`). MLflow params cannot change once set,
so everything that moves is a metric or a tag.
"""

from __future__ import annotations

import json
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import optuna

from camex import tracking

PARENT_ATTR = "mlflow_parent_run_id"


def mlflow_key(name: str) -> str:
    """An override key as an MLflow param or tag name (`+sweeps` -> `sweeps`, `a@b` -> `a_b`)."""
    return re.sub(r"[^\w\-. :/]", "_", name.lstrip("+~"))


class ParentRun:
    def __init__(self, client, run_id: str) -> None:
        self.client = client
        self.run_id = run_id

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
        known = study.user_attrs.get(PARENT_ATTR)
        if known:
            client.update_run(known, status="RUNNING")
            return cls(client, known)
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
        return cls(client, run.info.run_id)

    def record(self, study: optuna.Study, number: int, value: float | None) -> None:
        """Log one finished trial, and the study's best so far."""
        if value is not None:
            self.client.log_metric(self.run_id, "trial_value", value, step=number)
        self._log_best(study, step=number)

    def _log_best(self, study: optuna.Study, step: int) -> None:
        complete = study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.COMPLETE,))
        if not complete:
            return
        best = study.best_trial
        self.client.log_metric(self.run_id, "best_value", float(best.value), step=step)
        self.client.set_tag(self.run_id, "best.trial", str(best.number))
        for name, param in best.params.items():
            self.client.set_tag(self.run_id, f"best.param.{mlflow_key(name)}", str(param))

    def finish(self, study: optuna.Study, status: str, best_groups: list) -> None:
        """Counts, the best per (task, model, merge) as an artifact, and the final status."""
        states = [t.state.name for t in study.get_trials(deepcopy=False)]
        # parallel workers tell trials out of order: the best over all of them goes last
        self._log_best(study, step=len(states))
        for state in ("COMPLETE", "FAIL", "RUNNING"):
            self.client.log_metric(self.run_id, f"trials_{state.lower()}", states.count(state))
        table = [{"group": b.group, "trial": b.number, "value": b.value, "params": b.params} for b in best_groups]
        self.client.log_text(self.run_id, json.dumps(table, indent=2, default=str), "best_per_group.json")
        self.client.set_terminated(self.run_id, status=status)
