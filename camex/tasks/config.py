"""The task YAML schema and its validation: every check that needs no data and no network.

A task config (`conf/task/**.yaml`) is a plain dict. `validate` fills the optional keys with
their (non-numeric) defaults and raises `TaskError` naming the offending key and what is allowed,
so a bad run stops before a model or a data set is loaded. Numbers live in the YAML, never here.

Keys every task has: name, family, metrics, primary_metric, greater_is_better; optional: hub
{path, name}, splits {train, eval: split | {name: split}}, packaged {source, eval_fraction,
max_documents}, local {train, eval: path | {name: path}}, max_train_samples, max_eval_samples,
data_seed, primary_eval. The rest depends on the family (see `FAMILIES`): e.g. text_fields,
label_field, num_labels, label_names, max_length for classification. A Hydra `defaults` list (the
task's model and trainer presets) is ignored here.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from camex.tasks.base import ModelInfo
from camex.tasks.errors import TaskError

TEXT_SUFFIXES = (".jsonl", ".json", ".csv")
LM_SUFFIXES = (*TEXT_SUFFIXES, ".txt")


@dataclass(frozen=True)
class Family:
    head: str
    models: tuple[str, ...]  # ModelInfo.family values this family can feed
    required: tuple[str, ...]
    metrics: tuple[str, ...]
    optional: dict[str, Any] = field(default_factory=dict)
    needs_encoder_decoder: bool = False
    single_eval: bool = False  # metric needs per-example side data, so only one eval split
    local_suffixes: tuple[str, ...] | None = TEXT_SUFFIXES  # None: local data are image folders


_TEXT_MODELS = ("t5", "bert")
FAMILIES: dict[str, Family] = {
    "classification": Family(
        head="sequence_classification",
        models=_TEXT_MODELS,
        required=("text_fields", "label_field", "num_labels", "max_length"),
        optional={"label_names": None},
        metrics=("accuracy", "f1", "f1_macro", "matthews"),
    ),
    "regression": Family(
        head="regression",
        models=_TEXT_MODELS,
        required=("text_fields", "label_field", "max_length"),
        optional={"num_labels": None},
        metrics=("pearson", "spearman"),
    ),
    "squad": Family(
        head="seq2seq",
        models=("t5",),
        required=(
            "question_field",
            "context_field",
            "answers_field",
            "input_template",
            "max_length",
            "max_target_length",
            "generation",
        ),
        metrics=("exact_match", "f1"),
        needs_encoder_decoder=True,
        single_eval=True,
    ),
    "wikiqa": Family(
        head="sequence_classification",
        models=_TEXT_MODELS,
        required=("question_field", "answer_field", "label_field", "group_field", "num_labels", "max_length"),
        metrics=("accuracy", "map", "mrr"),
        single_eval=True,
    ),
    "lm": Family(
        head="causal_lm",
        models=("gpt2",),
        required=("text_field", "block_size"),
        optional={"eval_keep_remainder": False},
        metrics=("perplexity", "nll"),
        local_suffixes=LM_SUFFIXES,
    ),
    "vision": Family(
        head="image_classification",
        models=("timm",),
        required=("image_field", "label_field", "num_labels", "interpolation", "eval_crop_pct"),
        optional={"train_augment": None, "verify_images": True, "image_mean": None, "image_std": None},
        metrics=("top1",),
        local_suffixes=None,
    ),
}

COMMON_REQUIRED = ("name", "family", "metrics", "primary_metric", "greater_is_better")
COMMON_OPTIONAL: dict[str, Any] = {
    "hub": None,
    "packaged": None,
    "splits": None,
    "local": None,
    "max_train_samples": None,
    "max_eval_samples": None,
    "data_seed": None,  # null: follow the run seed
    "primary_eval": None,  # which named eval split carries primary_metric (MNLI: matched)
}
INTERPOLATIONS = ("bilinear", "bicubic", "nearest")


def _fail(key: str, value: Any, problem: str) -> TaskError:
    return TaskError(f"task.{key}={value!r}: {problem}")


def _int(cfg: dict, key: str, *, minimum: int = 1, nullable: bool = False) -> None:
    v = cfg.get(key)
    if v is None and nullable:
        return
    if isinstance(v, bool) or not isinstance(v, int) or v < minimum:
        kind = f"an integer >= {minimum}" + (" or null" if nullable else "")
        raise _fail(key, v, f"expected {kind}")


def _str(cfg: dict, key: str, *, nullable: bool = False) -> None:
    v = cfg.get(key)
    if v is None and nullable:
        return
    if not isinstance(v, str) or not v:
        raise _fail(key, v, "expected a non-empty string" + (" or null" if nullable else ""))


def _str_list(cfg: dict, key: str, *, min_len: int = 1, max_len: int | None = None) -> None:
    v = cfg.get(key)
    ok = isinstance(v, list | tuple) and all(isinstance(s, str) and s for s in v) and len(v) >= min_len
    if not ok or (max_len is not None and len(v) > max_len):
        most = f" and at most {max_len}" if max_len else ""
        raise _fail(key, v, f"expected a list of at least {min_len}{most} column names")


def is_offline() -> bool:
    """Hugging Face's own switches, read at call time (datasets reads them once, at import)."""
    truthy = {"1", "ON", "YES", "TRUE"}
    return any(os.environ.get(k, "").upper() in truthy for k in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE"))


def hub_cached(path: str) -> bool:
    """Whether a hub dataset has left anything in the local caches (then offline loading may work)."""
    from datasets import config as dconfig
    from huggingface_hub import constants as hconstants

    candidates = (
        Path(dconfig.HF_DATASETS_CACHE) / path.replace("/", "___"),
        Path(hconstants.HF_HUB_CACHE) / ("datasets--" + path.replace("/", "--")),
    )
    return any(c.exists() for c in candidates)


def local_hint(cfg: dict) -> str:
    """How to run this task from local files, for error messages."""
    fam = FAMILIES[cfg["family"]]
    if fam.local_suffixes is None:
        return "task.local.train=/path/train_folder task.local.eval=/path/eval_folder (one sub-folder per class)"
    return (
        f"task.local.train=/path/train.jsonl task.local.eval=/path/dev.jsonl "
        f"(jsonl, json or csv with columns {', '.join(expected_columns(cfg))})"
    )


def expected_columns(cfg: dict) -> list[str]:
    fam = cfg["family"]
    if fam in ("classification", "regression"):
        return [*cfg["text_fields"], cfg["label_field"]]
    if fam == "squad":
        return [cfg["question_field"], cfg["context_field"], cfg["answers_field"]]
    if fam == "wikiqa":
        return [cfg["group_field"], cfg["question_field"], cfg["answer_field"], cfg["label_field"]]
    if fam == "lm":
        return [cfg["text_field"]]
    return [cfg["image_field"], cfg["label_field"]]


def _check_shape(cfg: dict, fam: Family, family: str) -> None:
    allowed = set(COMMON_REQUIRED) | set(COMMON_OPTIONAL) | set(fam.required) | set(fam.optional)
    unknown = sorted(set(cfg) - allowed)
    if unknown:
        listing = ", ".join(sorted(allowed))
        raise _fail(unknown[0], cfg[unknown[0]], f"unknown key for family {family}; allowed: {listing}")
    missing = [k for k in (*COMMON_REQUIRED, *fam.required) if k not in cfg]
    if missing:
        raise TaskError(f"task.{missing[0]} is missing (family {family} requires: {', '.join(fam.required)})")


def _check_values(cfg: dict, family: str) -> None:
    _str(cfg, "name")
    if not isinstance(cfg["greater_is_better"], bool):
        raise _fail("greater_is_better", cfg["greater_is_better"], "expected true or false")
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
                raise _fail("label_names", names, f"expected {cfg['num_labels']} distinct names (task.num_labels)")
    if family == "regression" and cfg["num_labels"] not in (None, 1):
        raise _fail("num_labels", cfg["num_labels"], "regression has a single output; allowed: 1 or null")
    if family in ("classification", "regression", "squad", "wikiqa"):
        _int(cfg, "max_length", minimum=2)
    if family == "squad":
        for k in ("question_field", "context_field", "answers_field", "input_template"):
            _str(cfg, k)
        template = cfg["input_template"]
        try:
            template.format(question="", context="")
        except (KeyError, IndexError, ValueError):
            raise _fail("input_template", template, "only {question} and {context} may appear in braces") from None
        for slot in ("{question}", "{context}"):
            if slot not in template:
                raise _fail("input_template", template, f"must contain {slot}")
        _int(cfg, "max_target_length")
        if not isinstance(cfg["generation"], Mapping):
            raise _fail("generation", cfg["generation"], "expected a mapping of generate() arguments")
    if family == "wikiqa":
        for k in ("question_field", "answer_field", "label_field", "group_field"):
            _str(cfg, k)
        if cfg["num_labels"] != 2:
            raise _fail("num_labels", cfg["num_labels"], "answer selection is yes/no; allowed: 2")
    if family == "lm":
        _str(cfg, "text_field")
        _int(cfg, "block_size", minimum=2)
        if not isinstance(cfg["eval_keep_remainder"], bool):
            raise _fail("eval_keep_remainder", cfg["eval_keep_remainder"], "expected true or false")
    if family == "vision":
        _check_vision_values(cfg)


def _check_vision_values(cfg: dict) -> None:
    _str(cfg, "image_field")
    _str(cfg, "label_field")
    _int(cfg, "num_labels", minimum=2)
    if cfg["interpolation"] not in INTERPOLATIONS:
        raise _fail("interpolation", cfg["interpolation"], f"allowed: {', '.join(INTERPOLATIONS)}")
    pct = cfg["eval_crop_pct"]
    if isinstance(pct, bool) or not isinstance(pct, int | float) or not 0 < pct <= 1:
        raise _fail("eval_crop_pct", pct, "expected a number in (0, 1]")
    aug = cfg["train_augment"]
    if aug is not None:
        allowed = {"scale", "ratio", "hflip"}
        if not isinstance(aug, Mapping) or not set(aug) <= allowed or "scale" not in aug:
            shape = "null or {scale: [lo, hi], ratio: [lo, hi] (optional), hflip: probability (optional)}"
            raise _fail("train_augment", aug, f"expected {shape}")
    for k in ("image_mean", "image_std"):
        v = cfg[k]
        if v is not None and (not isinstance(v, list | tuple) or len(v) != 3):
            raise _fail(k, v, "expected null (take it from the model) or three numbers")
    if not isinstance(cfg["verify_images"], bool):
        raise _fail("verify_images", cfg["verify_images"], "expected true or false")


def _check_metrics(cfg: dict, fam: Family, family: str) -> None:
    metrics = cfg["metrics"]
    if not isinstance(metrics, list | tuple) or not metrics or any(m not in fam.metrics for m in metrics):
        raise _fail("metrics", metrics, f"allowed for family {family}: {', '.join(fam.metrics)}")
    if cfg["primary_metric"] not in metrics:
        raise _fail("primary_metric", cfg["primary_metric"], f"must be one of task.metrics: {', '.join(metrics)}")


def _check_model(cfg: dict, fam: Family, family: str, model: ModelInfo) -> None:
    if model.family not in fam.models or (fam.needs_encoder_decoder and not model.is_encoder_decoder):
        why = {
            "squad": "generative QA needs an encoder-decoder (T5) model",
            "lm": "language modelling needs a causal LM (gpt2)",
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
                raise _fail(k, None, "the model gives no normalisation; set three numbers here")
        return
    key = "block_size" if family == "lm" else "max_length"
    if 0 < model.max_length < cfg[key]:  # 0: the model states no limit
        raise _fail(
            key,
            cfg[key],
            f"longer than the model accepts (model max_length={model.max_length}); "
            f"set task.{key}<={model.max_length} or pick a model with a longer max_length",
        )


def _check_paths(cfg: dict, fam: Family) -> None:
    local = cfg["local"]
    if not isinstance(local, Mapping) or not set(local) <= {"train", "eval"}:
        raise _fail("local", local, "expected {train: path|null, eval: path|{name: path}|null}")
    items: list[tuple[str, Any]] = [("local.train", local.get("train"))]
    ev = local.get("eval")
    items += [(f"local.eval.{k}", v) for k, v in ev.items()] if isinstance(ev, Mapping) else [("local.eval", ev)]
    for key, value in items:
        if value is None:
            continue
        if not isinstance(value, str | os.PathLike):
            raise _fail(key, value, "expected a path")
        path = Path(value).expanduser()
        if fam.local_suffixes is None:
            if not path.is_dir():
                raise _fail(key, str(value), "no such folder (expected one sub-folder of images per class)")
            continue
        if not path.is_file():
            raise _fail(key, str(value), "no such file")
        if path.suffix.lower() not in fam.local_suffixes:
            raise _fail(key, str(value), f"unsupported file type; allowed: {', '.join(fam.local_suffixes)}")


def _check_sources(cfg: dict, fam: Family, family: str) -> None:
    from camex.tasks import packaged

    local = cfg["local"]
    ev = local.get("eval")
    if fam.single_eval and isinstance(ev, Mapping) and len(ev) != 1:
        raise _fail("local.eval", ev, f"family {family} scores one eval split; give one path")
    if isinstance(ev, Mapping) and not ev:
        raise _fail("local.eval", ev, "expected a path or a non-empty {name: path} mapping")
    if family == "vision" and (local.get("train") is None) != (ev is None):
        raise TaskError(
            "task.local: image folders map class names to ids by their sorted sub-folders, so give both "
            "task.local.train and task.local.eval"
        )
    need_remote = local.get("train") is None or ev is None
    hub, pkg = cfg["hub"], cfg["packaged"]
    if hub is not None and pkg is not None:
        raise TaskError("task.hub and task.packaged are both set; a task reads one source (set the other to null)")
    if need_remote and hub is None and pkg is None:
        raise TaskError(f"task {cfg['name']} has no data source: set task.hub or task.packaged, or {local_hint(cfg)}")
    if pkg is not None:
        packaged.validate(cfg, family)
    if hub is not None:
        if not isinstance(hub, Mapping) or not isinstance(hub.get("path"), str) or not set(hub) <= {"path", "name"}:
            raise _fail("hub", hub, "expected {path: owner/dataset, name: config|null}")
        splits = cfg["splits"]
        if not isinstance(splits, Mapping) or not isinstance(splits.get("train"), str) or "eval" not in splits:
            raise _fail("splits", splits, "expected {train: split, eval: split | {name: split}}")
        sev = splits["eval"]
        named = isinstance(sev, Mapping) and sev and all(isinstance(v, str) for v in sev.values())
        if not (isinstance(sev, str) or named):
            raise _fail("splits.eval", sev, "expected a split name or a non-empty {name: split} mapping")
        if fam.single_eval and not isinstance(sev, str):
            raise _fail("splits.eval", sev, f"family {family} scores one eval split; give one split name")
        if need_remote and is_offline() and not hub_cached(hub["path"]):
            raise hub_unreachable(cfg, "offline mode: HF_HUB_OFFLINE or HF_DATASETS_OFFLINE is set")


def eval_names(cfg: dict) -> list[str] | None:
    """Names of the eval splits, or None for a single one (decided without loading anything)."""
    ev = cfg["local"].get("eval")
    if isinstance(ev, Mapping):
        return list(ev)
    if ev is None and cfg["hub"] is not None and isinstance(cfg["splits"]["eval"], Mapping):
        return list(cfg["splits"]["eval"])
    return None


def _check_primary_eval(cfg: dict) -> None:
    names, primary = eval_names(cfg), cfg["primary_eval"]
    if names is None:  # one eval split (e.g. MNLI from one local file): nothing to choose
        cfg["primary_eval"] = None
        return
    if primary not in names:
        raise _fail("primary_eval", primary, f"name the eval split that carries primary_metric: {', '.join(names)}")


def hub_unreachable(cfg: dict, why: str) -> TaskError:
    hub = cfg["hub"]
    label = hub["path"] + (f" ({hub['name']})" if hub.get("name") else "")
    return TaskError(
        f"task.hub {label}: the Hugging Face Hub is unreachable ({why}) and the data set is not cached; "
        f"pass local files instead: {local_hint(cfg)}"
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
        raise _fail("family", family, f"unknown task family; allowed: {', '.join(FAMILIES)}")
    fam = FAMILIES[family]
    cfg = {**COMMON_OPTIONAL, **fam.optional, **dict(task_cfg)}
    cfg.pop("defaults", None)  # Hydra's defaults list (the task's model / trainer), when a YAML is read raw
    if cfg["local"] is None:
        cfg["local"] = {}
    _check_shape(cfg, fam, family)
    _check_values(cfg, family)
    _check_metrics(cfg, fam, family)
    _check_model(cfg, fam, family, model)
    _check_paths(cfg, fam)
    _check_sources(cfg, fam, family)
    _check_primary_eval(cfg)
    cfg["local"] = {"train": cfg["local"].get("train"), "eval": cfg["local"].get("eval")}
    return cfg
