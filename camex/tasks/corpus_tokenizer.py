"""A byte-level BPE vocabulary trained on a packaged corpus's train split (never its eval split).

Why: a small model trained from scratch spends most of its step in the output layer when it
borrows a pretrained model's 30k-entry vocabulary (small GPT-2 on the Wikipedia sample: 1.9 s of a
2.3 s step at 1 thread). A vocabulary fitted to the corpus is a quarter of that size. Built by
`python scripts/build_tokenizer.py` into camex/assets/<name>/ (loaded as `model.tokenizer=asset:<name>`);
the build is deterministic, and tests/test_prereg.py rebuilds it and compares the files.
"""

from __future__ import annotations

from typing import Any

END_OF_TEXT = "<|endoftext|>"  # GPT-2's one special token: end of text, and padding for batches


def train_split_texts(task_cfg: dict[str, Any]) -> list[str]:
    """The text of every train row of a packaged task, split as `tasks.prepare` splits it."""
    from camex.tasks.packaged import SOURCES, _root, split_indices

    pkg = task_cfg["packaged"]
    src = SOURCES[pkg["source"]]
    rows, groups = src.read(_root(src.module), pkg.get("max_documents"))
    train_idx, _ = split_indices(len(rows), groups, pkg["eval_fraction"], task_cfg["data_seed"])
    field = task_cfg["text_field"]
    return [rows[i][field] for i in train_idx]


def train_bpe(texts: list[str], vocab_size: int) -> Any:
    """A GPT-2-style tokenizer (byte-level BPE, no prefix space, one special token) fitted to `texts`."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=[END_OF_TEXT], show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())  # fmt: skip
    tok.train_from_iterator(texts, trainer=trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token=END_OF_TEXT, eos_token=END_OF_TEXT,
                                   unk_token=END_OF_TEXT, pad_token=END_OF_TEXT)  # fmt: skip
