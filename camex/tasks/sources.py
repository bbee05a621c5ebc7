"""Raw splits from one of three sources: local files, a package that ships data, or the HF Hub.

Local files are checked row by row before anything is tokenised, so malformed data stops the run
with the file, the line and the expected format named. Hub data are trusted (their columns are
checked). Subsampling is deterministic: a fixed-seed permutation, kept in data order.
"""

from __future__ import annotations

import csv
import json
import os
import socket
from collections.abc import Mapping
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

import numpy as np

from camex.tasks.columns import Converter
from camex.tasks.config import expected_columns, hub_cached, hub_unreachable, is_offline, local_hint
from camex.tasks.errors import TaskError

Spec = dict[str, Converter]  # column -> converter; the columns a family reads


def data_seed(cfg: dict, seed: int) -> int:
    return cfg["data_seed"] if cfg["data_seed"] is not None else seed


def subsample(ds: Any, n: int | None, seed: int) -> Any:
    """At most `n` rows, chosen by a seeded permutation and kept in their original order."""
    if n is None or n >= len(ds):
        return ds
    idx = np.sort(np.random.default_rng(seed).permutation(len(ds))[:n])
    return ds.select(idx.tolist())


# --- local files ------------------------------------------------------------------------------


def _format_hint(path: Path, columns: list[str]) -> str:
    cols = ", ".join(columns)
    return {
        ".jsonl": f"expected JSON lines, one object per line with keys {cols}",
        ".json": f"expected a JSON list of objects with keys {cols}",
        ".csv": f"expected a CSV file with a header row naming the columns {cols}",
        ".txt": "expected plain text, one line per row",
    }[path.suffix.lower()]


def _squad_nested(doc: dict, cfg: dict) -> list[dict] | None:
    """Flatten the official SQuAD file layout {data: [{paragraphs: [{context, qas: [...]}]}]}."""
    data = doc.get("data")
    if not (isinstance(data, list) and data and isinstance(data[0], dict) and "paragraphs" in data[0]):
        return None
    q, c, a = cfg["question_field"], cfg["context_field"], cfg["answers_field"]
    return [
        {q: qa.get("question"), c: para.get("context"), a: qa.get("answers")}
        for article in data
        for para in article.get("paragraphs", [])
        for qa in para.get("qas", [])
    ]


def _records(path: Path, cfg: dict) -> list[tuple[str, Any]]:
    """(where, record) pairs; `where` says "line 7" or "record 7" for error messages."""
    hint = _format_hint(path, expected_columns(cfg))
    suffix = path.suffix.lower()
    try:
        raw = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as e:
        raise TaskError(f"{path}: not UTF-8 text ({e.reason} at byte {e.start}); {hint}") from None
    if not raw.strip():
        raise TaskError(f"{path}: file is empty; {hint}")
    if suffix == ".txt":
        return [(f"line {i}", {cfg["text_field"]: line}) for i, line in enumerate(raw.splitlines(keepends=True), 1)]
    if suffix == ".jsonl":
        out = []
        for i, line in enumerate(raw.splitlines(), 1):
            if not line.strip():
                continue
            try:
                out.append((f"line {i}", json.loads(line)))
            except json.JSONDecodeError as e:
                raise TaskError(f"{path}: line {i}: not valid JSON ({e.msg}); {hint}") from None
        return out
    if suffix == ".json":
        try:
            doc = json.loads(raw)
        except json.JSONDecodeError as e:
            raise TaskError(f"{path}: line {e.lineno}: not valid JSON ({e.msg}); {hint}") from None
        if isinstance(doc, dict) and cfg["family"] == "squad" and (flat := _squad_nested(doc, cfg)) is not None:
            doc = flat
        if isinstance(doc, dict) and isinstance(doc.get("data"), list):
            doc = doc["data"]
        if not isinstance(doc, list):
            raise TaskError(f"{path}: top level is a {type(doc).__name__}; {hint}")
        return [(f"record {i}", r) for i, r in enumerate(doc, 1)]
    reader = csv.DictReader(raw.splitlines())
    return [(f"line {reader.line_num}", row) for row in reader]


def read_local(path: str | os.PathLike, spec: Spec, cfg: dict, key: str) -> Any:
    """A local file as a datasets.Dataset of the spec's columns, every value converted and checked."""
    from datasets import Dataset

    path = Path(path).expanduser()
    hint = _format_hint(path, list(spec))
    rows = []
    for where, record in _records(path, cfg):
        if not isinstance(record, dict):
            raise TaskError(f"{path}: {where}: expected an object, got {type(record).__name__}; {hint}")
        row = {}
        for column, convert in spec.items():
            if column not in record:
                have = ", ".join(map(str, record)) or "none"
                raise TaskError(f"{path}: {where}: missing column {column!r} (has: {have}); {hint}")
            try:
                row[column] = convert(record[column])
            except ValueError as e:
                raise TaskError(f"{path}: {where}: column {column!r}: {e}") from None
        rows.append(row)
    if not rows:
        raise TaskError(f"{path} (task.{key}): no rows; {hint}")
    return Dataset.from_list(rows)


def convert_rows(rows: list[dict], spec: Spec, origin: str) -> Any:
    """Rows from a packaged source, checked like a local file."""
    from datasets import Dataset

    out = []
    for i, record in enumerate(rows, 1):
        try:
            out.append({c: convert(record[c]) for c, convert in spec.items()})
        except (KeyError, ValueError) as e:
            raise TaskError(f"{origin}: row {i}: {e}") from None
    return Dataset.from_list(out)


# --- the Hub ----------------------------------------------------------------------------------


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


def read_hub(cfg: dict, split: str, key: str) -> Any:
    hub = cfg["hub"]
    path, name = hub["path"], hub.get("name")
    if is_offline() and not hub_cached(path):
        raise hub_unreachable(cfg, "offline mode: HF_HUB_OFFLINE or HF_DATASETS_OFFLINE is set")
    if not is_offline() and not hub_cached(path) and not _hub_host_reachable():
        raise hub_unreachable(cfg, "no connection")
    import datasets

    try:
        ds = datasets.load_dataset(path, name, split=split)
    except (ConnectionError, TimeoutError) as e:
        raise hub_unreachable(cfg, type(e).__name__) from e
    except ValueError as e:
        if "split" in str(e).lower():
            raise TaskError(f"task.{key}={split!r}: no such split in {path} ({str(e).splitlines()[0]})") from e
        raise TaskError(f"task.hub {path}: loading failed: {str(e).splitlines()[0]}") from e
    except OSError as e:  # not found, gated (needs a token), or unreachable with a stale cache
        first = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise TaskError(f"task.hub {path}: loading split {split!r} failed ({first}); or pass {local_hint(cfg)}") from e
    missing = [c for c in expected_columns(cfg) if c not in ds.column_names]
    if missing:
        raise TaskError(
            f"task.hub {path} split {split!r} has no column {missing[0]!r} (has: {', '.join(ds.column_names)})"
        )
    return ds


# --- one entry point --------------------------------------------------------------------------


def load_splits(cfg: dict, spec: Spec, seed: int) -> tuple[Any, Any]:
    """(train, eval) datasets with the spec's columns; eval is a dict for named eval splits.

    Local files are read (and checked) first, so a malformed file stops the run before any download.
    """
    from camex.tasks import packaged

    local, ev = cfg["local"], cfg["local"]["eval"]
    train = read_local(local["train"], spec, cfg, "local.train") if local["train"] is not None else None
    if isinstance(ev, Mapping):
        evals: Any = {k: read_local(p, spec, cfg, f"local.eval.{k}") for k, p in ev.items()}
    else:
        evals = read_local(ev, spec, cfg, "local.eval") if ev is not None else None
    if train is not None and evals is not None:
        return train, evals

    if cfg["packaged"] is not None:
        packed_train, packed_eval = packaged.load(cfg, spec, data_seed(cfg, seed))
        return (packed_train if train is None else train), (packed_eval if evals is None else evals)
    if train is None:
        train = read_hub(cfg, cfg["splits"]["train"], "splits.train")
    if evals is None:
        sev = cfg["splits"]["eval"]
        if isinstance(sev, Mapping):
            evals = {k: read_hub(cfg, s, f"splits.eval.{k}") for k, s in sev.items()}
        else:
            evals = read_hub(cfg, sev, "splits.eval")
    return train, evals
