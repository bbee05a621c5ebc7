"""Small helpers every task family shares: eval-split mapping, prediction unpacking, subsampling."""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

import numpy as np

from camex.tasks.columns import Spec
from camex.tasks.families import need
from camex.tasks.sources import data_seed, load_splits, subsample

MetricFn = Callable[[Any], dict[str, float]]  # EvalPrediction-like -> {metric: value}


def map_evals(fn: Callable[[Any], Any], evals: Any) -> Any:
    """Apply `fn` to the single eval split or to each named one."""
    return {k: fn(v) for k, v in evals.items()} if isinstance(evals, Mapping) else fn(evals)


def load_raw(cfg: dict, spec: Spec, seed: int) -> tuple[Any, Any]:
    """Raw (train, eval) rows of the spec's columns, from whichever source the config names."""
    return load_splits(cfg, spec, need(cfg), seed)


def load_subsampled(cfg: dict, spec: Spec, seed: int) -> tuple[Any, Any]:
    """Raw (train, eval) with max_train_samples / max_eval_samples applied."""
    train, evals = load_raw(cfg, spec, seed)
    s = data_seed(cfg, seed)
    train = subsample(train, cfg["max_train_samples"], s)
    evals = map_evals(lambda d: subsample(d, cfg["max_eval_samples"], s), evals)
    return train, evals


def unpack(eval_pred: Any) -> tuple[np.ndarray, np.ndarray | None]:
    """(predictions, label_ids) from an EvalPrediction or a (predictions, labels) pair."""
    if hasattr(eval_pred, "predictions"):
        preds, labels = eval_pred.predictions, eval_pred.label_ids
    else:
        preds, labels = eval_pred[0], eval_pred[1]
    if isinstance(preds, tuple | list):  # model outputs beyond logits (e.g. T5's encoder states)
        preds = preds[0]
    if isinstance(labels, tuple | list):
        labels = labels[0]
    return np.asarray(preds), None if labels is None else np.asarray(labels)


def first_logits(logits: Any, labels: Any) -> Any:
    """preprocess_logits_for_metrics: keep the logits, drop encoder states and caches before gathering."""
    return logits[0] if isinstance(logits, tuple | list) else logits


def extra(cfg: dict, train: Any, evals: Any, **more: Any) -> dict[str, Any]:
    sizes = map_evals(len, evals)
    base = {"name": cfg["name"], "primary_eval": cfg["primary_eval"], "num_train": len(train), "num_eval": sizes}
    return {**base, **more}
