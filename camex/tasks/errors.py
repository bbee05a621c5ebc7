"""The one error a task raises for anything the user can fix: a config value, a file, a missing package."""

from __future__ import annotations

from typing import Any


class TaskError(ValueError):
    """A task config or its data is unusable; the message names the key or file and what is allowed."""


def bad_value(key: str, value: Any, problem: str) -> TaskError:
    """`task.<key>=<value>: <problem>`, the shape of every config complaint."""
    return TaskError(f"task.{key}={value!r}: {problem}")
