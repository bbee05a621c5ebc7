"""The paper's published values (`reports/paper_reference.yaml`), loaded and checked.

The file is the only source of numbers in a report besides the tracked runs: each table that has
published cells names its scale, the metric of each task and the values per merge variant.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

DEFAULT_PATH = Path(__file__).resolve().parents[2] / "reports" / "paper_reference.yaml"


class ReferenceError(ValueError):
    """The reference file is missing or malformed (the message names the file and the key)."""


@dataclass(frozen=True)
class PublishedTable:
    """Published cells of one paper table."""

    name: str
    description: str
    model: str
    scale: float  # reproduced metric values are multiplied by this to be comparable
    provenance: str
    metrics: dict[str, str]  # task -> metric name of the published cells
    values: dict[str, dict[str, float]]  # merge -> task -> value
    notes: dict[str, Any] = field(default_factory=dict)

    def value(self, merge: str, task: str) -> float | None:
        return self.values.get(merge, {}).get(task)


@dataclass(frozen=True)
class Reference:
    source: str
    path: Path
    tables: dict[str, PublishedTable]

    def table(self, name: str) -> PublishedTable | None:
        return self.tables.get(name)


def _need(mapping: dict, key: str, where: str, path: Path) -> Any:
    if not isinstance(mapping, dict) or key not in mapping:
        raise ReferenceError(f"{path}: missing key {where}{key}")
    return mapping[key]


def load_reference(path: str | Path | None = None) -> Reference:
    """Read and validate the reference file (default: `reports/paper_reference.yaml`)."""
    path = Path(path) if path is not None else DEFAULT_PATH
    if not path.is_file():
        raise ReferenceError(f"reference file not found: {path}")
    try:
        raw = yaml.safe_load(path.read_text())
    except yaml.YAMLError as exc:
        raise ReferenceError(f"{path}: not valid YAML ({exc.__class__.__name__})") from exc
    tables: dict[str, PublishedTable] = {}
    for name, spec in (_need(raw, "tables", "", path) or {}).items():
        where = f"tables.{name}."
        values = _need(spec, "values", where, path)
        metrics = _need(spec, "metrics", where, path)
        for merge, cells in values.items():
            for task, value in cells.items():
                if not isinstance(value, (int, float)) or isinstance(value, bool):
                    raise ReferenceError(f"{path}: {where}values.{merge}.{task} must be a number, got {value!r}")
                if task not in metrics:
                    raise ReferenceError(f"{path}: {where}metrics has no metric for {task} (used by values.{merge})")
        scale = _need(spec, "scale", where, path)
        if not isinstance(scale, (int, float)) or scale <= 0:
            raise ReferenceError(f"{path}: {where}scale must be a positive number, got {scale!r}")
        known = {"values", "metrics", "scale", "description", "model", "provenance"}
        tables[name] = PublishedTable(
            name=name,
            description=str(_need(spec, "description", where, path)),
            model=str(_need(spec, "model", where, path)),
            scale=float(scale),
            provenance=str(_need(spec, "provenance", where, path)).strip(),
            metrics={str(k): str(v) for k, v in metrics.items()},
            values={str(m): {str(t): float(v) for t, v in cells.items()} for m, cells in values.items()},
            notes={k: v for k, v in spec.items() if k not in known},
        )
    return Reference(source=str(raw.get("source", "")).strip(), path=path, tables=tables)
