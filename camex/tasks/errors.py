"""The one error a task raises for anything the user can fix: a config value, a file, a missing package."""

from __future__ import annotations


class TaskError(ValueError):
    """A task config or its data is unusable; the message names the key or file and what is allowed."""
