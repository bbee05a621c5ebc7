"""Tiny real architectures (random init, dropout off) and batches for them."""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")

# Under pytest-xdist (`-n N`) the workers share the machine's cores: each gets cores / N threads,
# itself and the runs it starts as subprocesses (they inherit OMP_NUM_THREADS), so N workers never
# oversubscribe the cores, where OpenMP's spinning threads wait on descheduled ones (docs/gpu_path.md).
_WORKERS = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1"))
if _WORKERS > 1:
    os.environ.setdefault("OMP_NUM_THREADS", str(max(1, (os.cpu_count() or 1) // _WORKERS)))
    torch.set_num_threads(int(os.environ["OMP_NUM_THREADS"]))

VOCAB = 50


@dataclass
class Tiny:
    make: Callable[[], torch.nn.Module]
    batch: Callable[[torch.Generator], dict]  # keyword inputs, labels included
    family: str

    def loss(self, model, batch) -> torch.Tensor:
        out = model(**batch) if self.family != "timm" else model(batch["x"])
        if self.family == "timm":
            aux = model.camex_aux_loss if getattr(model, "camex_aux_loss", None) is not None else 0.0
            return torch.nn.functional.cross_entropy(out, batch["labels"]) + aux
        return out.loss

    def outputs(self, model, batch) -> torch.Tensor:
        if self.family == "timm":
            return model(batch["x"])
        return model(**batch).logits


def _tokens(g: torch.Generator, batch: int = 3, length: int = 10) -> dict:
    ids = torch.randint(1, VOCAB, (batch, length), generator=g)
    mask = torch.ones(batch, length, dtype=torch.long)
    mask[1, length - 3 :] = 0  # one padded sequence
    return {"input_ids": ids, "attention_mask": mask}


def t5(gated: bool = False, classify: bool = False) -> torch.nn.Module:
    from transformers import T5Config, T5ForConditionalGeneration, T5ForSequenceClassification

    cfg = T5Config(
        vocab_size=VOCAB,
        d_model=16,
        d_kv=4,
        d_ff=24,
        num_layers=2,
        num_decoder_layers=2,
        num_heads=2,
        dropout_rate=0.0,
        decoder_start_token_id=0,
        eos_token_id=1,
        pad_token_id=0,
        feed_forward_proj="gated-gelu" if gated else "relu",
        num_labels=3,
    )
    return (T5ForSequenceClassification if classify else T5ForConditionalGeneration)(cfg)


def gpt2() -> torch.nn.Module:
    from transformers import GPT2Config, GPT2LMHeadModel

    cfg = GPT2Config(
        vocab_size=VOCAB, n_embd=16, n_layer=2, n_head=2, n_positions=64, bos_token_id=0, eos_token_id=0,
        resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0,
    )  # fmt: skip
    return GPT2LMHeadModel(cfg)


def bert() -> torch.nn.Module:
    from transformers import BertConfig, BertForSequenceClassification

    cfg = BertConfig(
        vocab_size=VOCAB, hidden_size=16, num_hidden_layers=2, num_attention_heads=2, intermediate_size=24,
        hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0, max_position_embeddings=64, num_labels=3,
    )  # fmt: skip
    return BertForSequenceClassification(cfg)


def vit() -> torch.nn.Module:
    import timm

    return timm.create_model(
        "vit_tiny_patch16_224", pretrained=False, img_size=32, patch_size=8, embed_dim=16, depth=2, num_heads=2,
        num_classes=3, drop_path_rate=0.0,
    )  # fmt: skip


def swin() -> torch.nn.Module:
    import timm

    return timm.create_model(
        "swin_tiny_patch4_window7_224", pretrained=False, img_size=32, patch_size=4, embed_dim=8, depths=(1, 1),
        num_heads=(1, 2), window_size=4, num_classes=3, drop_path_rate=0.0,
    )  # fmt: skip


def _seq2seq_batch(g):
    b = _tokens(g)
    b["labels"] = torch.randint(1, VOCAB, (3, 5), generator=g)
    return b


def _cls_batch(g):
    return {**_tokens(g), "labels": torch.randint(0, 3, (3,), generator=g)}


def _t5_cls_batch(g):
    """T5 classifies on the decoder's final end-of-sequence state, so every row needs one."""
    b = _cls_batch(g)
    ids, mask = b["input_ids"].clamp(min=2), b["attention_mask"]
    last = mask.sum(1) - 1
    ids[torch.arange(ids.shape[0]), last] = 1
    b["input_ids"] = ids
    return b


def _lm_batch(g):
    b = _tokens(g)
    b["labels"] = b["input_ids"].masked_fill(b["attention_mask"] == 0, -100)
    return b


def _image_batch(g):
    return {"x": torch.randn(2, 3, 32, 32, generator=g), "labels": torch.randint(0, 3, (2,), generator=g)}


TINY = {
    "t5": Tiny(t5, _seq2seq_batch, "t5"),
    "t5_gated": Tiny(lambda: t5(gated=True), _seq2seq_batch, "t5"),
    "t5_cls": Tiny(lambda: t5(classify=True), _t5_cls_batch, "t5"),
    "gpt2": Tiny(gpt2, _lm_batch, "gpt2"),
    "bert": Tiny(bert, _cls_batch, "bert"),
    "vit": Tiny(vit, _image_batch, "timm"),
    "swin": Tiny(swin, _image_batch, "timm"),
}


@pytest.fixture
def gen() -> torch.Generator:
    return torch.Generator().manual_seed(0)


@pytest.fixture(params=[1, 3], ids=["1-thread", "3-threads"])
def threads(request):
    """The compiled CPU kernels' tests on one thread, and on three: the work split across an OpenMP
    region (more threads than this machine's cores is still a correct split)."""
    before = torch.get_num_threads()
    torch.set_num_threads(request.param)
    yield request.param
    torch.set_num_threads(before)
