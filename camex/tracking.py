"""MLflow wiring: one MLflow run per training run, resumable, with everything needed to rebuild
tables from it (params, per-step metrics, eval metrics, final metrics, artifacts, tags).

Default store: a SQLite file under the outputs directory (MLflow's file store is deprecated);
`tracking.uri=http://127.0.0.1:5000` points at a server for parallel or cluster work.
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from importlib import metadata
from pathlib import Path
from typing import Any

from camex.checkpoints import atomic_write_text
from camex.config import ConfigError
from camex.distributed import is_main

RUN_ID_FILE = "mlflow_run_id.txt"
PACKAGES = ("camex", "torch", "transformers", "datasets", "timm", "hydra-core", "mlflow", "optuna", "scikit-learn")


def default_uri(output_root: str | Path) -> str:
    return f"sqlite:///{Path(output_root).resolve() / 'mlflow.db'}"


REACH_TIMEOUT_S = 5.0  # a tracking server that does not answer /health in this long counts as unreachable


class TrackingUnreachable(ConfigError):
    """The tracking server named by `tracking.uri` does not answer."""


def server_problem(uri: str, timeout: float = REACH_TIMEOUT_S) -> str | None:
    """None when an http(s) tracking server answers, else why not; other stores are not probed.

    Any HTTP answer (even an error page) means a server is there. The probe runs in a thread so a
    slow DNS lookup is bounded too; MLflow's own client would retry for minutes before failing.
    """
    if not uri.startswith(("http://", "https://")):
        return None
    import threading
    import urllib.error
    import urllib.request

    outcome: list[str | None] = []

    def probe() -> None:
        try:
            urllib.request.urlopen(uri.rstrip("/") + "/health", timeout=timeout).close()
            outcome.append(None)
        except urllib.error.HTTPError:
            outcome.append(None)
        except (OSError, ValueError) as e:  # refused, timed out, unknown host, malformed URL
            reason = getattr(e, "reason", None) or e
            outcome.append(f"{type(reason).__name__}: {reason}" if str(reason) else type(reason).__name__)

    worker = threading.Thread(target=probe, daemon=True)
    worker.start()
    worker.join(timeout + 1.0)
    return outcome[0] if outcome else f"no answer within {timeout:.0f} s"


def resolve_store(tracking_cfg: Mapping[str, Any], *, output_root: str | Path) -> dict[str, Any]:
    """The tracking config to use: unchanged when its server answers (or tracking is off), the
    local SQLite store when it does not and `tracking.fallback=sqlite`, else `TrackingUnreachable`."""
    cfg = dict(tracking_cfg)
    uri = cfg.get("uri")
    if not cfg.get("enabled", True) or not uri or not is_main():
        return cfg
    problem = server_problem(str(uri))
    if problem is None:
        return cfg
    if cfg.get("fallback") == "sqlite":
        local = default_uri(output_root)
        print(f"warning: tracking server {uri} is unreachable ({problem}); logging to {local} instead "
              "(tracking.fallback=sqlite)", file=sys.stderr)  # fmt: skip
        return {**cfg, "uri": local, "artifact_location": None}
    raise TrackingUnreachable(
        f"tracking.uri={uri} is unreachable ({problem}); start the server (mlflow server --host 127.0.0.1 "
        "--port 5000 ...), or pass tracking.fallback=sqlite to log to the local SQLite store instead"
    )


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
    """HEAD of the checkout; without one (the container) the commit the image was built from."""
    fallback = os.environ.get("CAMEX_GIT_COMMIT") or "unknown"
    root = Path(__file__).resolve().parents[1]
    try:
        out = subprocess.run(["git", "-C", str(root), "rev-parse", "HEAD"], capture_output=True, text=True, timeout=5)
    except (OSError, subprocess.TimeoutExpired):
        return fallback
    return out.stdout.strip() if out.returncode == 0 else fallback


def package_versions(names: tuple[str, ...] = PACKAGES) -> dict[str, str]:
    versions = {"python": sys.version.split()[0]}
    for name in names:
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            versions[name] = "not installed"
    return versions


def ensure_experiment(api, uri: str, experiment: str, artifact_location: str | None = None) -> str:
    """The id of `experiment`, created if missing; `api` is the `mlflow` module or an `MlflowClient`.

    With a SQLite store, artifacts go next to the database unless a location is given.
    """
    found = api.get_experiment_by_name(experiment)
    if found is not None:
        return found.experiment_id
    if artifact_location is None and uri.startswith("sqlite:///"):
        artifact_location = (Path(uri.removeprefix("sqlite:///")).parent / "mlartifacts").resolve().as_uri()
    try:
        return api.create_experiment(experiment, artifact_location=artifact_location)
    except Exception:  # another process created it between the lookup and here (parallel sweep workers)
        found = api.get_experiment_by_name(experiment)
        if found is None:
            raise
        return found.experiment_id


def sweep_tags(tracking_cfg: Mapping[str, Any]) -> dict[str, str]:
    """Tags a sweep trial passes down: `tracking.tags` (flattened) and `tracking.parent_run_id`,
    which nests this run under the sweep's parent run in the MLflow UI."""
    found = flatten(tracking_cfg.get("tags") or {})
    if tracking_cfg.get("parent_run_id"):
        found["mlflow.parentRunId"] = str(tracking_cfg["parent_run_id"])
    return found


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
    if not tracking_cfg.get("enabled", True) or not is_main():  # under torchrun, rank 0 logs for all ranks
        yield Tracker()
        return
    import mlflow

    uri = tracking_cfg.get("uri") or default_uri(output_root)
    mlflow.set_tracking_uri(uri)
    ensure_experiment(mlflow, uri, experiment, tracking_cfg.get("artifact_location"))
    mlflow.set_experiment(experiment)

    id_file = run_dir / RUN_ID_FILE
    previous = id_file.read_text().strip() if id_file.exists() else None
    run = mlflow.start_run(run_id=previous) if previous else mlflow.start_run(run_name=run_name)
    id_file.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_text(id_file, run.info.run_id)
    tracker = Tracker(mlflow)
    tracker.run_id = run.info.run_id
    status = "FAILED"
    try:
        if not previous:
            flat = flatten(params)
            mlflow.log_params(flat)
            commit = git_commit()
            mlflow.set_tags({**tags, **sweep_tags(tracking_cfg), "git_commit": commit})
            tracker.log_dict(package_versions(), "packages.json")
            tracker.log_text(commit + "\n", "git_commit.txt")
        yield tracker
        status = "FINISHED"
    except KeyboardInterrupt:
        status = "KILLED"
        raise
    finally:
        mlflow.end_run(status=status)
