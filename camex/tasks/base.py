"""What a task hands the trainer: tokenised splits, a collator, a head and a metric.

Tasks know nothing of MoE: a task works with the dense model too. Each task family lives in its
own module and is chosen by `family` in the task config (`conf/task/*.yaml`).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Literal

Head = Literal["sequence_classification", "regression", "seq2seq", "causal_lm", "image_classification"]


@dataclass
class ModelInfo:
    """What a task needs to know about the model it feeds."""

    family: Literal["t5", "gpt2", "bert", "llama", "timm"]
    is_encoder_decoder: bool
    max_length: int  # longest input the task may produce
    image_size: int | None = None  # timm models: input resolution
    image_mean: tuple[float, ...] | None = None
    image_std: tuple[float, ...] | None = None


@dataclass(frozen=True)
class DataNeed:
    """What a task family asks of a data source (declared in `families`, read by `sources`)."""

    family: str
    columns: tuple[str, ...]  # the raw columns the family reads
    local_suffixes: tuple[str, ...] | None  # local file types it takes; None: image folders
    single_eval: bool  # its metric needs per-example side data, so one eval split only


@dataclass
class Prepared:
    train: Any  # a datasets.Dataset (or torch Dataset) of model inputs with labels
    eval: Any | dict[str, Any]  # one eval split, or named splits (MNLI matched / mismatched)
    collator: Callable | None
    head: Head
    num_labels: int
    # EvalPrediction-like (predictions, label_ids) -> {metric: value}; names without prefix
    compute_metrics: Callable[[Any], dict[str, float]]
    primary_metric: str  # a key of compute_metrics' result, e.g. "matthews", "f1", "perplexity"
    greater_is_better: bool
    preprocess_logits: Callable | None = None  # shrink logits before they are gathered
    generation: dict[str, Any] = field(default_factory=dict)  # seq2seq: generate() kwargs
    extra: dict[str, Any] = field(default_factory=dict)
