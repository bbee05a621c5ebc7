"""Per-value converters for raw data columns: they normalise a value or say what was expected.

Each converter is idempotent, so the same one checks a local file row by row (where an error can
name the line) and normalises hub rows inside the tokenisation map. A family's `Spec` maps each
column it reads to its converter.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Sequence
from typing import Any

from camex.tasks.errors import TaskError

Converter = Callable[[Any], Any]
Spec = dict[str, Converter]  # column -> converter; the columns a family reads


def text(value: Any) -> str:
    if not isinstance(value, str):
        raise ValueError(f"expected a string, got {value!r}")
    return value


def class_label(num_labels: int, names: Sequence[str] | None = None) -> Converter:
    """An integer id in [0, num_labels), its decimal string (csv), or one of `names`."""
    index = {n: i for i, n in enumerate(names or ())}
    expected = f"an integer class id in [0, {num_labels})" + (f" or one of {list(names)}" if names else "")

    def convert(value: Any) -> int:
        if isinstance(value, str):
            if value in index:
                return index[value]
            try:  # a csv cell: "1", or "1.0" from a float column
                value = float(value.strip())
            except ValueError:
                pass
        if isinstance(value, float) and value.is_integer():
            value = int(value)
        if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value < num_labels:
            raise ValueError(f"expected {expected}, got {value!r}")
        return value

    return convert


def float_label(value: Any) -> float:
    try:
        if isinstance(value, bool):
            raise TypeError
        out = float(value)
    except (TypeError, ValueError):
        raise ValueError(f"expected a number, got {value!r}") from None
    if out != out:  # NaN would silently poison the regression loss
        raise ValueError(f"expected a number, got {value!r}")
    return out


def answers(value: Any) -> list[str]:
    """SQuAD answers: {"text": [...], ...} (hub), a list of strings, one string, or a JSON list in a csv cell."""
    if isinstance(value, str) and value.lstrip().startswith("["):
        try:
            value = json.loads(value)
        except json.JSONDecodeError:
            pass
    if isinstance(value, dict):
        value = value.get("text")
    if isinstance(value, str):
        value = [value]
    if isinstance(value, list) and value and all(isinstance(v, dict) and "text" in v for v in value):
        value = [v["text"] for v in value]  # the official SQuAD file's [{"text", "answer_start"}]
    if not isinstance(value, list) or not value or not all(isinstance(v, str) for v in value):
        raise ValueError(
            f'expected a non-empty list of answer strings (or {{"text": [...]}} or one string), got {value!r}'
        )
    return value


def group_id(value: Any) -> str:
    if isinstance(value, bool) or not isinstance(value, str | int) or value == "":
        raise ValueError(f"expected a question id (string or integer), got {value!r}")
    return str(value)


def convert_rows(rows: list[dict], spec: Spec, origin: str) -> Any:
    """In-memory rows (a packaged source) as a datasets.Dataset, checked like a local file."""
    from datasets import Dataset

    out = []
    for i, record in enumerate(rows, 1):
        try:
            out.append({c: convert(record[c]) for c, convert in spec.items()})
        except (KeyError, ValueError) as e:
            raise TaskError(f"{origin}: row {i}: {e}") from None
    return Dataset.from_list(out)
