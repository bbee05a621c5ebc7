"""SQuAD document stride: a context longer than the input budget is read as overlapping windows.

As in the released QA scripts (length 384, stride 128, Hugging Face `doc_stride` semantics):
consecutive windows share `stride` context tokens, so an answer cut by one window's edge lies
whole in the next. Every window is one input "question: … context: <window>" of at most
`max_length` tokens; the question is repeated in each.

Training keeps the windows that contain the first gold answer (the first window when none does,
which is what truncation gave). Evaluation generates an answer for every window and keeps, per
question, the answer of the window the model is most confident in: the highest mean token
log-probability of its own generation (`select_answers`). Pure functions of token ids, strings and
scores: the scores come from the trainer, which knows the model.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any


def window_spans(n_tokens: int, budget: int, stride: int) -> list[tuple[int, int]]:
    """[start, end) token ranges of at most `budget` tokens covering `0..n_tokens`, each starting
    `budget - stride` tokens after the previous one (so neighbours overlap by `stride` tokens)."""
    if budget <= stride:
        raise ValueError(f"the context budget ({budget} tokens) must exceed the document stride ({stride})")
    spans, start = [], 0
    while True:
        end = min(start + budget, n_tokens)
        spans.append((start, end))
        if end >= n_tokens:
            return spans
        start += budget - stride


def encode_windows(
    question: str, context: str, *, template: str, tokenizer: Any, max_length: int, stride: int
) -> list[tuple[list[int], str]]:
    """(input ids, window context text) per window of `context`, each input at most `max_length`.

    The template's text around `{context}` (with the question filled in) is kept whole in every
    window; the context's tokens are cut into windows (a fast tokenizer's offsets map them back
    to characters, so each window's text is an exact slice of the context).
    """
    before, after = template.split("{context}", 1)
    head = tokenizer(before.format(question=question).rstrip(), add_special_tokens=False)["input_ids"]
    after = after.format(question=question).strip()
    tail = tokenizer(after, add_special_tokens=False)["input_ids"] if after else []
    enc = tokenizer(context, add_special_tokens=False, return_offsets_mapping=True)
    ids, offsets = enc["input_ids"], enc["offset_mapping"]
    first, last = _special_tokens(tokenizer)
    budget = max_length - len(head) - len(tail) - len(first) - len(last)
    out = []
    for start, end in window_spans(len(ids), budget, stride):
        text = context[offsets[start][0] : offsets[end - 1][1]] if end > start else ""
        out.append((first + head + ids[start:end] + tail + last, text))
    return out


def _special_tokens(tokenizer: Any) -> tuple[list[int], list[int]]:
    """The special tokens the tokenizer puts before and after a single text (T5: </s> after;
    BERT: [CLS] before, [SEP] after), read off how it encodes a probe word."""
    inner = tokenizer("a", add_special_tokens=False)["input_ids"]
    full = tokenizer("a")["input_ids"]
    at = next(i for i in range(len(full) - len(inner) + 1) if full[i : i + len(inner)] == inner)
    return full[:at], full[at + len(inner) :]


def training_windows(windows: list[tuple[list[int], str]], answer: str) -> list[list[int]]:
    """The windows whose context holds `answer`; the first window when none does."""
    holding = [ids for ids, text in windows if answer and answer in text]
    return holding or [windows[0][0]]


def select_answers(
    example_of: Sequence[int], answers: Sequence[str], scores: Sequence[float] | None, n_examples: int
) -> list[str]:
    """One answer per example from its windows' answers: the highest score (ties: the earliest
    window). Without scores, the first window's answer (what truncation gave)."""
    best: list[tuple[float, str] | None] = [None] * n_examples
    for i, (example, answer) in enumerate(zip(example_of, answers)):
        score = float(scores[i]) if scores is not None else 0.0
        if best[example] is None or score > best[example][0]:
            best[example] = (score, answer)
    missing = [i for i, b in enumerate(best) if b is None]
    if missing:
        raise ValueError(f"no window predicted for eval example {missing[0]}")
    return [b[1] for b in best]  # type: ignore[index]


def batch_encoder(cfg: dict, tokenizer: Any, *, train: bool):
    """A `datasets.map(batched=True, with_indices=True)` function: one row per kept window, with
    the index of its example in `example` (evaluation maps windows back to questions with it)."""
    from camex.tasks import columns

    q, c, a = cfg["question_field"], cfg["context_field"], cfg["answers_field"]
    options = dict(template=cfg["input_template"], tokenizer=tokenizer, max_length=cfg["max_length"])

    def encode(batch: dict[str, list], indices: list[int]) -> dict[str, list]:
        out: dict[str, list] = {"input_ids": [], "attention_mask": [], "labels": [], "example": []}
        for index, question, context, answers in zip(indices, batch[q], batch[c], batch[a]):
            answer = columns.answers(answers)[0].strip()
            windows = encode_windows(
                columns.text(question).strip(), columns.text(context).strip(), stride=cfg["doc_stride"], **options
            )
            inputs = training_windows(windows, answer) if train else [ids for ids, _ in windows]
            target = tokenizer(text_target=answer, truncation=True, max_length=cfg["max_target_length"])["input_ids"]
            for ids in inputs:
                out["input_ids"].append(ids)
                out["attention_mask"].append([1] * len(ids))
                out["labels"].append(target)
                out["example"].append(index)
        return out

    return encode
