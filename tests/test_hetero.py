"""Heterogeneous experts (camex.compose.hetero, MERGEME.md §2.3)."""

from __future__ import annotations

import copy

import pytest
import torch

from camex.compose.hetero import HeterogeneousMoE, zero_padded_mean

VOCAB = 40


def _llama(width: int = 16, depth: int = 2, vocab: int = VOCAB, seed: int = 0):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    cfg = LlamaConfig(
        vocab_size=vocab, hidden_size=width, intermediate_size=24, num_hidden_layers=depth, num_attention_heads=2,
        num_key_value_heads=1, max_position_embeddings=64, tie_word_embeddings=False,
    )  # fmt: skip
    return LlamaForCausalLM(cfg).eval()


def test_zero_padded_mean_golden():
    got = zero_padded_mean(
        [torch.tensor([[1.0, 2.0], [0.0, -2.0]]), torch.tensor([[3.0, 4.0, 5.0], [1.0, 1.0, 1.0]])], 3
    )
    assert torch.equal(got, torch.tensor([[2.0, 3.0, 2.5], [0.5, -0.5, 0.5]]))


@torch.no_grad()
def test_same_architecture_one_hot_equals_the_selected_expert():
    """Identical architectures, identity projections (same widths), identical embeddings and heads,
    one-hot weights: the MoE's logits are the selected expert's."""
    base = _llama()
    experts = []
    for i in range(3):
        e = copy.deepcopy(base)
        g = torch.Generator().manual_seed(i)
        for p in e.model.layers.parameters():
            p.add_(0.3 * torch.randn(p.shape, generator=g))
        experts.append(e)
    moe = HeterogeneousMoE(experts).eval()
    ids = torch.randint(0, VOCAB, (2, 9), generator=torch.Generator().manual_seed(5))
    for k, expert in enumerate(experts):
        w = torch.nn.functional.one_hot(torch.full((2,), k), 3).float()
        torch.testing.assert_close(
            moe(ids, expert_weights=w)["logits"], expert(input_ids=ids).logits, atol=1e-5, rtol=0
        )
    with torch.no_grad():  # a one-hot sequence router: top_k=1 from the router itself
        moe.router.weight.zero_()
        moe.router.weight[1] += moe.embed(ids).mean((0, 1))  # expert 1 scores highest for these sequences
    assert (moe.route(ids) == torch.tensor([[0.0, 1.0, 0.0]] * 2)).all()
    torch.testing.assert_close(moe(ids)["logits"], experts[1](input_ids=ids).logits, atol=1e-5, rtol=0)


def test_experts_of_two_depths_and_widths_train_and_other_vocabularies_are_refused():
    small, wide = _llama(width=16, depth=1, seed=1), _llama(width=32, depth=3, seed=2)
    moe = HeterogeneousMoE([small, wide], top_k=2)
    assert moe.width == 32 and moe.embed.weight.shape == (VOCAB, 32)
    torch.testing.assert_close(moe.embed.weight[:, 16:], wide.model.embed_tokens.weight[:, 16:] / 2)
    ids = torch.randint(0, VOCAB, (3, 8), generator=torch.Generator().manual_seed(6))
    out = moe(ids, labels=ids)
    out["loss"].backward()
    assert out["logits"].shape == (3, 8, VOCAB) and torch.isfinite(out["loss"])
    assert moe.router.weight.grad is not None and moe.proj_in[0].weight.grad is not None
    with pytest.raises(ValueError, match=r"vocabularies differ \(sizes \[40, 41\]\)"):
        HeterogeneousMoE([small, _llama(vocab=41)])
