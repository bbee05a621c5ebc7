"""GLUE-style sentence and sentence-pair tasks: classification and regression (STS-B).

Like the Hugging Face run_glue example: one or two text columns per task, truncation to
`max_length`, dynamic padding by a collator. T5's tokenizer ends every input with </s>, which
T5ForSequenceClassification needs (it reads the decoder's final end-of-sequence state).

Prepared: columns input_ids, attention_mask (token_type_ids for BERT), labels (int64, or float32 for
regression); collator DataCollatorWithPadding; compute_metrics takes logits [N, C] (regression
[N, 1] or [N]) and label ids.
"""

from __future__ import annotations

from typing import Any

from camex.tasks import columns, metrics
from camex.tasks.base import ModelInfo, Prepared
from camex.tasks.common import MetricFn, extra, first_logits, load_subsampled, map_evals, unpack

CLASSIFICATION_METRICS = {
    "accuracy": metrics.accuracy,
    "f1": metrics.f1,
    "f1_macro": metrics.f1_macro,
    "matthews": metrics.matthews,
}
REGRESSION_METRICS = {"pearson": metrics.pearson, "spearman": metrics.spearman}


def spec(cfg: dict) -> dict[str, columns.Converter]:
    s: dict[str, columns.Converter] = {f: columns.text for f in cfg["text_fields"]}
    if cfg["family"] == "regression":
        s[cfg["label_field"]] = columns.float_label
    else:
        s[cfg["label_field"]] = columns.class_label(cfg["num_labels"], cfg["label_names"])
    return s


def tokenize(ds: Any, cfg: dict, tokenizer: Any, sp: dict[str, columns.Converter]) -> Any:
    fields, label = cfg["text_fields"], cfg["label_field"]
    to_label = sp[label]

    def encode(batch: dict[str, list]) -> dict[str, list]:
        texts = [[columns.text(v) for v in batch[f]] for f in fields]
        enc = dict(tokenizer(*texts, truncation=True, max_length=cfg["max_length"]))
        enc["labels"] = [to_label(v) for v in batch[label]]
        return enc

    out = ds.map(encode, batched=True, remove_columns=ds.column_names, desc=f"tokenise {cfg['name']}")
    if cfg["family"] == "regression":
        from datasets import Value

        out = out.cast_column("labels", Value("float32"))  # the MSE head needs float32 targets
    return out


def compute_metrics_for(cfg: dict) -> MetricFn:
    names = list(cfg["metrics"])
    regression = cfg["family"] == "regression"
    table = REGRESSION_METRICS if regression else CLASSIFICATION_METRICS

    def compute(eval_pred: Any) -> dict[str, float]:
        preds, labels = unpack(eval_pred)
        if regression:
            preds = preds.reshape(len(preds), -1)[:, 0]
        elif preds.ndim == 2:
            preds = preds.argmax(-1)
        return {m: table[m](preds, labels) for m in names}

    return compute


def prepare(cfg: dict, *, tokenizer: Any, model: ModelInfo, seed: int) -> Prepared:
    from transformers import DataCollatorWithPadding

    sp = spec(cfg)
    raw_train, raw_eval = load_subsampled(cfg, sp, seed)
    train = tokenize(raw_train, cfg, tokenizer, sp)
    evals = map_evals(lambda d: tokenize(d, cfg, tokenizer, sp), raw_eval)
    regression = cfg["family"] == "regression"
    return Prepared(
        train=train,
        eval=evals,
        collator=DataCollatorWithPadding(tokenizer),
        head="regression" if regression else "sequence_classification",
        num_labels=1 if regression else cfg["num_labels"],
        compute_metrics=compute_metrics_for(cfg),
        primary_metric=cfg["primary_metric"],
        greater_is_better=cfg["greater_is_better"],
        preprocess_logits=first_logits,
        extra=extra(cfg, train, evals, label_names=cfg.get("label_names")),
    )
