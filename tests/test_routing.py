"""Routing (SPEC §5-6): noisy top-k gate and its load-balancing loss, padding-aware sequence
units, causal segments (layer and model level), encoder-decoder routing, router per FFN block,
and option validation."""

from __future__ import annotations

import copy

import pytest
import torch

from camex import MoEOptions, upcycle
from camex.moe import MergedExpertLinear, NoisyTopKGate, RoutingContext, UnitRouter

VOCAB = 50


# ----------------------------------------------------------------------------- helpers
def _gate(d: int = 8, n: int = 4, k: int | None = None, *, noisy: bool = True, scale: float = 1.0, seed: int = 0):
    torch.manual_seed(seed)
    gate = NoisyTopKGate(in_features=d, num_experts=n, top_k=n if k is None else k, noisy=noisy)
    with torch.no_grad():
        gate.w_gate.mul_(scale / 0.02)
        gate.w_noise.mul_(scale / 0.02)
    return gate


def _cv2(v: torch.Tensor) -> torch.Tensor:
    v = v.double()
    return v.var(unbiased=True) / (v.mean() ** 2 + 1e-10)


def _gates(model: torch.nn.Module) -> list[NoisyTopKGate]:
    return [m for m in model.modules() if isinstance(m, NoisyTopKGate)]


@torch.no_grad()
def _perturb_experts(model: torch.nn.Module, std: float = 0.2, gate_std: float = 1.0, seed: int = 1) -> None:
    """Move routed experts away from the base and sharpen the gates, so outputs depend on scores."""
    g = torch.Generator().manual_seed(seed)
    for name, p in model.named_parameters():
        if name.endswith("expert_weight") or name.endswith("expert_bias"):
            p.add_(torch.randn(p.shape, generator=g) * std)
        elif name.endswith("w_gate"):
            p.copy_(torch.randn(p.shape, generator=g) * gate_std)


def _tiny_gpt2():
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    cfg = GPT2Config(
        vocab_size=VOCAB, n_embd=16, n_layer=2, n_head=2, n_positions=64, bos_token_id=0, eos_token_id=0,
        resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0,
    )  # fmt: skip
    return GPT2LMHeadModel(cfg).eval()


def _tiny_t5():
    from transformers import T5Config, T5ForConditionalGeneration

    torch.manual_seed(0)
    cfg = T5Config(
        vocab_size=VOCAB, d_model=16, d_kv=4, d_ff=24, num_layers=2, num_decoder_layers=2, num_heads=2,
        dropout_rate=0.0, decoder_start_token_id=0, pad_token_id=0, eos_token_id=1,
    )  # fmt: skip
    return T5ForConditionalGeneration(cfg).eval()


def _tiny_bert():
    from transformers import BertConfig, BertModel

    torch.manual_seed(0)
    cfg = BertConfig(
        vocab_size=VOCAB, hidden_size=16, num_hidden_layers=2, num_attention_heads=2, intermediate_size=24,
        hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0, max_position_embeddings=64,
    )  # fmt: skip
    return BertModel(cfg).eval()


def _segment_ranges(length: int, t: int) -> list[tuple[int, int]]:
    return [(s, min(s + t, length)) for s in range(0, length, t)]


CHANGED = 1e-4  # a "dependence" must move outputs by more than this
SAME = 1e-6  # "no dependence" must hold to this (float32 round-off only)


def _max_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    return (a - b).abs().max().item() if a.numel() else 0.0


# ----------------------------------------------------------------------------- 1. gate
def test_gate_rows_sum_to_one_and_k_nonzeros():
    u = torch.randn(32, 8, generator=torch.Generator().manual_seed(2))
    for k in (1, 2, 3):
        gate = _gate(k=k).train()
        s = gate(u)
        assert s.shape == (32, 4)
        torch.testing.assert_close(s.sum(-1), torch.ones(32))
        assert ((s > 0).sum(-1) == k).all()
        assert (s >= 0).all()
        gate.eval()
        s = gate(u)
        torch.testing.assert_close(s.sum(-1), torch.ones(32))
        assert ((s > 0).sum(-1) == k).all()


def test_gate_all_experts_positive_when_k_equals_n():
    u = torch.randn(16, 8, generator=torch.Generator().manual_seed(3))
    for mode in ("train", "eval"):
        gate = _gate(k=4, scale=0.5)
        gate.train(mode == "train")
        s = gate(u)
        assert (s > 0).all()
        torch.testing.assert_close(s.sum(-1), torch.ones(16))


def test_gate_eval_and_noiseless_are_deterministic():
    u = torch.randn(16, 8, generator=torch.Generator().manual_seed(4))
    gate = _gate(k=2).eval()
    torch.testing.assert_close(gate(u), gate(u), rtol=0, atol=0)
    # eval mode uses the clean logits: softmax over the top-k of u W_g
    clean = u @ gate.w_gate
    top, idx = clean.topk(2, dim=-1)
    expect = torch.zeros_like(clean).scatter(-1, idx, torch.softmax(top, -1))
    torch.testing.assert_close(gate(u), expect)
    quiet = _gate(k=2, noisy=False).train()
    torch.testing.assert_close(quiet(u), quiet(u), rtol=0, atol=0)
    torch.testing.assert_close(quiet(u), expect)
    noisy = _gate(k=2).train()  # sanity: training noise does change the scores
    torch.manual_seed(0)
    a = noisy(u)
    b = noisy(u)
    assert not torch.equal(a, b)


@pytest.mark.parametrize("k", [2, 4])
def test_gate_aux_loss_golden_in_eval(k):
    d, n = 3, 4
    gate = NoisyTopKGate(in_features=d, num_experts=n, top_k=k, aux_coef=0.05).eval()
    w = torch.tensor([[0.5, -1.0, 0.2, 0.0], [1.5, 0.3, -0.7, 0.4], [-0.2, 0.8, 0.1, -1.1]])
    with torch.no_grad():
        gate.w_gate.copy_(w)
    u = torch.tensor([[1.0, 0.0, -1.0], [0.5, 2.0, 0.3], [-1.0, 1.0, 0.0], [0.2, -0.4, 1.2], [2.0, 1.0, 1.0]])
    scores = gate(u)
    logits = u @ w
    top, idx = logits.topk(k, dim=-1)
    expect = torch.zeros_like(logits).scatter(-1, idx, torch.softmax(top, -1))
    torch.testing.assert_close(scores, expect)
    importance = expect.sum(0)
    load = torch.zeros(n).scatter_add(0, idx.reshape(-1), torch.ones(idx.numel()))
    aux = 0.05 * (_cv2(importance) + _cv2(load))
    got = gate.pop_aux()
    assert got is not None and got.dim() == 0
    torch.testing.assert_close(got.double(), aux, rtol=1e-5, atol=1e-8)
    assert gate.pop_aux() is None  # popping resets


def test_gate_smooth_load_golden_in_training():
    """Training with k < n: load = sum over units of P(expert in top k under fresh noise)."""
    d, n, k, units = 5, 4, 2, 12
    gate = _gate(d=d, n=n, k=k, scale=0.4, seed=3).train()
    u = torch.randn(units, d, generator=torch.Generator().manual_seed(4))
    torch.manual_seed(123)
    scores = gate(u)
    got = gate.pop_aux()
    torch.manual_seed(123)
    eps = torch.randn(units, n)
    with torch.no_grad():
        clean = u @ gate.w_gate
        std = torch.nn.functional.softplus(u @ gate.w_noise) + 0.01
        noisy = clean + eps * std
        top, idx = noisy.topk(k, dim=-1)
        expect = torch.zeros_like(noisy).scatter(-1, idx, torch.softmax(top, -1))
        srt = noisy.sort(dim=-1, descending=True).values
        kth, next_ = srt[:, k - 1 : k], srt[:, k : k + 1]
        inside = torch.zeros_like(noisy, dtype=torch.bool).scatter(-1, idx, True)
        phi = torch.distributions.Normal(0.0, 1.0).cdf
        p = torch.where(inside, phi((clean - next_) / std), phi((clean - kth) / std))
    torch.testing.assert_close(scores.detach(), expect)
    aux = gate.aux_coef * (_cv2(expect.sum(0)) + _cv2(p.sum(0)))
    torch.testing.assert_close(got.detach().double(), aux, rtol=1e-5, atol=1e-8)


def test_gate_aux_accumulates_until_popped():
    gate = _gate(k=2).eval()
    g = torch.Generator().manual_seed(5)
    u1, u2 = torch.randn(6, 8, generator=g), torch.randn(9, 8, generator=g)
    gate(u1)
    a1 = gate.pop_aux()
    gate(u2)
    a2 = gate.pop_aux()
    gate(u1)
    gate(u2)
    torch.testing.assert_close(gate.pop_aux(), a1 + a2)
    assert gate.pop_aux() is None
    assert a1.item() > 0 and a2.item() > 0


def test_gate_smooth_load_gives_noise_weights_a_gradient():
    u = torch.randn(64, 8, generator=torch.Generator().manual_seed(6))
    gate = _gate(k=2, scale=0.3).train()
    torch.manual_seed(7)
    gate(u)
    gate.pop_aux().backward()
    assert gate.w_noise.grad is not None and gate.w_noise.grad.abs().sum() > 0
    assert gate.w_gate.grad.abs().sum() > 0
    # without noise the load is a count and w_noise takes no part at all
    quiet = _gate(k=2, noisy=False, scale=0.3).train()
    quiet(u)
    quiet.pop_aux().backward()
    assert quiet.w_noise.grad is None or quiet.w_noise.grad.abs().sum() == 0


# ----------------------------------------------------------------------------- 2. sequence units
@pytest.mark.parametrize("padding_mean", ["exclude", "include"])
def test_sequence_router_padding_mean(padding_mean):
    g = torch.Generator().manual_seed(8)
    gate = _gate(d=8, n=4).eval()
    ctx = RoutingContext()
    router = UnitRouter(gate=gate, unit="sequence", context=ctx, padding_mean=padding_mean)
    x = torch.randn(3, 7, 8, generator=g)
    mask = torch.ones(3, 7, dtype=torch.long)
    mask[1, 4:] = 0
    mask[2, 6:] = 0
    ctx.token_mask = mask
    r = router(x)
    assert r.unit == "sequence" and r.scores.shape == (3, 4)
    torch.testing.assert_close(r.scores.sum(-1), torch.ones(3))
    x2 = x.clone()
    x2[mask == 0] += 5.0 * torch.randn(int((mask == 0).sum()), 8, generator=g)
    r2 = router(x2)
    if padding_mean == "exclude":
        torch.testing.assert_close(r2.scores, r.scores, rtol=0, atol=SAME)
        # golden: the gate sees the mean over real tokens only
        pooled = torch.stack([x[b, mask[b].bool()].mean(0) for b in range(3)])
        torch.testing.assert_close(r.scores, gate(pooled))
    else:  # the released mean over all positions, padding included
        torch.testing.assert_close(r.scores, gate(x.mean(1)))
        torch.testing.assert_close(r2.scores[0], r.scores[0])  # unpadded row unchanged
        assert _max_diff(r2.scores[1:], r.scores[1:]) > CHANGED
    ctx.token_mask = None  # without a mask every position counts
    torch.testing.assert_close(router(x).scores, gate(x.mean(1)))


# ----------------------------------------------------------------------------- 3. segments, layer level
def _segment_layer(first_segment: str, t: int = 4, seed: int = 0) -> MergedExpertLinear:
    torch.manual_seed(seed)
    gate = NoisyTopKGate(in_features=6, num_experts=3, top_k=3)
    with torch.no_grad():
        gate.w_gate.normal_(0.0, 1.0)
    router = UnitRouter(gate=gate, unit="segment", segment_len=t, first_segment=first_segment)
    layer = MergedExpertLinear(in_features=6, out_features=4, num_experts=3, bias=True, router=router)
    layer.load_dense(torch.randn(4, 6), torch.randn(4))
    with torch.no_grad():
        layer.expert_weight.add_(torch.randn_like(layer.expert_weight) * 0.5)
        layer.expert_bias.add_(torch.randn_like(layer.expert_bias) * 0.5)
    return layer.eval()


@pytest.mark.parametrize("first_segment", ["detach", "uniform"])
def test_segment_layer_later_segments_never_change_earlier(first_segment):
    t, length = 4, 10  # segments 4, 4, 2
    layer = _segment_layer(first_segment, t)
    g = torch.Generator().manual_seed(9)
    x = torch.randn(2, length, 6, generator=g)
    with torch.no_grad():
        y = layer(x)
        assert y.shape == (2, length, 4)
        segs = _segment_ranges(length, t)
        assert [e - s for s, e in segs] == [4, 4, 2]
        for j, (_, end) in enumerate(segs[:-1]):
            x2 = x.clone()
            x2[:, end:] += torch.randn(2, length - end, 6, generator=g)
            y2 = layer(x2)
            assert _max_diff(y2[:, :end], y[:, :end]) <= SAME, f"segment {j} saw a later segment"
            assert _max_diff(y2[:, end:], y[:, end:]) > CHANGED  # sanity: the perturbation matters
            # segment j+1 is merged from segment j's scores, so changing segment j reaches j+1
            start_j = segs[j][0]
            x3 = x.clone()
            x3[:, start_j:end] += torch.randn(2, end - start_j, 6, generator=g)
            y3 = layer(x3)
            nxt = segs[j + 1]
            assert _max_diff(y3[:, nxt[0] : nxt[1]], y[:, nxt[0] : nxt[1]]) > CHANGED


def test_segment_layer_short_input_and_single_short_segment():
    layer = _segment_layer("detach", t=4)
    for length in (1, 3, 4, 5, 9):
        x = torch.randn(2, length, 6)
        with torch.no_grad():
            assert layer(x).shape == (2, length, 4)
    x = torch.randn(3, 6)  # a 2-D input has no sequence axis to segment
    with pytest.raises(ValueError):
        layer(x)


def test_segment_layer_detach_leaks_inside_first_segment():
    layer = _segment_layer("detach", t=4)
    g = torch.Generator().manual_seed(10)
    x = torch.randn(2, 10, 6, generator=g)
    with torch.no_grad():
        y = layer(x)
        x2 = x.clone()
        x2[:, 3] += 2.0 * torch.randn(2, 6, generator=g)  # last token of segment 0
        y2 = layer(x2)
    # the released behaviour: segment 0 routes on its own mean, so earlier tokens see token 3
    assert _max_diff(y2[:, :3], y[:, :3]) > CHANGED


def test_segment_layer_detach_stops_gradient_of_first_segment():
    layer = _segment_layer("detach", t=4).train()
    layer.router.gate.noisy = False
    x = torch.randn(1, 8, 6)
    layer(x)[:, :4].sum().backward()  # segment 0 only: its scores are detached
    assert layer.router.gate.w_gate.grad is None or layer.router.gate.w_gate.grad.abs().sum() == 0
    layer.zero_grad()
    layer(x)[:, 4:].sum().backward()  # segment 1 uses segment 0's (live) scores
    assert layer.router.gate.w_gate.grad.abs().sum() > 0


def test_segment_layer_uniform_is_causal_per_token():
    t, length = 4, 10
    layer = _segment_layer("uniform", t)
    g = torch.Generator().manual_seed(11)
    x = torch.randn(2, length, 6, generator=g)
    with torch.no_grad():
        y = layer(x)
        for pos in range(length):
            x2 = x.clone()
            x2[:, pos] += 2.0 * torch.randn(2, 6, generator=g)
            y2 = layer(x2)
            assert _max_diff(y2[:, :pos], y[:, :pos]) <= SAME, f"an output before {pos} saw token {pos}"
            assert _max_diff(y2[:, pos], y[:, pos]) > CHANGED
        # segment 0 merges with uniform scores: E_m + mean_i tau_i
        w = layer.base_weight + (layer.expert_weight - layer.base_weight).mean(0)
        b = layer.base_bias + (layer.expert_bias - layer.base_bias).mean(0)
        torch.testing.assert_close(y[:, :t], x[:, :t] @ w.T + b)


# ----------------------------------------------------------------------------- 4. segments, model level
def _gpt2_camex(first_segment: str):
    model = upcycle(_tiny_gpt2(), "camex", MoEOptions(num_experts=3, segment_len=4, first_segment=first_segment))
    _perturb_experts(model)
    return model.eval()


@pytest.mark.parametrize("first_segment", ["detach", "uniform"])
def test_gpt2_later_segments_never_change_earlier_logits(first_segment):
    model = _gpt2_camex(first_segment)
    assert len(_gates(model)) == 4
    assert all(r.segment_len == 4 for r in model.modules() if isinstance(r, UnitRouter))
    g = torch.Generator().manual_seed(12)
    ids = torch.randint(1, VOCAB, (2, 10), generator=g)
    with torch.no_grad():
        logits = model(input_ids=ids).logits
        assert logits.shape == (2, 10, VOCAB)
        for j, (_, end) in enumerate(_segment_ranges(10, 4)[:-1]):
            ids2 = ids.clone()
            ids2[:, end:] = (ids[:, end:] + 7) % (VOCAB - 1) + 1
            logits2 = model(input_ids=ids2).logits
            assert _max_diff(logits2[:, :end], logits[:, :end]) <= 1e-5, f"segment {j} saw later tokens"
            assert _max_diff(logits2[:, end:], logits[:, end:]) > CHANGED


def test_gpt2_uniform_first_segment_is_causal_per_token():
    model = _gpt2_camex("uniform")
    ids = torch.randint(1, VOCAB, (2, 10), generator=torch.Generator().manual_seed(13))
    with torch.no_grad():
        logits = model(input_ids=ids).logits
        for pos in range(10):
            ids2 = ids.clone()
            ids2[:, pos] = ids[:, pos] % (VOCAB - 1) + 1
            logits2 = model(input_ids=ids2).logits
            assert _max_diff(logits2[:, :pos], logits[:, :pos]) <= 1e-5, f"a logit before {pos} saw token {pos}"


def test_gpt2_detach_first_segment_leaks_within_segment():
    model = _gpt2_camex("detach")
    ids = torch.randint(1, VOCAB, (2, 10), generator=torch.Generator().manual_seed(14))
    with torch.no_grad():
        logits = model(input_ids=ids).logits
        ids2 = ids.clone()
        ids2[:, 3] = ids[:, 3] % (VOCAB - 1) + 1
        logits2 = model(input_ids=ids2).logits
    assert _max_diff(logits2[:, :3], logits[:, :3]) > CHANGED  # the released leak, kept as an option


@pytest.mark.xfail(
    strict=True,
    reason="known limitation: UnitRouter keeps no state across KV-cache steps, so each cached token is "
    "routed as a fresh one-token segment 0 instead of with the scores of its segment's predecessor",
)
def test_gpt2_cached_decoding_matches_full_forward():
    model = _gpt2_camex("uniform")
    ids = torch.randint(1, VOCAB, (2, 6), generator=torch.Generator().manual_seed(18))
    with torch.no_grad():
        full = model(input_ids=ids).logits
        out = model(input_ids=ids[:, :1], use_cache=True)
        past, steps = out.past_key_values, [out.logits[:, -1]]
        for t in range(1, ids.shape[1]):
            out = model(input_ids=ids[:, t : t + 1], past_key_values=past, use_cache=True)
            past = out.past_key_values
            steps.append(out.logits[:, -1])
    torch.testing.assert_close(torch.stack(steps, 1), full, rtol=1e-5, atol=1e-5)


def test_gpt2_upcycled_equals_dense_at_step_zero():
    dense = _tiny_gpt2()
    model = upcycle(copy.deepcopy(dense), "camex", MoEOptions(num_experts=3, segment_len=4))
    ids = torch.randint(1, VOCAB, (2, 10), generator=torch.Generator().manual_seed(15))
    with torch.no_grad():
        torch.testing.assert_close(model(input_ids=ids).logits, dense(input_ids=ids).logits, rtol=1e-5, atol=1e-5)


# ----------------------------------------------------------------------------- 5. encoder-decoder
def _t5_camex(decoder_routing: str = "encoder", **extra):
    model = upcycle(_tiny_t5(), "camex", MoEOptions(num_experts=3, decoder_routing=decoder_routing, **extra))
    _perturb_experts(model)
    return model.eval()


def _t5_inputs(seed: int = 16):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(2, VOCAB, (2, 7), generator=g)
    mask = torch.ones(2, 7, dtype=torch.long)
    mask[1, 5:] = 0
    dec = torch.randint(2, VOCAB, (2, 6), generator=g)
    dec[:, 0] = 0
    return ids, mask, dec


def _decoder_units(model) -> set[str]:
    return {r.unit for n, r in model.named_modules() if isinstance(r, UnitRouter) and n.startswith("decoder")}


def test_t5_decoder_routes_on_encoder_memory_no_future_leak():
    model = _t5_camex("encoder")
    assert _decoder_units(model) == {"memory"}
    ids, mask, dec = _t5_inputs()
    with torch.no_grad():
        logits = model(input_ids=ids, attention_mask=mask, decoder_input_ids=dec).logits
        for pos in range(1, dec.shape[1]):
            dec2 = dec.clone()
            dec2[:, pos] = dec[:, pos] % (VOCAB - 2) + 2
            logits2 = model(input_ids=ids, attention_mask=mask, decoder_input_ids=dec2).logits
            assert _max_diff(logits2[:, :pos], logits[:, :pos]) <= 1e-5, f"a logit before {pos} saw token {pos}"
            assert _max_diff(logits2[:, pos], logits[:, pos]) > CHANGED


def test_t5_released_self_routing_leaks_future_decoder_tokens():
    model = _t5_camex("self")
    assert _decoder_units(model) == {"sequence"}
    ids, mask, dec = _t5_inputs()
    with torch.no_grad():
        logits = model(input_ids=ids, attention_mask=mask, decoder_input_ids=dec).logits
        dec2 = dec.clone()
        dec2[:, -1] = dec[:, -1] % (VOCAB - 2) + 2
        logits2 = model(input_ids=ids, attention_mask=mask, decoder_input_ids=dec2).logits
    assert _max_diff(logits2[:, :-1], logits[:, :-1]) > CHANGED


@pytest.mark.parametrize("padding_mean", ["exclude", "include"])
def test_t5_padded_encoder_tokens_do_not_reach_routing(padding_mean):
    model = _t5_camex("encoder", padding_mean=padding_mean)
    ids, mask, dec = _t5_inputs()
    with torch.no_grad():
        logits = model(input_ids=ids, attention_mask=mask, decoder_input_ids=dec).logits
        ids2 = ids.clone()
        ids2[mask == 0] = ids[mask == 0] % (VOCAB - 2) + 2  # change only padded encoder tokens
        logits2 = model(input_ids=ids2, attention_mask=mask, decoder_input_ids=dec).logits
    torch.testing.assert_close(logits2[0], logits[0])  # the unpadded sequence is untouched anyway
    if padding_mean == "exclude":
        assert _max_diff(logits2, logits) <= 1e-5
    else:
        assert _max_diff(logits2[1], logits[1]) > CHANGED


def test_t5_cached_greedy_decoding_matches_teacher_forcing():
    model = _t5_camex("encoder")
    ids, mask, _ = _t5_inputs()
    steps = 4
    with torch.no_grad():
        enc = model.get_encoder()(input_ids=ids, attention_mask=mask)
        cur = torch.zeros(2, 1, dtype=torch.long)
        seq, step_logits, past = cur, [], None
        for _ in range(steps):
            out = model(
                encoder_outputs=enc, attention_mask=mask, decoder_input_ids=cur, past_key_values=past, use_cache=True
            )
            past = out.past_key_values
            step_logits.append(out.logits[:, -1])
            cur = out.logits[:, -1:].argmax(-1)
            seq = torch.cat([seq, cur], dim=1)
        full = model(input_ids=ids, attention_mask=mask, decoder_input_ids=seq[:, :steps]).logits
    torch.testing.assert_close(torch.stack(step_logits, 1), full, rtol=1e-5, atol=1e-5)
    with torch.no_grad():  # the library's own cached greedy search agrees
        generated = model.generate(
            input_ids=ids, attention_mask=mask, max_new_tokens=steps, min_new_tokens=steps, do_sample=False, num_beams=1
        )
    torch.testing.assert_close(generated, seq)


def test_t5_upcycled_equals_dense_at_step_zero():
    dense = _tiny_t5()
    ids, mask, dec = _t5_inputs()
    for routing in ("encoder", "self"):
        model = upcycle(copy.deepcopy(dense), "camex", MoEOptions(num_experts=3, decoder_routing=routing))
        with torch.no_grad():
            got = model(input_ids=ids, attention_mask=mask, decoder_input_ids=dec).logits
            want = dense(input_ids=ids, attention_mask=mask, decoder_input_ids=dec).logits
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


# ----------------------------------------------------------------------------- 6. router per block
def test_bert_router_per_block():
    dense = _tiny_bert()
    per_linear = upcycle(copy.deepcopy(dense), "camex", MoEOptions(num_experts=3))
    per_block = upcycle(copy.deepcopy(dense), "camex", MoEOptions(num_experts=3, router_scope="block"))
    assert len(_gates(per_linear)) == 4  # 2 blocks x 2 linears
    assert len(_gates(per_block)) == 2  # one per FFN block
    for layer in per_block.encoder.layer:
        first, second = layer.intermediate.dense, layer.output.dense
        assert isinstance(first, MergedExpertLinear) and isinstance(second, MergedExpertLinear)
        assert first.router is not None and second.router is None
        assert first.shared is second.shared
    g = torch.Generator().manual_seed(17)
    ids = torch.randint(1, VOCAB, (3, 9), generator=g)
    mask = torch.ones(3, 9, dtype=torch.long)
    mask[1, 6:] = 0
    with torch.no_grad():
        want = dense(input_ids=ids, attention_mask=mask).last_hidden_state
        got = per_block(input_ids=ids, attention_mask=mask).last_hidden_state
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
        # after moving the experts, the second linear really merges with the block's scores
        _perturb_experts(per_block)
        ref = per_block(input_ids=ids, attention_mask=mask).last_hidden_state
        layer = per_block.encoder.layer[0]
        shared_scores = layer.output.dense.shared.routing.scores
        assert shared_scores.shape == (3, 3)
    per_block.train()
    out = per_block(input_ids=ids, attention_mask=mask).last_hidden_state
    out.sum().backward()
    assert per_block.encoder.layer[0].intermediate.dense.router.gate.w_gate.grad is not None
    assert ref.shape == out.shape


# ----------------------------------------------------------------------------- 7. option errors
@pytest.mark.parametrize(
    ("kwargs", "key"),
    [
        ({"rank": 0}, "merge.rank"),
        ({"routing": "bogus"}, "merge.routing"),
        ({"num_experts": 0}, "merge.num_experts"),
        ({"segment_len": 0}, "merge.segment_len"),
        ({"first_segment": "peek"}, "merge.first_segment"),
        ({"decoder_routing": "future"}, "merge.decoder_routing"),
        ({"router_scope": "model"}, "merge.router_scope"),
        ({"padding_mean": "sometimes"}, "merge.padding_mean"),
    ],
)
def test_bad_options_name_the_key(kwargs, key):
    with pytest.raises(ValueError, match=key):
        MoEOptions(**kwargs)


def test_top_k_above_experts_rejected_at_upcycle():
    opts = MoEOptions(num_experts=3, top_k=4)  # valid for SMoE (n + 1 experts)
    with pytest.raises(ValueError, match="merge.top_k"):
        upcycle(_tiny_bert(), "camex", opts)
    upcycle(_tiny_bert(), "smoe", opts)  # four experts: fine


def test_token_routing_needs_smoe():
    with pytest.raises(ValueError, match="merge.routing"):
        upcycle(_tiny_bert(), "camex", MoEOptions(num_experts=3, routing="token"))
    with pytest.raises(ValueError, match="merge.routing"):
        upcycle(_tiny_bert(), "smoe", MoEOptions(num_experts=3, routing="sequence"))


def test_unknown_layers_rejected():
    with pytest.raises(ValueError, match="merge.layers") as err:
        upcycle(_tiny_gpt2(), "camex", MoEOptions(num_experts=3, layers=(99,)))
    assert "99" in str(err.value)
    model = upcycle(_tiny_gpt2(), "camex", MoEOptions(num_experts=3, layers=(1,)))
    assert len(_gates(model)) == 2  # only block 1 upcycled


def test_unknown_variant_and_bad_gate():
    with pytest.raises(KeyError, match="bogus"):
        upcycle(_tiny_bert(), "bogus")
    with pytest.raises(ValueError, match="top_k"):
        NoisyTopKGate(in_features=4, num_experts=3, top_k=0)
