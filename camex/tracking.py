"""MLflow wiring: one MLflow run per training run, resumable, with everything needed to rebuild
tables from it (params, per-step metrics, eval metrics, final metrics, artifacts, tags).

Default store: a SQLite file under the outputs directory (MLflow's file store is deprecated);
`tracking.uri=http://127.0.0.1:5000` points at a server for parallel or cluster work.
"""

from __future__ import annotations

import json
import math
import subprocess
import sys
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from importlib import metadata
from pathlib import Path
from typing import Any

RUN_ID_FILE = "mlflow_run_id.txt"
PACKAGES = ("camex", "torch", "transformers", "datasets", "timm", "hydra-core", "mlflow", "optuna", "scikit-learn")


def default_uri(output_root: str | Path) -> str:
    return f"sqlite:///{Path(output_root).resolve() / 'mlflow.db'}"


def flatten(tree: Mapping[str, Any], prefix: str = "") -> dict[str, str]:
    """`{"a": {"b": 1}}` -> `{"a.b": "1"}`; lists are kept as their JSON text."""
    flat: dict[str, str] = {}
    for key, value in tree.items():
        name = f"{prefix}{key}"
        if isinstance(value, Mapping):
            flat.update(flatten(value, f"{name}."))
        else:
            flat[name] = json.dumps(value) if isinstance(value, (list, tuple)) else str(value)
    return flat


def git_commit() -> str:
    root = Path(__file__).resolve().parents[1]
    try:
        out = subprocess.run(["git", "-C", str(root), "rev-parse", "HEAD"], capture_output=True, text=True, timeout=5)
    except (OSError, subprocess.TimeoutExpired):
        return "unknown"
    return out.stdout.strip() if out.returncode == 0 else "unknown"


def package_versions() -> dict[str, str]:
    versions = {"python": sys.version.split()[0]}
    for name in PACKAGES:
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            versions[name] = "not installed"
    return versions


class Tracker:
    """Thin facade over the active MLflow run; a disabled tracker accepts and drops everything."""

    def __init__(self, mlflow_module=None) -> None:
        self.mlflow = mlflow_module
        self.run_id: str | None = None

    @property
    def enabled(self) -> bool:
        return self.mlflow is not None

    def log_metrics(self, metrics: Mapping[str, float], step: int) -> None:
        if not self.enabled:
            return
        clean = {k: float(v) for k, v in metrics.items() if isinstance(v, (int, float)) and math.isfinite(v)}
        if clean:
            self.mlflow.log_metrics(clean, step=step)

    def log_dict(self, payload: Mapping[str, Any], name: str) -> None:
        if self.enabled:
            self.mlflow.log_dict(dict(payload), name)

    def log_text(self, text: str, name: str) -> None:
        if self.enabled:
            self.mlflow.log_text(text, name)


@contextmanager
def start_run(
    tracking_cfg: Mapping[str, Any],
    *,
    output_root: str | Path,
    run_dir: Path,
    experiment: str,
    run_name: str,
    params: Mapping[str, Any],
    tags: Mapping[str, str],
) -> Iterator[Tracker]:
    """Start (or, when the run directory names one, resume) the MLflow run for this training run.

    The run ends FINISHED on success, KILLED on Ctrl-C and FAILED on any other error.
    """
    if not tracking_cfg.get("enabled", True):
        yield Tracker()
        return
    import mlflow

    uri = tracking_cfg.get("uri") or default_uri(output_root)
    mlflow.set_tracking_uri(uri)
    if mlflow.get_experiment_by_name(experiment) is None:
        location = tracking_cfg.get("artifact_location")
        if location is None and uri.startswith("sqlite:///"):
            location = (Path(uri.removeprefix("sqlite:///")).parent / "mlartifacts").resolve().as_uri()
        mlflow.create_experiment(experiment, artifact_location=location)
    mlflow.set_experiment(experiment)

    id_file = run_dir / RUN_ID_FILE
    previous = id_file.read_text().strip() if id_file.exists() else None
    run = mlflow.start_run(run_id=previous) if previous else mlflow.start_run(run_name=run_name)
    id_file.parent.mkdir(parents=True, exist_ok=True)
    id_file.write_text(run.info.run_id)
    tracker = Tracker(mlflow)
    tracker.run_id = run.info.run_id
    status = "FAILED"
    try:
        if not previous:
            flat = flatten(params)
            mlflow.log_params(flat)
            commit = git_commit()
            mlflow.set_tags({**tags, "git_commit": commit})
            tracker.log_dict(package_versions(), "packages.json")
            tracker.log_text(commit + "\n", "git_commit.txt")
        yield tracker
        status = "FINISHED"
    except KeyboardInterrupt:
        status = "KILLED"
        raise
    finally:
        mlflow.end_run(status=status)
