"""Causal language modelling (GPT-2 on WikiText): concatenate, chunk into blocks, score perplexity.

All rows of a split are tokenised without special tokens and concatenated in order (WikiText raw
rows carry their own newlines), then cut into non-overlapping blocks of `block_size` tokens. The
train split drops the last partial block (as run_clm does); the eval split keeps it when
`eval_keep_remainder` is true, so every eval token is scored. `max_*_samples` count blocks.

Perplexity is exp(total NLL / total predicted tokens) over the whole eval split, a token-weighted
mean: `preprocess_logits` reduces each block's logits to (sum of token NLL, token count) right
away, so the [N, T, V] logits are never accumulated, and compute_metrics sums those pairs.
Prepared: column input_ids (blocks); collator `BlockCollator` adds attention_mask and labels
(= input_ids, -100 on padding; the model shifts them); compute_metrics takes predictions [N, 2].
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

from camex.tasks import columns, metrics
from camex.tasks.base import ModelInfo, Prepared
from camex.tasks.common import MetricFn, extra, load_raw, map_evals, unpack
from camex.tasks.errors import TaskError
from camex.tasks.sources import data_seed, subsample


@dataclass
class BlockCollator:
    """Stack blocks; pad a short final block on the right (masked out of attention and loss)."""

    pad_token_id: int

    def __call__(self, features: list[dict[str, Any]]) -> dict[str, Any]:
        import torch

        seqs = [torch.as_tensor(f["input_ids"], dtype=torch.long) for f in features]
        width = max(len(s) for s in seqs)
        input_ids = torch.full((len(seqs), width), self.pad_token_id, dtype=torch.long)
        mask = torch.zeros((len(seqs), width), dtype=torch.long)
        for i, s in enumerate(seqs):
            input_ids[i, : len(s)] = s
            mask[i, : len(s)] = 1
        return {"input_ids": input_ids, "attention_mask": mask, "labels": input_ids.masked_fill(mask == 0, -100)}


def token_nll(logits: Any, labels: Any) -> Any:
    """preprocess_logits_for_metrics: [B, T, V] logits -> [B, 2] (sum of next-token NLL, token count)."""
    import torch
    import torch.nn.functional as F

    if isinstance(logits, tuple | list):
        logits = logits[0]
    targets = labels[:, 1:]
    out = torch.zeros((logits.shape[0], 2), dtype=torch.float32, device=logits.device)
    for i in range(logits.shape[0]):  # one row at a time: a float32 copy of [T, V] instead of [B, T, V]
        nll = F.cross_entropy(logits[i, :-1].float(), targets[i], ignore_index=-100, reduction="sum")
        out[i, 0], out[i, 1] = nll, (targets[i] != -100).sum()
    return out


def compute_metrics_for(names: list[str]) -> MetricFn:
    def compute(eval_pred: Any) -> dict[str, float]:
        preds, _ = unpack(eval_pred)
        if preds.ndim != 2 or preds.shape[1] != 2:
            raise ValueError(f"lm metrics need [N, 2] (nll sum, tokens) from token_nll, got shape {preds.shape}")
        ppl = metrics.perplexity(preds[:, 0], preds[:, 1])
        values = {"perplexity": ppl, "nll": float(np.log(ppl))}  # nll: mean token NLL in nats
        return {m: values[m] for m in names}

    return compute


def blocks(ds: Any, cfg: dict, tokenizer: Any, keep_remainder: bool, where: str) -> Any:
    """Tokenise a text split and regroup all its tokens into rows of `block_size`."""
    import pyarrow as pa
    import pyarrow.compute as pc
    from datasets import Dataset

    field, size = cfg["text_field"], cfg["block_size"]

    def encode(batch: dict[str, list]) -> dict[str, list]:
        texts = [columns.text(t) for t in batch[field]]
        return {"input_ids": tokenizer(texts, add_special_tokens=False)["input_ids"]}

    tok = ds.map(encode, batched=True, remove_columns=ds.column_names, desc=f"tokenise {cfg['name']}")
    ids = pc.list_flatten(tok.with_format("arrow")["input_ids"]).to_numpy()
    full, rest = divmod(len(ids), size)
    lengths = [size] * full + ([rest] if keep_remainder and rest >= 2 else [])  # 1 token predicts nothing
    if not lengths:
        raise TaskError(
            f"task {cfg['name']} {where}: {len(ids)} tokens, fewer than task.block_size={size}; "
            "give more text or a smaller block_size"
        )
    offsets = np.concatenate([[0], np.cumsum(lengths)]).astype(np.int64)
    if offsets[-1] >= 2**31:
        raise TaskError(f"task {cfg['name']} {where}: {offsets[-1]} tokens; more than this loader handles (2**31)")
    values = pa.array(ids[: offsets[-1]].astype(np.int32))
    return Dataset(pa.table({"input_ids": pa.ListArray.from_arrays(pa.array(offsets, pa.int32()), values)}))


def prepare(cfg: dict, *, tokenizer: Any, model: ModelInfo, seed: int) -> Prepared:
    raw_train, raw_eval = load_raw(cfg, {cfg["text_field"]: columns.text}, seed)
    s = data_seed(cfg, seed)
    train = subsample(blocks(raw_train, cfg, tokenizer, False, "train"), cfg["max_train_samples"], s)
    evals = map_evals(
        lambda d: subsample(blocks(d, cfg, tokenizer, cfg["eval_keep_remainder"], "eval"), cfg["max_eval_samples"], s),
        raw_eval,
    )
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    return Prepared(
        train=train,
        eval=evals,
        collator=BlockCollator(pad if pad is not None else 0),  # any id: padding is masked and unlabelled
        head="causal_lm",
        num_labels=0,
        compute_metrics=compute_metrics_for(list(cfg["metrics"])),
        primary_metric=cfg["primary_metric"],
        greater_is_better=cfg["greater_is_better"],
        preprocess_logits=token_nll,
        extra=extra(cfg, train, evals, block_size=cfg["block_size"]),
    )
