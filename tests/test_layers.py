"""Merged-expert layers: eval cache, memory shape guarantees, EP-CAMEx chains."""

from __future__ import annotations

import copy

import pytest
import torch
from conftest import TINY, bert, gpt2
from torch.utils._python_dispatch import TorchDispatchMode

from camex import MoEOptions, upcycle
from camex.merging import domain_vectors, kronecker_apply
from camex.moe import (
    DareMask,
    ExpertChain,
    KroneckerCurvature,
    MergedExpertLinear,
    NoisyTopKGate,
    TiesMask,
    UnitRouter,
)


def _perturb(model: torch.nn.Module, scale: float = 0.05) -> None:
    """Move experts and curvature factors off their upcycled values so every path matters."""
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "expert_" in name or "_factors" in name:
                p.add_(scale * torch.randn(p.shape, generator=g))


def _layer(*, n=4, out=6, inp=10, rank=3, mask=None, unit="sequence", bias=True) -> MergedExpertLinear:
    gate = NoisyTopKGate(in_features=inp, num_experts=n, top_k=n)
    curvature = KroneckerCurvature(num_experts=n, rank=rank, out_features=out, in_features=inp, bias=bias)
    layer = MergedExpertLinear(
        in_features=inp, out_features=out, num_experts=n, bias=bias,
        router=UnitRouter(gate=gate, unit=unit, segment_len=3), mask=mask, curvature=curvature,
    )  # fmt: skip
    layer.load_dense(torch.randn(out, inp), torch.randn(out) if bias else None)
    _perturb(layer)
    return layer


# -- eval cache ---------------------------------------------------------------------------


def _cache_misses(model: torch.nn.Module, monkeypatch) -> list:
    calls = []
    original = MergedExpertLinear._operands

    def counting(self):
        calls.append(self)
        return original(self)

    monkeypatch.setattr(MergedExpertLinear, "_operands", counting)
    return calls


@pytest.mark.parametrize("variant", ["camex_ties", "ep_camex"])
def test_eval_cache_matches_uncached_and_rebuilds_after_step(variant, gen, monkeypatch):
    tiny = TINY["bert"]
    torch.manual_seed(0)
    model = upcycle(tiny.make(), variant, MoEOptions(num_experts=3, rank=2))
    _perturb(model)
    batch = tiny.batch(gen)
    layers = [m for m in model.modules() if isinstance(m, MergedExpertLinear)]
    misses = _cache_misses(model, monkeypatch)

    model.eval()
    with torch.no_grad():
        first = model(**batch).logits
        assert len(misses) == len(layers)  # built once per layer
        second = model(**batch).logits
        assert len(misses) == len(layers)  # then reused
    uncached = model(**batch).logits  # autograd on: no cache
    assert len(misses) == 2 * len(layers)
    torch.testing.assert_close(first, uncached, atol=0, rtol=0)
    torch.testing.assert_close(second, uncached, atol=0, rtol=0)

    model.train()
    opt = torch.optim.SGD(model.parameters(), lr=0.5)
    tiny.loss(model, batch).backward()
    opt.step()
    model.eval()
    with torch.no_grad():
        after = model(**batch).logits
    assert not torch.allclose(after, first)
    torch.testing.assert_close(after, model(**batch).logits, atol=0, rtol=0)


def test_eval_cache_invalidated_by_load_state_dict(gen):
    tiny = TINY["bert"]
    torch.manual_seed(0)
    model = upcycle(tiny.make(), "camex", MoEOptions(num_experts=3))
    other = copy.deepcopy(model)
    _perturb(other)
    batch = tiny.batch(gen)
    model.eval()
    other.eval()
    with torch.no_grad():
        model(**batch)
        model.load_state_dict(other.state_dict())
        torch.testing.assert_close(model(**batch).logits, other(**batch).logits, atol=0, rtol=0)


@pytest.mark.parametrize("through_train", [False, True], ids=["eval_only", "train_then_eval"])
@pytest.mark.parametrize("variant", ["camex_ties", "ep_camex"])
def test_eval_cache_follows_writes_through_data(variant, through_train, gen):
    """`p.data.mul_()` (DeepSpeed, EMA-style code) bumps no version counter; entering eval mode
    again drops the cache, so the next evaluation sees the new values."""
    tiny = TINY["bert"]
    torch.manual_seed(0)
    model = upcycle(tiny.make(), variant, MoEOptions(num_experts=3, rank=2))
    _perturb(model)
    batch = tiny.batch(gen)
    model.eval()
    with torch.no_grad():
        before = model(**batch).logits  # builds the cache
    model.train(through_train)
    for layer in (m for m in model.modules() if isinstance(m, MergedExpertLinear)):
        for p in layer.merge_parameters():
            p.data.mul_(0.5)
    model.eval()
    with torch.no_grad():
        cached = model(**batch).logits
    fresh = model(**batch).logits  # autograd on: no cache
    assert not torch.allclose(fresh, before)
    torch.testing.assert_close(cached, fresh, atol=0, rtol=0)


# -- no [units, n, O, I] tensor, no r copies of τ -----------------------------------------


class _Shapes(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.sizes: list[tuple[str, tuple[int, ...]]] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in out if isinstance(out, (tuple, list)) else (out,):
            if isinstance(t, torch.Tensor):
                self.sizes.append((str(func), tuple(t.shape)))
        return out


@pytest.mark.parametrize(
    "mask,unit",
    [(None, "sequence"), (TiesMask(), "sequence"), (DareMask(granularity="element"), "segment"),
     (DareMask(), "sequence"), (TiesMask(trim=0.5), "segment")],
)  # fmt: skip
def test_no_units_by_experts_weight_tensor(mask, unit):
    units, n, out, inp, rank = 2, 4, 6, 10, 3
    layer = _layer(n=n, out=out, inp=inp, rank=rank, mask=mask, unit=unit)
    layer.train()
    x = torch.randn(units, 9, inp, requires_grad=True)
    with _Shapes() as seen:
        layer(x).square().sum().backward()
    routed = units * (3 if unit == "segment" else 1)  # 9 tokens in segments of 3
    expert_tensor = n * out * inp
    too_big = [(f, s) for f, s in seen.sizes if torch.Size(s).numel() > expert_tensor + routed * out * inp]
    assert too_big == [], "a tensor larger than the experts plus the per-unit weights was created"
    r_copies = [(f, s) for f, s in seen.sizes if torch.Size(s).numel() >= rank * expert_tensor]
    assert r_copies == []


# -- EP-CAMEx ----------------------------------------------------------------------------


def _deep_gpt2():
    from transformers import GPT2Config, GPT2LMHeadModel

    cfg = GPT2Config(vocab_size=50, n_embd=16, n_layer=4, n_head=2, n_positions=64, resid_pdrop=0.0,
                     embd_pdrop=0.0, attn_pdrop=0.0, bos_token_id=0, eos_token_id=0)  # fmt: skip
    return GPT2LMHeadModel(cfg)


def _base_matrices(model) -> int:
    return sum(m.base_weight is not None for m in model.modules() if isinstance(m, MergedExpertLinear))


def test_ep_stores_chain_length_minus_one_fewer_bases():
    torch.manual_seed(0)
    dense = _deep_gpt2()
    static = upcycle(copy.deepcopy(dense), "camex", MoEOptions(num_experts=3))
    ep = upcycle(copy.deepcopy(dense), "ep_camex", MoEOptions(num_experts=3))
    chains = {id(m.chain): m.chain for m in ep.modules() if isinstance(m, MergedExpertLinear)}
    assert sorted(len(c) for c in chains.values()) == [4, 4]  # c_fc chain and c_proj chain
    assert _base_matrices(static) - _base_matrices(ep) == sum(len(c) - 1 for c in chains.values())
    saved = sum(p.numel() for p in static.parameters()) - sum(p.numel() for p in ep.parameters())
    shapes = [c.layers[0].base_weight.numel() + c.layers[0].base_bias.numel() for c in chains.values()]
    assert saved == sum(s * (len(c) - 1) for s, c in zip(shapes, chains.values()))


def test_ep_base_propagation_matches_spec_and_gradients_reach_every_layer():
    torch.manual_seed(0)
    model = upcycle(_deep_gpt2(), "ep_camex", MoEOptions(num_experts=3, rank=2, ep_beta=0.5))
    _perturb(model)
    chain: ExpertChain = next(m.chain for m in model.modules() if isinstance(m, MergedExpertLinear))
    base = chain.layers[0].base_weight
    for index, layer in enumerate(chain.layers):
        torch.testing.assert_close(chain.link(index).base_weight, base)
        curved = kronecker_apply(domain_vectors(layer.expert_weight, base), list(layer.curvature.weight_factors))
        base = base + 0.5 / layer.num_experts * curved.sum(0)
    # the last layer's base depends on every earlier layer's experts and curvature
    chain.new_pass()
    chain.link(len(chain) - 1).base_weight.square().sum().backward()
    for layer in chain.layers[:-1]:
        assert layer.expert_weight.grad.abs().sum() > 0
        assert all(f.grad.abs().sum() > 0 for f in layer.curvature.weight_factors)
    # and a training step reaches every layer through the model's loss
    model.zero_grad()
    tiny = TINY["gpt2"]
    tiny.loss(model, tiny.batch(torch.Generator().manual_seed(0))).backward()
    for layer in chain.layers:
        assert layer.expert_weight.grad.abs().sum() > 0
    assert chain.layers[0].base_weight.grad.abs().sum() > 0


def test_ep_two_forwards_before_a_step_accumulate_gradients(gen):
    tiny = TINY["gpt2"]
    torch.manual_seed(0)
    model = upcycle(tiny.make(), "ep_camex", MoEOptions(num_experts=3, segment_len=4))
    model.train()
    for _ in range(2):  # gradient accumulation: each pass builds its own graph
        tiny.loss(model, tiny.batch(gen)).backward()


# -- router per block ---------------------------------------------------------------------


def test_router_per_block_shares_one_gate(gen):
    torch.manual_seed(0)
    dense = bert()
    model = upcycle(copy.deepcopy(dense), "camex", MoEOptions(num_experts=3, router_scope="block"))
    assert sum(isinstance(m, NoisyTopKGate) for m in model.modules()) == 2  # one per block
    _perturb(model)
    model(**TINY["bert"].batch(gen)).loss.backward()


def test_smoe_routes_each_token_to_top_k(gen):
    torch.manual_seed(0)
    model = upcycle(gpt2(), "smoe", MoEOptions(num_experts=3, top_k=2))
    gates = [m for m in model.modules() if isinstance(m, NoisyTopKGate)]
    assert all(g.num_experts == 4 and g.top_k == 2 for g in gates)
    model.eval()
    scores = gates[0](torch.randn(7, gates[0].w_gate.shape[0]))
    assert ((scores > 0).sum(1) == 2).all()


# -- the merge rule, end to end against an explicit formula --------------------------------


def _explicit_curvature(taus, factors):
    """Σ_ρ (A⊗B) τ (C⊗D)ᵀ per expert, with materialised Kronecker products."""
    a, b, c, d = factors
    return torch.stack(
        [
            sum(torch.kron(a[r, i], b[r, i]) @ taus[i] @ torch.kron(c[r, i], d[r, i]).T for r in range(a.shape[0]))
            for i in range(taus.shape[0])
        ]
    )


@pytest.mark.parametrize("order", ["mask_first", "curvature_first"])
def test_merged_layer_follows_the_merge_rule(order):
    torch.manual_seed(0)
    layer = _layer(n=3, out=6, inp=10, rank=2, mask=TiesMask(), bias=False).double()
    layer.mask_order, layer.alpha = order, 0.7
    layer.eval()
    x = torch.randn(4, 5, 10, dtype=torch.float64)
    scores = layer.router(x).scores
    factors = [f.detach() for f in layer.curvature.weight_factors]
    taus = (layer.expert_weight - layer.base_weight).detach()
    mask = (torch.sign(taus) == torch.sign(taus.sum(0))).double()  # released TIES, from raw τ
    if order == "mask_first":
        curved = _explicit_curvature(taus * mask, factors)
    else:
        curved = _explicit_curvature(taus, factors) * mask
    weights = layer.base_weight.detach() + 0.7 * torch.einsum("un,noi->uoi", scores, curved)
    want = torch.einsum("uli,uoi->ulo", x, weights)
    with torch.no_grad():
        torch.testing.assert_close(layer(x), want, atol=1e-10, rtol=0)
