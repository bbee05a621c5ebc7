"""Validate a composed run config before anything heavy is loaded.

Every check raises `ConfigError` with one line that names the key and the allowed values; `run.py`
prints it and exits with status 2.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from camex import models, tasks
from camex.variants import MergeVariant, MoEOptions, get_variant, option_names

PRECISIONS = ("fp32", "bf16", "fp16")
EVAL_EVERY = ("epoch", "steps")
SCHEDULERS = ("linear", "cosine", "constant", "constant_with_warmup", "cosine_with_restarts", "polynomial")
TRACKING_SCHEMES = ("sqlite:", "http://", "https://", "file:", "postgresql", "mysql", "databricks")


class ConfigError(ValueError):
    """A run config that cannot work."""


@dataclass
class RunSpec:
    task: dict[str, Any]
    model: dict[str, Any]
    variant: MergeVariant
    options: MoEOptions
    trainer: dict[str, Any]
    tracking: dict[str, Any]
    info: tasks.ModelInfo


def merge_options(merge_cfg: dict[str, Any]) -> tuple[MergeVariant, MoEOptions]:
    if "variant" not in merge_cfg:
        raise ConfigError("merge.variant is missing; pick a preset, e.g. merge=camex_ties")
    try:
        variant = get_variant(merge_cfg["variant"])
    except KeyError as e:
        raise ConfigError(f"merge.variant: {e.args[0]}") from None
    fields = {k: v for k, v in merge_cfg.items() if k != "variant"}
    unknown = sorted(set(fields) - set(option_names()))
    if unknown:
        raise ConfigError(f"merge.{unknown[0]} is not an option; allowed: {option_names()}")
    if fields.get("layers") is not None:
        fields["layers"] = tuple(fields["layers"])
    try:
        return variant, MoEOptions(**fields)
    except (TypeError, ValueError) as e:
        raise ConfigError(str(e)) from None


def _check_trainer(t: dict[str, Any]) -> None:
    def need(key: str, ok: bool, allowed: str) -> None:
        if not ok:
            raise ConfigError(f"trainer.{key}={t.get(key)!r} is invalid; allowed: {allowed}")

    need("learning_rate", isinstance(t.get("learning_rate"), (int, float)) and t["learning_rate"] > 0, "a number > 0")
    for key in ("batch_size", "eval_batch_size", "grad_accum", "logging_steps"):
        need(key, isinstance(t.get(key), int) and t[key] >= 1, "an integer >= 1")
    need("epochs", isinstance(t.get("epochs"), (int, float)) and t["epochs"] > 0, "a number > 0")
    need("precision", t.get("precision") in PRECISIONS, str(list(PRECISIONS)))
    need("eval_every", t.get("eval_every") in EVAL_EVERY, str(list(EVAL_EVERY)))
    need("lr_scheduler", t.get("lr_scheduler") in SCHEDULERS, str(list(SCHEDULERS)))
    if t.get("eval_every") == "steps":
        need("eval_steps", isinstance(t.get("eval_steps"), int) and t["eval_steps"] >= 1, "an integer >= 1")
    for key in ("max_train_samples", "max_eval_samples"):
        need(key, t.get(key) is None or (isinstance(t[key], int) and t[key] >= 1), "null or an integer >= 1")


def _check_tracking(t: dict[str, Any]) -> None:
    uri = t.get("uri")
    if uri is not None and not str(uri).startswith(TRACKING_SCHEMES):
        raise ConfigError(f"tracking.uri={uri!r} is not a tracking URI; allowed schemes: {list(TRACKING_SCHEMES)}")


def validate(cfg: dict[str, Any]) -> RunSpec:
    """`cfg` is the resolved config as plain containers."""
    for group in ("task", "model", "merge", "trainer", "tracking"):
        if not isinstance(cfg.get(group), dict):
            raise ConfigError(f"{group} is missing: choose one, e.g. {group}=<name>")
    if not isinstance(cfg.get("seed"), int):
        raise ConfigError(f"seed={cfg.get('seed')!r} is invalid; allowed: an integer")
    variant, options = merge_options(cfg["merge"])
    if cfg["model"].get("family") not in models.FAMILIES:
        raise ConfigError(f"model.family={cfg['model'].get('family')!r} is not one of {list(models.FAMILIES)}")
    info = models.model_info(cfg["model"])
    # model and data are checked together so an offline user learns about both at once
    problems = []
    for check, error in ((lambda: models.check(cfg["model"]), models.ModelError),
                         (lambda: tasks.check(cfg["task"], info), tasks.TaskError)):  # fmt: skip
        try:
            check()
        except error as e:
            problems.append(str(e))
    if problems:
        raise ConfigError("; and ".join(problems))
    if variant.layer != "dense" and options.routing == "segment" and info.family == "timm":
        raise ConfigError("merge.routing='segment' is for causal LMs; allowed for timm: ['auto', 'sequence']")
    _check_trainer(cfg["trainer"])
    _check_tracking(cfg["tracking"])
    return RunSpec(cfg["task"], cfg["model"], variant, options, cfg["trainer"], cfg["tracking"], info)
