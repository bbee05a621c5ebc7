"""What each task family needs: its head, the models it feeds, its config keys, metrics and columns.

A family declares; it does not load. `need(cfg)` turns a task config into the `DataNeed` a source
serves (`camex.tasks.sources`); `camex.tasks.config` checks a task config against its family.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from camex.tasks.base import DataNeed

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
        optional={"doc_stride": None},
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
        models=("gpt2", "llama"),
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


def expected_columns(cfg: dict) -> list[str]:
    """The raw columns a task reads, in the order its data files list them."""
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


def need(cfg: dict) -> DataNeed:
    fam = FAMILIES[cfg["family"]]
    return DataNeed(cfg["family"], tuple(expected_columns(cfg)), fam.local_suffixes, fam.single_eval)
