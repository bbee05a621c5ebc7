"""Question answering: SQuAD v1.1 as text generation, WikiQA as yes/no answer selection.

SQuAD (family `squad`, T5 only). Input `input_template` filled with the question and the context
("question: … context: …"), at most `max_length` tokens. With `doc_stride` (the released 128) a
longer context is read as overlapping windows and each question's answer is the generation of its
most confident window (camex/tasks/qa_windows.py); with `doc_stride: null` the input is truncated
from the right, so an answer in a cut tail cannot be produced. Target: the
first gold answer, truncated to `max_target_length`. Eval generates an answer per example and
scores EM / F1 (×100, official v1.1 normalisation) against every gold answer, keeping the max.
Prepared: columns input_ids, attention_mask, labels (target ids; the collator pads labels with
-100); collator DataCollatorForSeq2Seq; compute_metrics takes *generated token ids* [N, T]
(pad or -100 padding), i.e. evaluate with predict_with_generate and `Prepared.generation`.

WikiQA (family `wikiqa`, any text model). Each (question, candidate sentence) pair is one example
of the yes/no question "is this a good answer?", encoded as a sentence pair and classified by a
2-way sequence-classification head (label 1 = yes). A head rather than generated "yes"/"no" works
with every text model and matches how GLUE is framed. Accuracy is over pairs; MAP / MRR rank each
question's candidates by logit(yes) − logit(no), over questions with at least one correct answer.
Prepared: columns input_ids, attention_mask, labels; DataCollatorWithPadding; compute_metrics
takes logits [N, 2] in eval-set order (it keeps the question ids of the eval set).
"""

from __future__ import annotations

from typing import Any

import numpy as np

from camex.tasks import columns, metrics, qa_windows
from camex.tasks.base import ModelInfo, Prepared
from camex.tasks.common import MetricFn, extra, first_logits, load_subsampled, unpack


def squad_spec(cfg: dict) -> dict[str, columns.Converter]:
    return {
        cfg["question_field"]: columns.text,
        cfg["context_field"]: columns.text,
        cfg["answers_field"]: columns.answers,
    }


def _squad_tokenize(ds: Any, cfg: dict, tokenizer: Any, *, train: bool = True) -> Any:
    if cfg.get("doc_stride") is not None:  # one row per window, with its example's index
        encode = qa_windows.batch_encoder(cfg, tokenizer, train=train)
        desc = f"windows {cfg['name']}"
        return ds.map(encode, batched=True, with_indices=True, remove_columns=ds.column_names, desc=desc)
    q, c, a = cfg["question_field"], cfg["context_field"], cfg["answers_field"]
    template = cfg["input_template"]

    def encode(batch: dict[str, list]) -> dict[str, list]:
        inputs = [
            template.format(question=columns.text(qq).strip(), context=columns.text(cc).strip())
            for qq, cc in zip(batch[q], batch[c])
        ]
        enc = dict(tokenizer(inputs, truncation=True, max_length=cfg["max_length"]))
        targets = [columns.answers(v)[0].strip() for v in batch[a]]
        enc["labels"] = tokenizer(text_target=targets, truncation=True, max_length=cfg["max_target_length"])[
            "input_ids"
        ]
        return enc

    return ds.map(encode, batched=True, remove_columns=ds.column_names, desc=f"tokenise {cfg['name']}")


def squad_metrics_for(
    golds: list[list[str]], tokenizer: Any, names: list[str], example_of: list[int] | None = None
) -> MetricFn:
    """`example_of`: with document stride, the example of each eval window; predictions are then
    (generated ids, scores [N, 1]) per window, and the best-scored window answers its question."""
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0

    def compute(eval_pred: Any) -> dict[str, float]:
        preds, _ = unpack(eval_pred)
        if preds.ndim != 2 or not np.issubdtype(preds.dtype, np.integer):
            raise ValueError(
                "squad metrics need generated token ids [N, T]; evaluate with predict_with_generate "
                f"(got predictions of shape {preds.shape}, dtype {preds.dtype})"
            )
        inputs = len(example_of or golds)
        if len(preds) != inputs:
            raise ValueError(f"{len(preds)} predictions for {inputs} eval inputs (order must be kept)")
        texts = tokenizer.batch_decode(np.where(preds < 0, pad, preds), skip_special_tokens=True)
        if example_of is not None:
            raw = getattr(eval_pred, "predictions", None)
            raw = raw if raw is not None else eval_pred[0]
            scores = np.asarray(raw[1]).reshape(-1) if isinstance(raw, tuple | list) else None
            texts = qa_windows.select_answers(example_of, texts, scores, len(golds))
        scores = metrics.squad_scores([t.strip() for t in texts], golds)
        return {m: scores[m] for m in names}

    return compute


def prepare_squad(cfg: dict, *, tokenizer: Any, model: ModelInfo, seed: int) -> Prepared:
    from transformers import DataCollatorForSeq2Seq

    raw_train, raw_eval = load_subsampled(cfg, squad_spec(cfg), seed)
    golds = [columns.answers(v) for v in raw_eval[cfg["answers_field"]]]
    train, evals = _squad_tokenize(raw_train, cfg, tokenizer), _squad_tokenize(raw_eval, cfg, tokenizer, train=False)
    example_of = evals["example"] if "example" in evals.column_names else None
    train, evals = (d.remove_columns("example") if "example" in d.column_names else d for d in (train, evals))
    return Prepared(
        train=train,
        eval=evals,
        collator=DataCollatorForSeq2Seq(tokenizer, label_pad_token_id=-100),
        head="seq2seq",
        num_labels=0,
        compute_metrics=squad_metrics_for(golds, tokenizer, list(cfg["metrics"]), example_of),
        primary_metric=cfg["primary_metric"],
        greater_is_better=cfg["greater_is_better"],
        preprocess_logits=None,  # predictions are generated ids already
        generation=dict(cfg["generation"]),
        extra=extra(cfg, train, evals, score_generations=example_of is not None),
    )


def wikiqa_spec(cfg: dict) -> dict[str, columns.Converter]:
    return {
        cfg["group_field"]: columns.group_id,
        cfg["question_field"]: columns.text,
        cfg["answer_field"]: columns.text,
        cfg["label_field"]: columns.class_label(2, None),
    }


def _wikiqa_tokenize(ds: Any, cfg: dict, tokenizer: Any) -> Any:
    q, a, y = cfg["question_field"], cfg["answer_field"], cfg["label_field"]
    to_label = columns.class_label(2, None)

    def encode(batch: dict[str, list]) -> dict[str, list]:
        qs, ans = [columns.text(v) for v in batch[q]], [columns.text(v) for v in batch[a]]
        enc = dict(tokenizer(qs, ans, truncation=True, max_length=cfg["max_length"]))
        enc["labels"] = [to_label(v) for v in batch[y]]
        return enc

    return ds.map(encode, batched=True, remove_columns=ds.column_names, desc=f"tokenise {cfg['name']}")


def wikiqa_metrics_for(groups: list[str], names: list[str]) -> MetricFn:
    def compute(eval_pred: Any) -> dict[str, float]:
        logits, labels = unpack(eval_pred)
        if logits.ndim != 2 or logits.shape[1] != 2:
            raise ValueError(f"wikiqa metrics need logits [N, 2], got shape {logits.shape}")
        if len(logits) != len(groups):
            raise ValueError(f"{len(logits)} predictions for {len(groups)} eval pairs (order must be kept)")
        scores = logits[:, 1] - logits[:, 0]  # monotone in P(yes)
        out = {
            "accuracy": lambda: metrics.accuracy(logits.argmax(-1), labels),
            "map": lambda: metrics.mean_average_precision(groups, scores, labels),
            "mrr": lambda: metrics.mean_reciprocal_rank(groups, scores, labels),
        }
        return {m: out[m]() for m in names}

    return compute


def prepare_wikiqa(cfg: dict, *, tokenizer: Any, model: ModelInfo, seed: int) -> Prepared:
    from transformers import DataCollatorWithPadding

    raw_train, raw_eval = load_subsampled(cfg, wikiqa_spec(cfg), seed)
    groups = [columns.group_id(v) for v in raw_eval[cfg["group_field"]]]
    train, evals = _wikiqa_tokenize(raw_train, cfg, tokenizer), _wikiqa_tokenize(raw_eval, cfg, tokenizer)
    return Prepared(
        train=train,
        eval=evals,
        collator=DataCollatorWithPadding(tokenizer),
        head="sequence_classification",
        num_labels=2,
        compute_metrics=wikiqa_metrics_for(groups, list(cfg["metrics"])),
        primary_metric=cfg["primary_metric"],
        greater_is_better=cfg["greater_is_better"],
        preprocess_logits=first_logits,
        extra=extra(cfg, train, evals),
    )


def prepare(cfg: dict, *, tokenizer: Any, model: ModelInfo, seed: int) -> Prepared:
    fn = prepare_squad if cfg["family"] == "squad" else prepare_wikiqa
    return fn(cfg, tokenizer=tokenizer, model=model, seed=seed)
