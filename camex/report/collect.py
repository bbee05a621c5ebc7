"""Read finished training runs from any MLflow tracking store (a SQLite file, a server URL).

Only MLflow is touched: no torch, no training code, so a report builds on a laptop against a
remote tracking server. A run is kept when it finished and carries the tags `camex/train.py`
sets (task, model, merge, seed); everything else it logged comes along as params and metrics.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

REQUIRED_TAGS = ("task", "model", "merge", "seed")
_TAG_KEY = re.compile(r"^[A-Za-z0-9_.\-]+$")


class CollectError(ValueError):
    """Bad tracking URI, experiment name or tag filter (the message says which and what is allowed)."""


@dataclass(frozen=True)
class Run:
    """One finished training run as MLflow stored it."""

    run_id: str
    experiment: str  # the MLflow experiment name
    tags: dict[str, str]
    params: dict[str, str]
    metrics: dict[str, float]  # latest value of every metric key

    @property
    def task(self) -> str:
        return self.tags["task"]

    @property
    def model(self) -> str:
        return self.tags["model"]

    @property
    def merge(self) -> str:
        return self.tags["merge"]

    @property
    def seed(self) -> str:
        return self.tags["seed"]

    def primary_key(self) -> str | None:
        """`final_<metric>` of the task's primary metric, as camex/train.py names it.

        Tasks with several named eval splits (MNLI) prefix the split: `final_matched_accuracy`.
        """
        metric = self.params.get("task.primary_metric")
        if not metric:
            return None
        split = self.params.get("task.primary_eval")
        if split and split not in ("None", "null"):
            return f"final_{split}_{metric}"
        if f"final_{metric}" in self.metrics:
            return f"final_{metric}"
        prefixed = sorted(k for k in self.metrics if k.startswith("final_") and k.endswith(f"_{metric}"))
        return prefixed[0] if len(prefixed) == 1 else f"final_{metric}"

    def metric_key(self, metric: str | None) -> str | None:
        """The final metric key of a column: its named metric, or the primary one when None."""
        return self.primary_key() if metric is None else f"final_{metric}"

    def greater_is_better(self) -> bool | None:
        value = self.params.get("task.greater_is_better")
        return None if value is None else value == "True"


def normalise_uri(uri: str) -> str:
    """A tracking URI for MLflow; a bare path to a `.db` file becomes `sqlite:///<abs path>`.

    A SQLite store must already exist: MLflow would silently create an empty one.
    """
    if "://" not in uri:
        path = Path(uri)
        if path.suffix != ".db":
            raise CollectError(f"--tracking-uri {uri!r}: give a URI (sqlite:///path/mlflow.db, http://host:port) "
                               "or a path to an MLflow .db file")  # fmt: skip
        uri = f"sqlite:///{path.resolve()}"
    if uri.startswith("sqlite:///"):
        db = Path(uri.removeprefix("sqlite:///"))
        if not db.is_file():
            raise CollectError(f"--tracking-uri {uri!r}: no such SQLite file {db}")
    return uri


def parse_tag_filters(items: Iterable[str]) -> dict[str, str]:
    """`["merge=camex", "seed=1"]` -> `{"merge": "camex", "seed": "1"}`."""
    tags: dict[str, str] = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key or not _TAG_KEY.match(key):
            raise CollectError(f"--tag {item!r}: expected KEY=VALUE with KEY of letters, digits, '_', '.', '-'")
        tags[key] = value
    return tags


REPLACED_TAG = "camex.replaced_by"  # = camex.tracking.REPLACED_TAG (not imported: reports load no torch)


def _filter_string(tags: Mapping[str, str]) -> str:
    clauses = ["attributes.status = 'FINISHED'"]
    for key, value in tags.items():
        escaped = value.replace("'", "\\'")
        clauses.append(f"tags.`{key}` = '{escaped}'")
    return " and ".join(clauses)


def client(uri: str):
    from mlflow.tracking import MlflowClient

    return MlflowClient(tracking_uri=uri)


def collect_runs(uri: str, experiments: Iterable[str] = (), tags: Mapping[str, str] | None = None) -> list[Run]:
    """Every finished camex run in the named experiments (all experiments when none is named)
    whose tags match `tags`, ordered by task, model, merge, seed."""
    mlflow_client = client(uri)
    known = {e.name: e.experiment_id for e in mlflow_client.search_experiments()}
    names = list(experiments) or sorted(known)
    unknown = [n for n in names if n not in known]
    if unknown:
        raise CollectError(f"--experiment {unknown[0]!r} not found at {uri}; available: {', '.join(sorted(known))}")
    ids = {known[n]: n for n in names}
    runs: list[Run] = []
    token = None
    while ids:
        page = mlflow_client.search_runs(
            list(ids), filter_string=_filter_string(tags or {}), max_results=1000, page_token=token
        )
        for r in page:
            if REPLACED_TAG in r.data.tags:  # overwritten by a later run of the same seed (issue 19)
                continue
            if all(t in r.data.tags for t in REQUIRED_TAGS):
                runs.append(
                    Run(
                        run_id=r.info.run_id,
                        experiment=ids[r.info.experiment_id],
                        tags=dict(r.data.tags),
                        params=dict(r.data.params),
                        metrics=dict(r.data.metrics),
                    )
                )
        token = page.token
        if not token:
            break
    return sorted(runs, key=lambda r: (r.task, r.model, r.merge, _seed_order(r.seed), r.run_id))


def _seed_order(seed: str) -> tuple[int, Any]:
    return (0, int(seed)) if seed.lstrip("-").isdigit() else (1, seed)


def metric_history(mlflow_client, run_id: str, key: str) -> list[tuple[int, float]]:
    """(step, value) of one metric, one value per step: the first one logged at that step.

    camex/train.py logs the final evaluation of the selected epoch at the last step again; the
    curve keeps the evaluation made during training.
    """
    seen: dict[int, tuple[int, float]] = {}
    for m in mlflow_client.get_metric_history(run_id, key):
        if m.step not in seen or m.timestamp < seen[m.step][0]:
            seen[m.step] = (m.timestamp, m.value)
    return [(step, seen[step][1]) for step in sorted(seen)]
