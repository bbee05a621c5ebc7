"""Group runs and summarise one metric over seeds: mean, sample standard deviation and n."""

from __future__ import annotations

import math
import statistics
from collections import defaultdict
from collections.abc import Callable, Hashable, Iterable
from dataclasses import dataclass

from camex.report.collect import Run

# Params that differ between the seeds of one setting without changing the setting itself.
_SEED_LIKE = ("seed", "experiment_name", "overwrite", "resume")
_SEED_LIKE_PREFIXES = ("paths.", "tracking.", "hydra.", "task.local.")


@dataclass(frozen=True)
class Stat:
    """One metric over the runs of one group (seeds)."""

    values: tuple[float, ...]
    seeds: tuple[str, ...]
    run_ids: tuple[str, ...]

    @property
    def n(self) -> int:
        return len(self.values)

    @property
    def mean(self) -> float:
        return math.fsum(self.values) / self.n

    @property
    def std(self) -> float | None:
        """Sample standard deviation (n − 1); None for a single run."""
        return statistics.stdev(self.values) if self.n > 1 else None

    def scaled(self, factor: float) -> Stat:
        return Stat(tuple(v * factor for v in self.values), self.seeds, self.run_ids)


def group_runs(runs: Iterable[Run], key: Callable[[Run], Hashable]) -> dict[Hashable, list[Run]]:
    groups: dict[Hashable, list[Run]] = defaultdict(list)
    for run in runs:
        groups[key(run)].append(run)
    return dict(groups)


def summarise(runs: Iterable[Run], metric: str | None) -> Stat | None:
    """The named final metric (None: each run's primary metric) over runs that logged it."""
    values, seeds, ids = [], [], []
    for run in runs:
        key = run.metric_key(metric)
        value = run.metrics.get(key) if key else None
        if value is not None and math.isfinite(value):
            values.append(float(value))
            seeds.append(run.seed)
            ids.append(run.run_id)
    return Stat(tuple(values), tuple(seeds), tuple(ids)) if values else None


def summarise_key(runs: Iterable[Run], key: str, transform: Callable[[float], float] | None = None) -> Stat | None:
    """Any logged metric key (not only `final_*`), optionally transformed per run."""
    values, seeds, ids = [], [], []
    for run in runs:
        value = run.metrics.get(key)
        if value is not None and math.isfinite(value):
            values.append(float(transform(value) if transform else value))
            seeds.append(run.seed)
            ids.append(run.run_id)
    return Stat(tuple(values), tuple(seeds), tuple(ids)) if values else None


def differing_settings(runs: list[Run]) -> dict[str, list[str]]:
    """Params that take more than one value among runs meant to be seeds of one setting."""
    keys = set().union(*(r.params for r in runs)) if runs else set()
    out: dict[str, list[str]] = {}
    for key in sorted(keys):
        if key in _SEED_LIKE or key.startswith(_SEED_LIKE_PREFIXES):
            continue
        values = sorted({r.params.get(key, "<unset>") for r in runs})
        if len(values) > 1:
            out[key] = values
    return out


def repeated_seeds(runs: list[Run]) -> list[str]:
    counts: dict[str, int] = defaultdict(int)
    for run in runs:
        counts[run.seed] += 1
    return sorted(seed for seed, count in counts.items() if count > 1)
