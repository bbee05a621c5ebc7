"""What one finished trial produced: its objective, or why it counts as failed.

The objective is what `run.py` returns (the task's primary metric of the selected epoch); the
run directory's `metrics.json` says which metric that is and in which direction it improves, so a
study that maximises never silently takes a perplexity.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any


@dataclass
class Outcome:
    value: float | None  # None: the trial failed
    reason: str | None = None  # why it failed, one line
    attrs: dict[str, Any] = field(default_factory=dict)  # primary metric name, MLflow run id

    @property
    def failed(self) -> bool:
        return self.value is None


def read_metrics(run_dir: Path) -> dict[str, Any] | None:
    path = Path(run_dir) / "metrics.json"
    return json.loads(path.read_text()) if path.exists() else None


def read_outcome(returned: Any, error: BaseException | None, run_dir: Path, maximize: bool) -> Outcome:
    """`returned` is the job's return value, `error` what it raised (None if it returned)."""
    if error is not None:
        first = (str(error).strip().splitlines() or [""])[0]
        return Outcome(None, f"{type(error).__name__}: {first}"[:500])
    payload = read_metrics(run_dir)
    attrs: dict[str, Any] = {}
    if payload is not None:
        attrs = {"primary": payload.get("primary"), "mlflow_run_id": payload.get("run_id")}
        if returned is None:  # a launcher that drops return values: the run's own record
            returned = payload.get("metrics", {}).get(payload.get("primary"))
        if payload.get("greater_is_better") is not None and bool(payload["greater_is_better"]) != maximize:
            wanted = "maximize" if maximize else "minimize"
            return Outcome(None, f"{payload.get('primary')} does not {wanted} like the study", attrs)
    if isinstance(returned, bool) or not isinstance(returned, (int, float)):
        return Outcome(None, f"the run returned {returned!r}, not a number", attrs)
    if not math.isfinite(returned):
        return Outcome(None, f"the objective is {returned}", attrs)
    return Outcome(float(returned), None, attrs)
