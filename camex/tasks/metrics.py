"""Pure metric functions over numpy arrays (scikit-learn / scipy). No torch, no datasets.

Every function returns a plain float. SQuAD scores are ×100 like the official v1.1 script; the
others are fractions in [0, 1] (or correlations in [-1, 1]), as GLUE reports them before ×100.
"""

from __future__ import annotations

import math
import re
import string
from collections import Counter
from collections.abc import Sequence

import numpy as np


def accuracy(preds: np.ndarray, labels: np.ndarray) -> float:
    preds, labels = np.asarray(preds), np.asarray(labels)
    return float((preds == labels).mean()) if labels.size else 0.0


def f1(preds: np.ndarray, labels: np.ndarray) -> float:
    """Binary F1 of the positive class 1 (MRPC, QQP)."""
    from sklearn.metrics import f1_score

    return float(f1_score(labels, preds, average="binary", pos_label=1, zero_division=0.0))


def f1_macro(preds: np.ndarray, labels: np.ndarray) -> float:
    from sklearn.metrics import f1_score

    return float(f1_score(labels, preds, average="macro", zero_division=0.0))


def matthews(preds: np.ndarray, labels: np.ndarray) -> float:
    """Matthews correlation (CoLA); 0 when undefined (a constant predictor), as scikit-learn does."""
    from sklearn.metrics import matthews_corrcoef

    return float(matthews_corrcoef(labels, preds))


def _correlation(fn, preds: np.ndarray, labels: np.ndarray) -> float:
    preds, labels = np.asarray(preds, dtype=np.float64), np.asarray(labels, dtype=np.float64)
    # A constant predictor (common at step 0) has no defined correlation; report 0 like matthews does
    # rather than NaN, which would poison best-checkpoint selection.
    if preds.size < 2 or np.ptp(preds) == 0 or np.ptp(labels) == 0:
        return 0.0
    return float(fn(preds, labels)[0])


def pearson(preds: np.ndarray, labels: np.ndarray) -> float:
    from scipy.stats import pearsonr

    return _correlation(pearsonr, preds, labels)


def spearman(preds: np.ndarray, labels: np.ndarray) -> float:
    from scipy.stats import spearmanr

    return _correlation(spearmanr, preds, labels)


# --- SQuAD v1.1 (official answer normalisation) ---------------------------------------------------

_ARTICLES = re.compile(r"\b(a|an|the)\b")
_PUNCT = set(string.punctuation)


def normalize_answer(text: str) -> str:
    """Lower-case, drop punctuation, drop the articles a/an/the, collapse whitespace (in that order)."""
    text = "".join(ch for ch in text.lower() if ch not in _PUNCT)
    text = _ARTICLES.sub(" ", text)
    return " ".join(text.split())


def squad_exact(prediction: str, gold: str) -> float:
    return float(normalize_answer(prediction) == normalize_answer(gold))


def squad_token_f1(prediction: str, gold: str) -> float:
    pred_tokens, gold_tokens = normalize_answer(prediction).split(), normalize_answer(gold).split()
    same = sum((Counter(pred_tokens) & Counter(gold_tokens)).values())
    if same == 0:  # v1.1 behaviour: two empty answers also score 0
        return 0.0
    precision, recall = same / len(pred_tokens), same / len(gold_tokens)
    return 2 * precision * recall / (precision + recall)


def squad_scores(predictions: Sequence[str], golds: Sequence[Sequence[str]]) -> dict[str, float]:
    """EM and F1 ×100, each the max over an example's gold answers, averaged over examples."""
    if len(predictions) != len(golds):
        raise ValueError(f"{len(predictions)} predictions for {len(golds)} examples")
    if not golds:
        return {"exact_match": 0.0, "f1": 0.0}
    em = [max(squad_exact(p, g) for g in gs) for p, gs in zip(predictions, golds)]
    f1s = [max(squad_token_f1(p, g) for g in gs) for p, gs in zip(predictions, golds)]
    return {"exact_match": 100.0 * float(np.mean(em)), "f1": 100.0 * float(np.mean(f1s))}


# --- language modelling ------------------------------------------------------------------------


def perplexity(nll_sums: np.ndarray, token_counts: np.ndarray) -> float:
    """exp(total NLL / total tokens): the token-weighted mean, not a mean of per-block perplexities."""
    total = float(np.sum(np.asarray(token_counts, dtype=np.float64)))
    if total == 0:
        return float("nan")
    return math.exp(float(np.sum(np.asarray(nll_sums, dtype=np.float64))) / total)


# --- answer selection (WikiQA) -------------------------------------------------------------------


def _ranked_groups(groups: Sequence, scores: np.ndarray, labels: np.ndarray):
    """Per question with at least one correct candidate: its labels ordered by descending score.

    Questions without a correct answer are left out, the usual WikiQA convention (they have no rank).
    Ties keep the data order (stable sort) so the result is deterministic.
    """
    scores, labels = np.asarray(scores, dtype=np.float64), np.asarray(labels)
    by_group: dict = {}
    for i, g in enumerate(groups):
        by_group.setdefault(g, []).append(i)
    for idx in by_group.values():
        idx = np.asarray(idx)
        rel = labels[idx] > 0
        if rel.any():
            yield rel[np.argsort(-scores[idx], kind="stable")]


def mean_average_precision(groups: Sequence, scores: np.ndarray, labels: np.ndarray) -> float:
    aps = []
    for rel in _ranked_groups(groups, scores, labels):
        hits = np.cumsum(rel)
        ranks = np.flatnonzero(rel) + 1
        aps.append(float(np.mean(hits[rel] / ranks)))
    return float(np.mean(aps)) if aps else 0.0


def mean_reciprocal_rank(groups: Sequence, scores: np.ndarray, labels: np.ndarray) -> float:
    rrs = [1.0 / (int(np.argmax(rel)) + 1) for rel in _ranked_groups(groups, scores, labels)]
    return float(np.mean(rrs)) if rrs else 0.0
