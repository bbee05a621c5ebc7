"""Validate a composed run config before anything heavy is loaded.

Every check raises `ConfigError` with one line that names the key and the allowed values; `run.py`
prints it and exits with status 2.
"""

from __future__ import annotations

import dataclasses
import functools
import math
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from camex import models, tasks
from camex.variants import MergeVariant, MoEOptions, get_variant, option_names

PRECISIONS = ("fp32", "bf16", "fp16")
EVAL_EVERY = ("epoch", "steps")
SCHEDULERS = ("linear", "cosine", "constant", "constant_with_warmup", "cosine_with_restarts", "polynomial")
TRACKING_FALLBACKS = (None, "sqlite")
TRACKING_SCHEMES = ("sqlite:", "http://", "https://", "file:", "postgresql", "mysql", "databricks")
SEED_RANGE = (0, 2**32 - 1)  # what numpy's and torch's seeding accept
CONF = Path(__file__).resolve().parents[1] / "conf"


@functools.cache
def declared_keys(group: str) -> frozenset[str]:
    """Every top-level key some preset of `conf/<group>/` declares: the keys code may read. A key
    outside them (`+trainer.lerning_rate=...`) would be silently ignored, so it is refused."""
    import yaml

    keys: set[str] = set()
    for path in (CONF / group).glob("*.yaml"):
        keys |= set(yaml.safe_load(path.read_text()) or {})
    return frozenset(keys - {"defaults"})


def _check_known_keys(group: str, values: dict[str, Any]) -> None:
    allowed = declared_keys(group)
    unknown = sorted(set(values) - allowed)
    if allowed and unknown:
        raise ConfigError(f"{group}.{unknown[0]} is not a {group} setting (a typo?); allowed: {sorted(allowed)}")


def inside(root: str, path: str, key: str = "paths.run_dir") -> str:
    """`path` when it lies inside `root` (lexically: `..` is resolved, symlinks are not followed),
    else ConfigError: a config value (`experiment_name=../../x`) must not move writes elsewhere."""
    base = os.path.normpath(os.path.abspath(root))
    full = os.path.normpath(os.path.abspath(path))
    if os.path.commonpath([base, full]) != base:
        raise ConfigError(f"{key}={path} is outside paths.output_root={root}; allowed: a folder inside it "
                          "(names such as experiment_name must not contain '..' or start with '/')")  # fmt: skip
    return path


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


def _check_option_types(options: dict[str, Any]) -> None:
    """The type of each merge option, from MoEOptions' annotations; ranges and choices are
    checked by MoEOptions itself. Without this a string alpha would fail mid-training."""
    for f in dataclasses.fields(MoEOptions):
        if f.name not in options:
            continue
        value, kind = options[f.name], str(f.type)
        if value is None and "None" in kind:
            continue
        if kind.startswith("tuple"):
            ok = isinstance(value, (list, tuple)) and all(_is_integer(i) and i >= 0 for i in value)
            allowed = "a list of block indices >= 0"
        elif kind.startswith("int"):
            ok, allowed = _is_integer(value), "an integer"
        elif kind.startswith("float"):
            ok, allowed = _is_number(value), "a finite number"
        elif kind.startswith("bool"):
            ok, allowed = isinstance(value, bool), "true or false"
        else:
            ok, allowed = isinstance(value, str), "a name"
        if not ok:
            allowed += " or null" if "None" in kind else ""
            raise ConfigError(f"merge.{f.name}={value!r} is invalid; allowed: {allowed}")


def merge_options(merge_cfg: dict[str, Any]) -> tuple[MergeVariant, MoEOptions]:
    if "variant" not in merge_cfg:
        raise ConfigError("merge.variant is missing; pick a preset, e.g. merge=camex_ties")
    if not isinstance(merge_cfg["variant"], str):
        raise ConfigError(f"merge.variant={merge_cfg['variant']!r} is invalid; allowed: a name, e.g. camex_ties")
    try:
        variant = get_variant(merge_cfg["variant"])
    except KeyError as e:
        raise ConfigError(f"merge.variant: {e.args[0]}") from None
    fields = {k: v for k, v in merge_cfg.items() if k != "variant"}
    unknown = sorted(set(fields) - set(option_names()))
    if unknown:
        raise ConfigError(f"merge.{unknown[0]} is not an option; allowed: {option_names()}")
    _check_option_types(fields)
    if fields.get("layers") is not None:
        fields["layers"] = tuple(fields["layers"])
    try:
        return variant, MoEOptions(**fields)
    except (TypeError, ValueError) as e:
        raise ConfigError(str(e)) from None


def _is_number(value: Any) -> bool:
    """A finite int or float; booleans are not numbers here (YAML `true` would pass as 1)."""
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def _is_integer(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _check_trainer(t: dict[str, Any]) -> None:
    _check_known_keys("trainer", t)

    def need(key: str, ok: bool, allowed: str) -> None:
        if not ok:
            raise ConfigError(f"trainer.{key}={t.get(key)!r} is invalid; allowed: {allowed}")

    need("learning_rate", _is_number(t.get("learning_rate")) and t["learning_rate"] > 0, "a number > 0")
    for key in ("batch_size", "eval_batch_size", "grad_accum", "logging_steps"):
        need(key, _is_integer(t.get(key)) and t[key] >= 1, "an integer >= 1")
    need("epochs", _is_number(t.get("epochs")) and t["epochs"] > 0, "a number > 0")
    need("max_steps", _is_integer(t.get("max_steps")) and t["max_steps"] >= -1,
         "-1 (use trainer.epochs), 0 (evaluate only) or an integer >= 1")  # fmt: skip
    for key in ("warmup_steps", "num_workers"):
        need(key, _is_integer(t.get(key)) and t[key] >= 0, "an integer >= 0")
    for key in ("weight_decay", "max_grad_norm"):
        need(key, _is_number(t.get(key)) and t[key] >= 0, "a number >= 0")
    for key in ("adam_beta1", "adam_beta2"):
        need(key, _is_number(t.get(key)) and 0 <= t[key] < 1, "a number in [0, 1)")
    need("adam_epsilon", _is_number(t.get("adam_epsilon")) and t["adam_epsilon"] > 0, "a number > 0")
    for key in ("select_best", "progress_bar", "keep_checkpoints", "compile", "reuse_host_memory"):
        need(key, isinstance(t.get(key), bool), "true or false")
    need("precision", t.get("precision") in PRECISIONS, str(list(PRECISIONS)))
    need("eval_every", t.get("eval_every") in EVAL_EVERY, str(list(EVAL_EVERY)))
    need("lr_scheduler", t.get("lr_scheduler") in SCHEDULERS, str(list(SCHEDULERS)))
    if t.get("eval_every") == "steps":
        need("eval_steps", isinstance(t.get("eval_steps"), int) and t["eval_steps"] >= 1, "an integer >= 1")
    for key in ("max_train_samples", "max_eval_samples", "threads"):
        need(key, t.get(key) is None or (_is_integer(t[key]) and t[key] >= 1), "null or an integer >= 1")


def _check_tracking(t: dict[str, Any]) -> None:
    _check_known_keys("tracking", t)
    wait = t.get("store_wait_s", 30)
    if not _is_number(wait) or not 1 <= wait <= 3600:
        raise ConfigError(f"tracking.store_wait_s={wait!r} is invalid; allowed: seconds in [1, 3600]")
    uri = t.get("uri")
    if uri is not None and not (isinstance(uri, str) and uri.startswith(TRACKING_SCHEMES)):
        raise ConfigError(f"tracking.uri={uri!r} is not a tracking URI; allowed schemes: {list(TRACKING_SCHEMES)}")
    if not isinstance(t.get("enabled", True), bool):
        raise ConfigError(f"tracking.enabled={t['enabled']!r} is invalid; allowed: true, false")
    if t.get("fallback") not in TRACKING_FALLBACKS:
        raise ConfigError(f"tracking.fallback={t['fallback']!r} is invalid; allowed: null (fail), sqlite")
    if not isinstance(t.get("tags") or {}, dict):
        raise ConfigError(f"tracking.tags={t['tags']!r} is invalid; allowed: a mapping of tag names to values")
    parent = t.get("parent_run_id")
    if parent is not None and not isinstance(parent, str):
        raise ConfigError(f"tracking.parent_run_id={parent!r} is invalid; allowed: null or an MLflow run id")
    location = t.get("artifact_location")
    if location is not None and not isinstance(location, str):
        raise ConfigError(f"tracking.artifact_location={location!r} is invalid; allowed: null or a path or URI")


def _check_run_keys(cfg: dict[str, Any]) -> None:
    """Top-level keys that name the run and where it lives (they become paths and MLflow names)."""
    for key in ("resume", "overwrite", "resume_changed"):
        if not isinstance(cfg.get(key, False), bool):
            raise ConfigError(f"{key}={cfg[key]!r} is invalid; allowed: true, false")
    name = cfg.get("experiment_name")
    if not isinstance(name, str) or not name.strip():
        raise ConfigError(f"experiment_name={name!r} is invalid; allowed: a non-empty name")
    paths = cfg.get("paths")
    if not isinstance(paths, dict) or not all(isinstance(paths.get(k), str) for k in ("output_root", "run_dir")):
        raise ConfigError(f"paths={paths!r} is invalid; allowed: paths.output_root and paths.run_dir as folder paths")
    inside(paths["output_root"], paths["run_dir"])


def _check_required_task(cfg: dict[str, Any]) -> None:
    """An experiment preset made for some tasks only (e.g. released_glue) names them in
    `requires_task`; any other task is refused rather than silently trained on."""
    allowed, task = cfg.get("requires_task"), cfg["task"].get("name")
    if allowed is not None and task not in allowed:
        name = cfg.get("experiment_name")
        raise ConfigError(f"experiment {name} needs task= one of {list(allowed)}; got task={task}")


def validate(cfg: dict[str, Any]) -> RunSpec:
    """`cfg` is the resolved config as plain containers."""
    for group in ("task", "model", "merge", "trainer", "tracking"):
        if not isinstance(cfg.get(group), dict):
            raise ConfigError(f"{group} is missing: choose one, e.g. {group}=<name>")
    _check_required_task(cfg)
    _check_run_keys(cfg)
    seed = cfg.get("seed")
    if not _is_integer(seed) or not SEED_RANGE[0] <= seed <= SEED_RANGE[1]:
        raise ConfigError(f"seed={seed!r} is invalid; allowed: an integer in [{SEED_RANGE[0]}, {SEED_RANGE[1]}]")
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
