"""The task layer: data, preprocessing, head and metric for each experiment family.

    check(task_cfg, model)                                -> None (raises TaskError)
    prepare(task_cfg, tokenizer=..., model=..., seed=...) -> Prepared

`task_cfg` is the plain dict of a `conf/task/**.yaml` file; its `family` picks the module:
classification / regression -> text, squad / wikiqa -> qa, lm -> lm, vision -> vision.
Tasks know nothing of MoE: they work with the dense model too.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from camex.tasks.base import ModelInfo, Prepared
from camex.tasks.config import validate
from camex.tasks.errors import TaskError
from camex.tasks.families import FAMILIES

__all__ = ["FAMILIES", "ModelInfo", "Prepared", "TaskError", "check", "prepare"]


def check(task_cfg: Mapping[str, Any], model: ModelInfo) -> None:
    """Fast validation (no data, no network): keys, values, task/model fit, local paths, offline hub."""
    validate(task_cfg, model)


def prepare(task_cfg: Mapping[str, Any], *, tokenizer: Any, model: ModelInfo, seed: int) -> Prepared:
    """Load, check and preprocess a task's data; return splits, collator, head and metric."""
    cfg = validate(task_cfg, model)
    family = cfg["family"]
    if family != "vision" and tokenizer is None:
        raise TaskError(f"task {cfg['name']} (family {family}) needs a tokenizer; got None")
    if family in ("classification", "regression"):
        from camex.tasks import text as module
    elif family in ("squad", "wikiqa"):
        from camex.tasks import qa as module
    elif family == "lm":
        from camex.tasks import lm as module
    else:
        from camex.tasks import vision as module
    return module.prepare(cfg, tokenizer=tokenizer, model=model, seed=seed)
