"""Local data files (jsonl, json, csv, txt): checked row by row before anything is tokenised.

Malformed data stop the run with the file, the line and the expected format named. The columns
to read and their converters come from the task family (`DataNeed`, a column spec).
"""

from __future__ import annotations

import csv
import json
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from camex.tasks.base import DataNeed
from camex.tasks.columns import Spec
from camex.tasks.errors import TaskError, bad_value


def local_hint(need: DataNeed) -> str:
    """How to run this task from local files, for error messages."""
    if need.local_suffixes is None:
        return "task.local.train=/path/train_folder task.local.eval=/path/eval_folder (one sub-folder per class)"
    return (
        f"task.local.train=/path/train.jsonl task.local.eval=/path/dev.jsonl "
        f"(jsonl, json or csv with columns {', '.join(need.columns)})"
    )


def check_paths(cfg: dict, need: DataNeed) -> None:
    """`task.local` names existing files of a type the family reads (folders for images)."""
    local = cfg["local"]
    if not isinstance(local, Mapping) or not set(local) <= {"train", "eval"}:
        raise bad_value("local", local, "expected {train: path|null, eval: path|{name: path}|null}")
    items: list[tuple[str, Any]] = [("local.train", local.get("train"))]
    ev = local.get("eval")
    items += [(f"local.eval.{k}", v) for k, v in ev.items()] if isinstance(ev, Mapping) else [("local.eval", ev)]
    for key, value in items:
        if value is None:
            continue
        if not isinstance(value, str | os.PathLike):
            raise bad_value(key, value, "expected a path")
        path = Path(value).expanduser()
        if need.local_suffixes is None:
            if not path.is_dir():
                raise bad_value(key, str(value), "no such folder (expected one sub-folder of images per class)")
            continue
        if not path.is_file():
            raise bad_value(key, str(value), "no such file")
        if path.suffix.lower() not in need.local_suffixes:
            raise bad_value(key, str(value), f"unsupported file type; allowed: {', '.join(need.local_suffixes)}")


def check_eval_layout(cfg: dict, need: DataNeed) -> None:
    """The shape of `task.local.eval`: one path, or a non-empty {name: path} the family can score."""
    local = cfg["local"]
    ev = local.get("eval")
    if need.single_eval and isinstance(ev, Mapping) and len(ev) != 1:
        raise bad_value("local.eval", ev, f"family {need.family} scores one eval split; give one path")
    if isinstance(ev, Mapping) and not ev:
        raise bad_value("local.eval", ev, "expected a path or a non-empty {name: path} mapping")
    if need.local_suffixes is None and (local.get("train") is None) != (ev is None):
        raise TaskError(
            "task.local: image folders map class names to ids by their sorted sub-folders, so give both "
            "task.local.train and task.local.eval"
        )


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


def _records(path: Path, cfg: dict, columns: list[str]) -> list[tuple[str, Any]]:
    """(where, record) pairs; `where` says "line 7" or "record 7" for error messages."""
    hint = _format_hint(path, columns)
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
    for where, record in _records(path, cfg, list(spec)):
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
