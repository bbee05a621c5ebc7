"""Parameter and FLOP accounting against hand-worked numbers, real modules and torch's FLOP counter."""

from __future__ import annotations

import pytest
import torch
from conftest import TINY, VOCAB
from torch.utils.flop_counter import FlopCounterMode

from camex import MoEOptions, upcycle
from camex.accounting import (
    MATMUL_TERMS,
    Linear,
    count_parameters,
    curvature_parameters,
    efficiency_table,
    flops_per_token,
    parameters,
    train_flops_per_token,
)
from camex.moe import KroneckerCurvature, MergedExpertLinear, NoisyTopKGate, TokenMoELinear, UnitRouter

# O = 6 = 2·3, I = 8 = 2·4, with a bias; n = 3 routed experts, r = 2.
SMALL = Linear(in_features=8, out_features=6, bias=True)


def test_parameters_hand_worked():
    # one linear: 6·8 + 6 = 54; a gate over e experts: 2·8·e
    assert parameters("dense", SMALL)["total"] == 54
    # SMoE, 4 experts: 4·54 + 2·8·4 = 216 + 64
    assert parameters("smoe", SMALL, n=3)["total"] == 280
    # static merging: 3 routed + 1 base expert, gate over 3: 216 + 48
    assert parameters("merged", SMALL, n=3)["total"] == 264
    # curvature, r = 2: weight 2·3·(4 + 9 + 4 + 16) = 198, bias 2·3·(4 + 9) = 78
    assert curvature_parameters(SMALL, n=3, rank=2) == 276
    assert parameters("camex", SMALL, n=3, rank=2)["total"] == 540
    # EP chain of 3: 3·540 less two base experts (2·54)
    ep = parameters("ep_camex", SMALL, n=3, rank=2, chain_length=3)
    assert ep["total"] == 1512 and ep["base"] == 54
    # a token meets one merged weight, or k experts in SMoE
    assert parameters("camex", SMALL, n=3)["active"] == 54
    assert parameters("smoe", SMALL, n=3, top_k=2)["active"] == 108


def test_paper_shape_numbers():
    # T5-base FFN wi: 768 → 3072, no bias, n = 7, r = 1: 24·32 and 48·64 factors
    wi = Linear(768, 3072)
    assert parameters("dense", wi)["total"] == 2_359_296
    assert curvature_parameters(wi, n=7, rank=1) == 7 * (48**2 + 64**2 + 24**2 + 32**2)
    flops = flops_per_token("camex", wi, n=7, rank=1, tokens_per_unit=128, tokens_per_batch=2048)
    assert flops["curvature"] == 2 * 7 * 3072 * 768 * (48 + 64 + 24 + 32) / 2048
    assert flops["merge"] == 2 * 7 * 3072 * 768 / 128
    cached = flops_per_token("camex", wi, n=7, tokens_per_unit=128, tokens_per_batch=2048, cached=True)
    euclid = flops_per_token("merged", wi, n=7, tokens_per_unit=128, tokens_per_batch=2048, cached=True)
    assert cached["total"] == euclid["total"]  # the reparameterisation cache: eval costs what Euclidean costs


def test_flops_hand_worked():
    kw = dict(n=3, rank=2, tokens_per_unit=4, tokens_per_batch=12)
    assert flops_per_token("dense", SMALL)["total"] == 2 * 48 + 6
    smoe = flops_per_token("smoe", SMALL, n=3, top_k=2)
    # gate 2·8·4 = 64, experts 2·(2·48) = 192, biases 2·6, combine 2·2·6
    assert (smoe["gate"], smoe["experts"], smoe["bias"], smoe["combine"]) == (64, 192, 12, 24)
    merged = flops_per_token("merged", SMALL, **kw)
    # linear 96, bias 6, pool 8, gate 2·8·3/4 = 12, merge 2·3·54/4 = 81, domain vectors 3·54/12 = 13.5
    assert merged["total"] == 96 + 6 + 8 + 12 + 81 + 13.5
    camex = flops_per_token("camex", SMALL, **kw)
    # 2·r·n·(O·I·(2+3+2+4) + O·(2+3)) / 12 = 2·2·3·(48·11 + 30) / 12 = 558
    assert camex["curvature"] == 558
    ep = flops_per_token("ep_camex", SMALL, chain_length=3, **kw)
    assert ep["ep_base"] == 2 * 4 * 54 / 12  # two base updates of (n + 1)·54 FLOPs
    assert ep["total"] == 3 * camex["total"] + ep["ep_base"]
    assert train_flops_per_token("dense", SMALL) == 3 * 102
    training = flops_per_token("merged", SMALL, training=True, **kw)
    assert training["gate"] == 2 * merged["gate"]  # noisy gating adds the noise logits


def test_invalid_arguments():
    with pytest.raises(ValueError):
        parameters("moe", SMALL)
    with pytest.raises(ValueError):
        parameters("camex", SMALL, chain_length=2)
    with pytest.raises(ValueError):
        flops_per_token("smoe", SMALL, n=3, top_k=5)
    with pytest.raises(ValueError):
        flops_per_token("merged", SMALL, tokens_per_unit=0)


def _merged(n, rank, bias, curvature=True):
    gate = NoisyTopKGate(in_features=8, num_experts=n, top_k=n, noisy=False)
    layer = MergedExpertLinear(
        in_features=8, out_features=6, num_experts=n, bias=bias, router=UnitRouter(gate=gate, unit="sequence"),
        curvature=KroneckerCurvature(num_experts=n, rank=rank, out_features=6, in_features=8, bias=bias)
        if curvature else None,
    )  # fmt: skip
    layer.load_dense(torch.randn(6, 8), torch.randn(6) if bias else None)
    return layer


@pytest.mark.parametrize("bias", [False, True])
def test_parameters_match_real_modules(bias):
    shape = Linear(8, 6, bias)
    layer = _merged(3, 2, bias)
    assert sum(p.numel() for p in layer.parameters()) == parameters("camex", shape, n=3, rank=2)["total"]
    euclid = _merged(3, 2, bias, curvature=False)
    assert sum(p.numel() for p in euclid.parameters()) == parameters("merged", shape, n=3)["total"]
    smoe = TokenMoELinear(in_features=8, out_features=6, num_experts=4, bias=bias, router=None)
    gate = NoisyTopKGate(in_features=8, num_experts=4, top_k=2)
    real = sum(p.numel() for p in smoe.parameters()) + sum(p.numel() for p in gate.parameters())
    assert real == parameters("smoe", shape, n=3)["total"]


@pytest.mark.parametrize("rank", [1, 3])
def test_matmul_flops_match_torch_flop_counter(rank):
    """The matrix-product terms equal what FlopCounterMode counts on a real forward pass."""
    n, units, t = 3, 2, 5
    layer = _merged(n, rank, bias=True).eval()
    x = torch.randn(units, t, 8)
    with FlopCounterMode(display=False) as counter:
        layer(x)  # autograd on: no eval cache, the curvature is computed
    terms = flops_per_token("camex", SMALL, n=n, rank=rank, tokens_per_unit=t, tokens_per_batch=units * t)
    assert counter.get_total_flops() == pytest.approx(units * t * sum(terms.get(k, 0) for k in MATMUL_TERMS))


def test_count_parameters_of_upcycled_models():
    torch.manual_seed(0)
    dense = TINY["gpt2"].make()
    total_dense = sum(p.numel() for p in dense.parameters())
    counts = count_parameters(upcycle(TINY["gpt2"].make(), "camex", MoEOptions(num_experts=3, rank=2)))
    # 2 blocks × (c_fc 16→64, c_proj 64→16), each with a bias
    shapes = [Linear(16, 64, True), Linear(64, 16, True)] * 2
    assert counts["merged_experts"] == sum(3 * s.size for s in shapes)
    assert counts["merged_base"] == sum(s.size for s in shapes)
    assert counts["curvature"] == sum(curvature_parameters(s, 3, 2) for s in shapes)
    assert counts["router"] == sum(2 * s.in_features * 3 for s in shapes)
    assert counts["other"] == total_dense - sum(s.size for s in shapes)
    assert counts["total"] == sum(v for k, v in counts.items() if k != "total")

    ep = count_parameters(upcycle(TINY["gpt2"].make(), "ep_camex", MoEOptions(num_experts=3, rank=2)))
    per_chain = {"c_fc": Linear(16, 64, True), "c_proj": Linear(64, 16, True)}
    want = sum(parameters("ep_camex", s, n=3, rank=2, chain_length=2)["total"] for s in per_chain.values())
    assert ep["total"] - ep["other"] == want

    smoe = count_parameters(upcycle(TINY["gpt2"].make(), "smoe", MoEOptions(num_experts=3)))
    assert smoe["smoe_experts"] == sum(4 * s.size for s in shapes)


def test_efficiency_table_rows():
    rows = {r["kind"]: r for r in efficiency_table(Linear(768, 3072), chain_length=12)}
    assert list(rows) == ["dense", "smoe", "merged", "camex", "ep_camex"]
    assert rows["dense"]["x_dense_parameters"] == 1.0
    # EP-CAMEx stores 11 fewer base experts per chain of 12
    saved = rows["camex"]["parameters"] - rows["ep_camex"]["parameters"]
    assert saved == pytest.approx(11 * 768 * 3072 / 12)
    assert rows["camex"]["eval_flops_per_token"] == rows["merged"]["eval_flops_per_token"]


def test_run_flops_per_token_reads_named_eval_splits(tmp_path):
    """Tasks with named eval splits (MNLI: matched, mismatched) hand the Trainer a dict; the per-run
    FLOP count then measures the first split's first batch, exactly as with a plain eval set."""
    from transformers import Trainer, TrainingArguments

    from camex.train import _flops_per_token

    torch.manual_seed(0)
    model = upcycle(TINY["bert"].make(), "camex", MoEOptions(num_experts=3))
    g = torch.Generator().manual_seed(0)
    rows = [
        {"input_ids": torch.randint(0, VOCAB, (8,), generator=g), "attention_mask": torch.ones(8, dtype=torch.long),
         "labels": torch.tensor(i % 3)}
        for i in range(4)
    ]  # fmt: skip
    args = TrainingArguments(output_dir=str(tmp_path), per_device_eval_batch_size=2, report_to="none", use_cpu=True)
    plain = _flops_per_token(Trainer(model=model, args=args, eval_dataset=rows), model)
    named = _flops_per_token(Trainer(model=model, args=args, eval_dataset={"matched": rows, "other": rows[2:]}), model)
    assert plain["final_flops_per_token"] > 0
    assert named == plain
