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
from camex.redact import redact_flat, redact_uri

RUN_ID_FILE = "mlflow_run_id.txt"
REPLACED_TAG = "camex.replaced_by"  # on a run that overwrite=true replaced: the id of the run that replaced it
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
        print(f"warning: tracking server {redact_uri(str(uri))} is unreachable ({problem}); logging to {local} instead "
              "(tracking.fallback=sqlite)", file=sys.stderr)  # fmt: skip
        return {**cfg, "uri": local, "artifact_location": None}
    raise TrackingUnreachable(
        f"tracking.uri={redact_uri(str(uri))} is unreachable ({problem}); start the server (mlflow server "
        "--host 127.0.0.1 --port 5000 ...), or pass tracking.fallback=sqlite to log to the local SQLite store instead"
    )


class StoreError(RuntimeError):
    """The tracking store cannot be used: a damaged, truncated or locked SQLite file, a store
    MLflow cannot read. Found by `probe_store` before any data or model is loaded."""


def probe_store(tracking_cfg: Mapping[str, Any], *, output_root: str | Path) -> None:
    """Fail in seconds, before data or model load, when the store would fail the run later: the
    SQLite file must pass `PRAGMA quick_check` and give its write lock within
    `tracking.store_wait_s`; MLflow must read it; a `tracking.parent_run_id` must exist in it."""
    if not tracking_cfg.get("enabled", True) or not is_main():
        return
    uri = str(tracking_cfg.get("uri") or default_uri(output_root))
    parent = tracking_cfg.get("parent_run_id")
    if uri.startswith("sqlite:///"):
        path = Path(uri.removeprefix("sqlite:///"))
        if not path.exists():  # created by the run itself; nothing in it yet, so no parent run either
            if parent:
                raise ConfigError(f"tracking.parent_run_id={parent} does not exist: {path} holds no runs yet")
            return
        _probe_sqlite(path, float(tracking_cfg.get("store_wait_s") or 30))
    from mlflow.exceptions import MlflowException
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=uri)
    try:
        client.search_experiments(max_results=1)
    except Exception as e:  # an MLflow schema it cannot read, a server error
        raise StoreError(f"the tracking store {redact_uri(uri)} cannot be read ({_root_line(e)})") from e
    if parent:
        try:
            client.get_run(str(parent))
        except MlflowException as e:
            raise ConfigError(
                f"tracking.parent_run_id={parent} does not exist in {redact_uri(uri)}; allowed: null or the id "
                "of a run in that store"
            ) from e


def _root_line(exc: BaseException) -> str:
    while exc.__cause__ is not None or exc.__context__ is not None:
        exc = exc.__cause__ or exc.__context__
    text = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {text[0]}" if text else type(exc).__name__


def _probe_sqlite(path: Path, wait_s: float) -> None:
    import sqlite3

    hint = "restore it from a backup, or move it aside to start a new store"
    try:
        with sqlite3.connect(str(path), timeout=wait_s) as db:
            verdict = db.execute("PRAGMA quick_check").fetchone()
            if not verdict or verdict[0] != "ok":
                raise StoreError(f"the tracking store {path} is damaged (quick_check: {verdict}); {hint}")
            db.execute("BEGIN IMMEDIATE")  # the write lock every MLflow write needs; nothing is written
            db.execute("ROLLBACK")
        db.close()
    except sqlite3.OperationalError as e:
        if "locked" in str(e) or "busy" in str(e):
            raise StoreError(
                f"the tracking store {path} is locked by another process ({e}) for more than "
                f"{wait_s:g} s (tracking.store_wait_s); end that process or raise tracking.store_wait_s"
            ) from None
        raise StoreError(f"the tracking store {path} cannot be opened ({e}); {hint}") from None
    except sqlite3.DatabaseError as e:  # "file is not a database", "database disk image is malformed"
        raise StoreError(f"the tracking store {path} is damaged ({e}); {hint}") from None


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


class StoreLost(RuntimeError):
    """The tracking store stopped answering during training (a server died, a disk filled up)."""

    def __init__(self, step: int, cause: BaseException, checkpoint: str | None = None) -> None:
        self.step, self.checkpoint = step, checkpoint
        where = f"checkpoint saved in {checkpoint}; continue with resume=true" if checkpoint else "no checkpoint yet"
        super().__init__(f"the tracking store failed at step {step} ({type(cause).__name__}: "
                         f"{str(cause).strip().splitlines()[0] if str(cause).strip() else ''}); {where}")  # fmt: skip
        self.__cause__ = cause


def http_limits(wait_s: float) -> dict[str, str]:
    """MLflow client settings that bound how long one call waits for a tracking server that is gone:
    2 retries, 1 s backoff factor (waits 0 and 2 s) and a per-attempt timeout, so that
    3 x timeout + 2 s <= wait_s. MLflow's defaults (7 retries, 120 s timeout) stall for minutes."""
    retries = 2
    timeout = max(1, int((wait_s - 2**retries // 2) // (retries + 1)))
    return {
        "MLFLOW_HTTP_REQUEST_MAX_RETRIES": str(retries),
        "MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR": "1",
        "MLFLOW_HTTP_REQUEST_BACKOFF_JITTER": "0",
        "MLFLOW_HTTP_REQUEST_TIMEOUT": str(timeout),
    }


class Tracker:
    """Thin facade over the active MLflow run; a disabled tracker accepts and drops everything.

    A failing store during training does not raise from inside the Trainer: the first failure is
    kept in `lost` (nothing more is sent), and the training loop checkpoints and stops on it.
    """

    def __init__(self, mlflow_module=None) -> None:
        self.mlflow = mlflow_module
        self.run_id: str | None = None
        self.lost: BaseException | None = None

    @property
    def enabled(self) -> bool:
        return self.mlflow is not None and self.lost is None

    def _call(self, fn, *args, **kwargs) -> None:
        try:
            fn(*args, **kwargs)
        except Exception as e:  # a server gone, a store locked or full: MLflow already retried (bounded)
            self.lost = e

    def log_metrics(self, metrics: Mapping[str, float], step: int) -> None:
        if not self.enabled:
            return
        clean = {k: float(v) for k, v in metrics.items() if isinstance(v, (int, float)) and math.isfinite(v)}
        if clean:
            self._call(self.mlflow.log_metrics, clean, step=step)

    def log_dict(self, payload: Mapping[str, Any], name: str) -> None:
        if self.enabled:
            self._call(self.mlflow.log_dict, dict(payload), name)

    def log_text(self, text: str, name: str) -> None:
        if self.enabled:
            self._call(self.mlflow.log_text, text, name)

    def check(self, step: int) -> None:
        """Raise `StoreLost` if the store failed (outside the training loop: nothing to save now)."""
        if self.lost is not None:
            raise StoreLost(step, self.lost)


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
    replaces: str | None = None,
) -> Iterator[Tracker]:
    """Start (or, when the run directory names one, resume) the MLflow run for this training run.

    The run ends FINISHED on success, KILLED on Ctrl-C and FAILED on any other error. `replaces`:
    the MLflow run that `overwrite=true` replaces; it is tagged `camex.replaced_by`, and reports
    leave it out. Tags are redacted like params (`camex/redact.py`).
    """
    if not tracking_cfg.get("enabled", True) or not is_main():  # under torchrun, rank 0 logs for all ranks
        yield Tracker()
        return
    import mlflow

    for key, value in http_limits(float(tracking_cfg.get("store_wait_s") or 30)).items():
        os.environ.setdefault(key, value)  # a user's own MLflow settings win
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
            mlflow.set_tags(redact_flat({**tags, **sweep_tags(tracking_cfg), "git_commit": commit}))
            tracker.log_dict(package_versions(), "packages.json")
            tracker.log_text(commit + "\n", "git_commit.txt")
            if replaces and replaces != run.info.run_id:
                mlflow.MlflowClient().set_tag(replaces, REPLACED_TAG, run.info.run_id)
        yield tracker
        status = "FINISHED"
    except KeyboardInterrupt:
        status = "KILLED"
        raise
    finally:
        try:
            mlflow.end_run(status=status)  # bounded by http_limits when a server is gone
        except Exception:  # the store failed: the error that brought us here (if any) says more
            if status == "FINISHED" and tracker.lost is None:
                raise
