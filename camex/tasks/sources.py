"""Where a task's data come from: local files, a package that ships data, or the HF Hub.

One entry point per stage: `check` (config only, no data, no network beyond the offline switch)
and `load_splits` (raw rows as datasets). Each source validates its own keys (`files`, `hub`,
`packaged`); the family says only what it needs (`DataNeed`: columns, file types, one eval split
or several). Subsampling is deterministic: a fixed-seed permutation, kept in data order.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import numpy as np

from camex.tasks import files, hub, packaged
from camex.tasks.base import DataNeed
from camex.tasks.columns import Spec
from camex.tasks.errors import TaskError, bad_value


def data_seed(cfg: dict, seed: int) -> int:
    return cfg["data_seed"] if cfg["data_seed"] is not None else seed


def subsample(ds: Any, n: int | None, seed: int) -> Any:
    """At most `n` rows, chosen by a seeded permutation and kept in their original order."""
    if n is None or n >= len(ds):
        return ds
    idx = np.sort(np.random.default_rng(seed).permutation(len(ds))[:n])
    return ds.select(idx.tolist())


def check(cfg: dict, need: DataNeed) -> None:
    """Local paths exist, exactly one remote source backs whatever local files do not cover, and
    that source's own keys are valid; then the named eval split carrying the primary metric."""
    files.check_paths(cfg, need)
    files.check_eval_layout(cfg, need)
    local = cfg["local"]
    need_remote = local.get("train") is None or local.get("eval") is None
    hub_cfg, pkg = cfg["hub"], cfg["packaged"]
    if hub_cfg is not None and pkg is not None:
        raise TaskError("task.hub and task.packaged are both set; a task reads one source (set the other to null)")
    if need_remote and hub_cfg is None and pkg is None:
        raise TaskError(
            f"task {cfg['name']} has no data source: set task.hub or task.packaged, or {files.local_hint(need)}"
        )
    if pkg is not None:
        packaged.validate(cfg, need)
    if hub_cfg is not None:
        hub.check(cfg, need, need_remote=need_remote)
    _check_primary_eval(cfg)


def eval_names(cfg: dict) -> list[str] | None:
    """Names of the eval splits, or None for a single one (decided without loading anything)."""
    ev = cfg["local"].get("eval")
    if isinstance(ev, Mapping):
        return list(ev)
    if ev is None and cfg["hub"] is not None and isinstance(cfg["splits"]["eval"], Mapping):
        return list(cfg["splits"]["eval"])
    return None


def _check_primary_eval(cfg: dict) -> None:
    names, primary = eval_names(cfg), cfg["primary_eval"]
    if names is None:  # one eval split (e.g. MNLI from one local file): nothing to choose
        cfg["primary_eval"] = None
        return
    if primary not in names:
        raise bad_value("primary_eval", primary, f"name the eval split that carries primary_metric: {', '.join(names)}")


def load_splits(cfg: dict, spec: Spec, need: DataNeed, seed: int) -> tuple[Any, Any]:
    """(train, eval) datasets with the spec's columns; eval is a dict for named eval splits.

    Local files are read (and checked) first, so a malformed file stops the run before any download.
    """
    local, ev = cfg["local"], cfg["local"]["eval"]
    train = files.read_local(local["train"], spec, cfg, "local.train") if local["train"] is not None else None
    if isinstance(ev, Mapping):
        evals: Any = {k: files.read_local(p, spec, cfg, f"local.eval.{k}") for k, p in ev.items()}
    else:
        evals = files.read_local(ev, spec, cfg, "local.eval") if ev is not None else None
    if train is not None and evals is not None:
        return train, evals

    if cfg["packaged"] is not None:
        packed_train, packed_eval = packaged.load(cfg, spec, data_seed(cfg, seed))
        return (packed_train if train is None else train), (packed_eval if evals is None else evals)
    if train is None:
        train = hub.read_hub(cfg, need, cfg["splits"]["train"], "splits.train")
    if evals is None:
        sev = cfg["splits"]["eval"]
        if isinstance(sev, Mapping):
            evals = {k: hub.read_hub(cfg, need, s, f"splits.eval.{k}") for k, s in sev.items()}
        else:
            evals = hub.read_hub(cfg, need, sev, "splits.eval")
    return train, evals
