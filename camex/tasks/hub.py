"""Hugging Face Hub data sets: config checks, offline / reachability checks, and loading one split.

Hub data are trusted row by row; their columns are checked against what the family needs.
"""

from __future__ import annotations

import os
import socket
from collections.abc import Mapping
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

from camex.tasks.base import DataNeed
from camex.tasks.errors import TaskError, bad_value
from camex.tasks.files import local_hint


def is_offline() -> bool:
    """Hugging Face's own switches, read at call time (datasets reads them once, at import)."""
    truthy = {"1", "ON", "YES", "TRUE"}
    return any(os.environ.get(k, "").upper() in truthy for k in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE"))


def hub_cached(path: str) -> bool:
    """Whether a hub dataset has left anything in the local caches (then offline loading may work)."""
    from datasets import config as dconfig
    from huggingface_hub import constants as hconstants

    candidates = (
        Path(dconfig.HF_DATASETS_CACHE) / path.replace("/", "___"),
        Path(hconstants.HF_HUB_CACHE) / ("datasets--" + path.replace("/", "--")),
    )
    return any(c.exists() for c in candidates)


def hub_unreachable(cfg: dict, need: DataNeed, why: str) -> TaskError:
    hub = cfg["hub"]
    label = hub["path"] + (f" ({hub['name']})" if hub.get("name") else "")
    return TaskError(
        f"task.hub {label}: the Hugging Face Hub is unreachable ({why}) and the data set is not cached; "
        f"pass local files instead: {local_hint(need)}"
    )


def check(cfg: dict, need: DataNeed, *, need_remote: bool) -> None:
    """`task.hub` and `task.splits` are well formed; offline, the data set must be cached."""
    hub = cfg["hub"]
    if not isinstance(hub, Mapping) or not isinstance(hub.get("path"), str) or not set(hub) <= {"path", "name"}:
        raise bad_value("hub", hub, "expected {path: owner/dataset, name: config|null}")
    splits = cfg["splits"]
    if not isinstance(splits, Mapping) or not isinstance(splits.get("train"), str) or "eval" not in splits:
        raise bad_value("splits", splits, "expected {train: split, eval: split | {name: split}}")
    sev = splits["eval"]
    named = isinstance(sev, Mapping) and sev and all(isinstance(v, str) for v in sev.values())
    if not (isinstance(sev, str) or named):
        raise bad_value("splits.eval", sev, "expected a split name or a non-empty {name: split} mapping")
    if need.single_eval and not isinstance(sev, str):
        raise bad_value("splits.eval", sev, f"family {need.family} scores one eval split; give one split name")
    if need_remote and is_offline() and not hub_cached(hub["path"]):
        raise hub_unreachable(cfg, need, "offline mode: HF_HUB_OFFLINE or HF_DATASETS_OFFLINE is set")


def _hub_host_reachable(timeout: float = 3.0) -> bool:
    """A cheap TCP probe so an offline machine fails in seconds, not after datasets' retry schedule.

    Behind a proxy the direct probe means nothing, so then we let datasets try.
    """
    if any(os.environ.get(k) for k in ("HTTPS_PROXY", "https_proxy", "ALL_PROXY", "all_proxy")):
        return True
    from huggingface_hub import constants

    url = urlparse(constants.ENDPOINT)
    try:
        with socket.create_connection((url.hostname, url.port or 443), timeout=timeout):
            return True
    except OSError:
        return False


def read_hub(cfg: dict, need: DataNeed, split: str, key: str) -> Any:
    hub = cfg["hub"]
    path, name = hub["path"], hub.get("name")
    if is_offline() and not hub_cached(path):
        raise hub_unreachable(cfg, need, "offline mode: HF_HUB_OFFLINE or HF_DATASETS_OFFLINE is set")
    if not is_offline() and not hub_cached(path) and not _hub_host_reachable():
        raise hub_unreachable(cfg, need, "no connection")
    import datasets

    try:
        ds = datasets.load_dataset(path, name, split=split)
    except (ConnectionError, TimeoutError) as e:
        raise hub_unreachable(cfg, need, type(e).__name__) from e
    except ValueError as e:
        if "split" in str(e).lower():
            raise TaskError(f"task.{key}={split!r}: no such split in {path} ({str(e).splitlines()[0]})") from e
        raise TaskError(f"task.hub {path}: loading failed: {str(e).splitlines()[0]}") from e
    except OSError as e:  # not found, gated (needs a token), or unreachable with a stale cache
        first = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise TaskError(
            f"task.hub {path}: loading split {split!r} failed ({first}); or pass {local_hint(need)}"
        ) from e
    missing = [c for c in need.columns if c not in ds.column_names]
    if missing:
        raise TaskError(
            f"task.hub {path} split {split!r} has no column {missing[0]!r} (has: {', '.join(ds.column_names)})"
        )
    return ds
