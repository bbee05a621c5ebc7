"""A task config checked against its family: every check that needs no data and no network.

A task config (`conf/task/**.yaml`) is a plain dict. `validate` fills the optional keys with
their (non-numeric) defaults and raises `TaskError` naming the offending key and what is allowed,
so a bad run stops before a model or a data set is loaded. Numbers live in the YAML, never here.

Keys every task has: name, family, metrics, primary_metric, greater_is_better; optional: hub
{path, name}, splits {train, eval: split | {name: split}}, packaged {source, eval_fraction,
max_documents}, local {train, eval: path | {name: path}}, max_train_samples, max_eval_samples,
data_seed, primary_eval. The rest depends on the family (see `camex.tasks.families`): e.g.
text_fields, label_field, num_labels, label_names, max_length for classification. Keys of the data
sources (hub, splits, packaged, local) are checked by the sources (`camex.tasks.sources`). A Hydra
`defaults` list (the task's model and trainer presets) is ignored here.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from camex.tasks import sources
from camex.tasks.base import ModelInfo
from camex.tasks.errors import TaskError, bad_value
from camex.tasks.families import COMMON_OPTIONAL, COMMON_REQUIRED, FAMILIES, Family, need

INTERPOLATIONS = ("bilinear", "bicubic", "nearest")


def _int(cfg: dict, key: str, *, minimum: int = 1, nullable: bool = False) -> None:
    v = cfg.get(key)
    if v is None and nullable:
        return
    if isinstance(v, bool) or not isinstance(v, int) or v < minimum:
        kind = f"an integer >= {minimum}" + (" or null" if nullable else "")
        raise bad_value(key, v, f"expected {kind}")


def _str(cfg: dict, key: str, *, nullable: bool = False) -> None:
    v = cfg.get(key)
    if v is None and nullable:
        return
    if not isinstance(v, str) or not v:
        raise bad_value(key, v, "expected a non-empty string" + (" or null" if nullable else ""))


def _str_list(cfg: dict, key: str, *, min_len: int = 1, max_len: int | None = None) -> None:
    v = cfg.get(key)
    ok = isinstance(v, list | tuple) and all(isinstance(s, str) and s for s in v) and len(v) >= min_len
    if not ok or (max_len is not None and len(v) > max_len):
        most = f" and at most {max_len}" if max_len else ""
        raise bad_value(key, v, f"expected a list of at least {min_len}{most} column names")


def _check_shape(cfg: dict, fam: Family, family: str) -> None:
    allowed = set(COMMON_REQUIRED) | set(COMMON_OPTIONAL) | set(fam.required) | set(fam.optional)
    unknown = sorted(set(cfg) - allowed)
    if unknown:
        listing = ", ".join(sorted(allowed))
        raise bad_value(unknown[0], cfg[unknown[0]], f"unknown key for family {family}; allowed: {listing}")
    missing = [k for k in (*COMMON_REQUIRED, *fam.required) if k not in cfg]
    if missing:
        raise TaskError(f"task.{missing[0]} is missing (family {family} requires: {', '.join(fam.required)})")


def _check_values(cfg: dict, family: str) -> None:
    _str(cfg, "name")
    if not isinstance(cfg["greater_is_better"], bool):
        raise bad_value("greater_is_better", cfg["greater_is_better"], "expected true or false")
    _int(cfg, "max_train_samples", nullable=True)
    _int(cfg, "max_eval_samples", nullable=True)
    _int(cfg, "data_seed", minimum=0, nullable=True)
    if family in ("classification", "regression"):
        _str_list(cfg, "text_fields", max_len=2)
        _str(cfg, "label_field")
    if family == "classification":
        _int(cfg, "num_labels", minimum=2)
        names = cfg["label_names"]
        if names is not None:
            _str_list(cfg, "label_names", min_len=2)
            if len(names) != cfg["num_labels"] or len(set(names)) != len(names):
                raise bad_value("label_names", names, f"expected {cfg['num_labels']} distinct names (task.num_labels)")
    if family == "regression" and cfg["num_labels"] not in (None, 1):
        raise bad_value("num_labels", cfg["num_labels"], "regression has a single output; allowed: 1 or null")
    if family in ("classification", "regression", "squad", "wikiqa"):
        _int(cfg, "max_length", minimum=2)
    if family == "squad":
        for k in ("question_field", "context_field", "answers_field", "input_template"):
            _str(cfg, k)
        template = cfg["input_template"]
        try:
            template.format(question="", context="")
        except (KeyError, IndexError, ValueError):
            raise bad_value("input_template", template, "only {question} and {context} may appear in braces") from None
        for slot in ("{question}", "{context}"):
            if slot not in template:
                raise bad_value("input_template", template, f"must contain {slot}")
        _int(cfg, "max_target_length")
        _int(cfg, "doc_stride", nullable=True)
        if cfg.get("doc_stride") is not None and cfg["doc_stride"] >= cfg["max_length"] // 2:
            allowed = "null (truncate) or fewer tokens than half of task.max_length"
            raise bad_value("doc_stride", cfg["doc_stride"], allowed)
        if not isinstance(cfg["generation"], Mapping):
            raise bad_value("generation", cfg["generation"], "expected a mapping of generate() arguments")
    if family == "wikiqa":
        for k in ("question_field", "answer_field", "label_field", "group_field"):
            _str(cfg, k)
        if cfg["num_labels"] != 2:
            raise bad_value("num_labels", cfg["num_labels"], "answer selection is yes/no; allowed: 2")
    if family == "lm":
        _str(cfg, "text_field")
        _int(cfg, "block_size", minimum=2)
        if not isinstance(cfg["eval_keep_remainder"], bool):
            raise bad_value("eval_keep_remainder", cfg["eval_keep_remainder"], "expected true or false")
    if family == "vision":
        _check_vision_values(cfg)


def _check_vision_values(cfg: dict) -> None:
    _str(cfg, "image_field")
    _str(cfg, "label_field")
    _int(cfg, "num_labels", minimum=2)
    if cfg["interpolation"] not in INTERPOLATIONS:
        raise bad_value("interpolation", cfg["interpolation"], f"allowed: {', '.join(INTERPOLATIONS)}")
    pct = cfg["eval_crop_pct"]
    if isinstance(pct, bool) or not isinstance(pct, int | float) or not 0 < pct <= 1:
        raise bad_value("eval_crop_pct", pct, "expected a number in (0, 1]")
    aug = cfg["train_augment"]
    if aug is not None:
        allowed = {"scale", "ratio", "hflip"}
        if not isinstance(aug, Mapping) or not set(aug) <= allowed or "scale" not in aug:
            shape = "null or {scale: [lo, hi], ratio: [lo, hi] (optional), hflip: probability (optional)}"
            raise bad_value("train_augment", aug, f"expected {shape}")
    for k in ("image_mean", "image_std"):
        v = cfg[k]
        if v is not None and (not isinstance(v, list | tuple) or len(v) != 3):
            raise bad_value(k, v, "expected null (take it from the model) or three numbers")
    if not isinstance(cfg["verify_images"], bool):
        raise bad_value("verify_images", cfg["verify_images"], "expected true or false")


def _check_metrics(cfg: dict, fam: Family, family: str) -> None:
    metrics = cfg["metrics"]
    if not isinstance(metrics, list | tuple) or not metrics or any(m not in fam.metrics for m in metrics):
        raise bad_value("metrics", metrics, f"allowed for family {family}: {', '.join(fam.metrics)}")
    if cfg["primary_metric"] not in metrics:
        raise bad_value("primary_metric", cfg["primary_metric"], f"must be one of task.metrics: {', '.join(metrics)}")


def _check_model(cfg: dict, fam: Family, family: str, model: ModelInfo) -> None:
    if model.family not in fam.models or (fam.needs_encoder_decoder and not model.is_encoder_decoder):
        why = {
            "squad": "generative QA needs an encoder-decoder (T5) model",
            "lm": "language modelling needs a causal LM (gpt2, llama)",
            "vision": "image classification needs a timm vision model",
        }.get(family, "text tasks need a text model (timm models take images)" if model.family == "timm" else "")
        raise TaskError(
            f"task.family={family} (task {cfg['name']}) cannot use model family {model.family!r}"
            f"{': ' + why if why else ''}; allowed model families: {', '.join(fam.models)}"
        )
    if family == "vision":
        if not model.image_size:
            raise TaskError(f"task {cfg['name']}: the timm model must report ModelInfo.image_size")
        for k, from_model in (("image_mean", model.image_mean), ("image_std", model.image_std)):
            if from_model is None and cfg[k] is None:
                raise bad_value(k, None, "the model gives no normalisation; set three numbers here")
        return
    key = "block_size" if family == "lm" else "max_length"
    if 0 < model.max_length < cfg[key]:  # 0: the model states no limit
        raise bad_value(
            key,
            cfg[key],
            f"longer than the model accepts (model max_length={model.max_length}); "
            f"set task.{key}<={model.max_length} or pick a model with a longer max_length",
        )


def validate(task_cfg: Mapping[str, Any], model: ModelInfo) -> dict[str, Any]:
    """Check a task config against its family's schema and the model; return it with defaults filled."""
    if type(task_cfg).__module__.startswith("omegaconf"):  # accept a DictConfig as well as a plain dict
        from omegaconf import OmegaConf

        task_cfg = OmegaConf.to_container(task_cfg, resolve=True)
    if not isinstance(task_cfg, Mapping):
        raise TaskError(f"task config must be a mapping, got {type(task_cfg).__name__}")
    family = task_cfg.get("family")
    if not isinstance(family, str) or family not in FAMILIES:  # a list would not even hash
        raise bad_value("family", family, f"unknown task family; allowed: {', '.join(FAMILIES)}")
    fam = FAMILIES[family]
    cfg = {**COMMON_OPTIONAL, **fam.optional, **dict(task_cfg)}
    cfg.pop("defaults", None)  # Hydra's defaults list (the task's model / trainer), when a YAML is read raw
    if cfg["local"] is None:
        cfg["local"] = {}
    _check_shape(cfg, fam, family)
    _check_values(cfg, family)
    _check_metrics(cfg, fam, family)
    _check_model(cfg, fam, family, model)
    sources.check(cfg, need(cfg))
    cfg["local"] = {"train": cfg["local"].get("train"), "eval": cfg["local"].get("eval")}
    return cfg
