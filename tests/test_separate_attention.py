"""Separate attention (camex.compose.separate): each selected expert runs its own blocks, outputs
mixed per layer; one KV cache per selected expert in generation."""

from __future__ import annotations

import copy

import pytest
import torch

from camex.compose.heuristic import set_sequence_weights
from camex.compose.separate import block_list, separate_attention

VOCAB = 40


def _llama():
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(
        vocab_size=VOCAB, hidden_size=16, intermediate_size=24, num_hidden_layers=2, num_attention_heads=2,
        num_key_value_heads=1, max_position_embeddings=64, tie_word_embeddings=False,
    )  # fmt: skip
    return LlamaForCausalLM(cfg)


def _gpt2():
    from transformers import GPT2Config, GPT2LMHeadModel

    cfg = GPT2Config(vocab_size=VOCAB, n_embd=16, n_layer=2, n_head=2, n_positions=64, resid_pdrop=0.0,
                     embd_pdrop=0.0, attn_pdrop=0.0)  # fmt: skip
    return GPT2LMHeadModel(cfg)


@torch.no_grad()
def _experts(make, n: int = 3):
    """A base and `n` experts that differ from it in every block weight (attention and FFN) only,
    so the base's embeddings, final norm and head are each expert's."""
    torch.manual_seed(0)
    base = make().eval()
    experts = []
    for i in range(n):
        e = copy.deepcopy(base)
        g = torch.Generator().manual_seed(10 + i)
        for p in block_list(e).parameters():
            p.add_(0.3 * torch.randn(p.shape, generator=g))
        experts.append(e)
    return base, experts


def _greedy(model, ids, steps: int = 6) -> torch.Tensor:
    return model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=steps, do_sample=False,
                          min_new_tokens=steps, pad_token_id=0)  # fmt: skip


@pytest.mark.parametrize("make", [_llama, _gpt2], ids=["llama", "gpt2"])
def test_one_selected_expert_equals_its_dense_model_with_kv_cache(make):
    base, experts = _experts(make)
    moe = separate_attention(copy.deepcopy(base), experts).eval()
    ids = torch.randint(1, VOCAB, (2, 7), generator=torch.Generator().manual_seed(3))
    for k, expert in enumerate(experts):
        set_sequence_weights(moe, torch.nn.functional.one_hot(torch.full((2,), k), 3).float())
        with torch.no_grad():
            assert torch.equal(moe(input_ids=ids).logits, expert(input_ids=ids).logits)
            # step by step through the cache: the prompt, then one token at a time
            a, b = moe(input_ids=ids[:, :4], use_cache=True), expert(input_ids=ids[:, :4], use_cache=True)
            for t in range(4, 7):
                a = moe(input_ids=ids[:, t : t + 1], past_key_values=a.past_key_values, use_cache=True)
                b = expert(input_ids=ids[:, t : t + 1], past_key_values=b.past_key_values, use_cache=True)
                assert torch.equal(a.logits, b.logits)
        assert torch.equal(_greedy(moe, ids), _greedy(expert, ids))
    # the experts really differ, so equality above is the selected expert's own output
    with torch.no_grad():
        assert (experts[0](input_ids=ids).logits - experts[1](input_ids=ids).logits).abs().max() > 1e-2


@pytest.mark.parametrize("make", [_llama, _gpt2], ids=["llama", "gpt2"])
def test_each_sequence_runs_its_experts_with_their_own_caches(make):
    """Per-sequence weights in one batch; two running experts each keep a KV cache: the same expert
    twice at 0.5/0.5 must give that expert's generation (a shared or missing cache would not)."""
    base, experts = _experts(make, n=2)
    ids = torch.randint(1, VOCAB, (2, 5), generator=torch.Generator().manual_seed(4))
    moe = separate_attention(copy.deepcopy(base), [experts[0], experts[1]]).eval()
    set_sequence_weights(moe, torch.tensor([[1.0, 0.0], [0.0, 1.0]]))
    got = _greedy(moe, ids)
    assert torch.equal(got[0], _greedy(experts[0], ids[:1])[0]) and torch.equal(got[1], _greedy(experts[1], ids[1:])[0])
    twice = separate_attention(copy.deepcopy(base), [experts[1], copy.deepcopy(experts[1])]).eval()
    set_sequence_weights(twice, torch.full((2, 2), 0.5))
    with torch.no_grad():
        torch.testing.assert_close(twice(input_ids=ids).logits, experts[1](input_ids=ids).logits, atol=1e-5, rtol=0)
    assert torch.equal(_greedy(twice, ids), _greedy(experts[1], ids))


def test_separate_attention_refuses_other_depths():
    base, experts = _experts(_llama, n=1)
    deeper = _llama()
    deeper.model.layers.append(copy.deepcopy(deeper.model.layers[0]))
    with pytest.raises(ValueError, match="expert 1 has 3 blocks where the model has 2"):
        separate_attention(base, [experts[0], deeper])
