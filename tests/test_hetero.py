"""Heterogeneous experts (camex.compose.hetero, MERGEME.md §2.3)."""

from __future__ import annotations

import copy
import math
import subprocess
import sys
from pathlib import Path

import pytest
import safetensors.torch
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


# ---- from saved checkpoints, through the compose config and run.py ----------------------------------

ROOT = Path(__file__).resolve().parents[1]
MINILM_VOCAB = 30522  # model=tiny_gpt2's tokenizer (the offline MiniLM WordPiece vocabulary)


def _gpt2(path: Path, *, depth: int, width: int = 16, vocab: int = MINILM_VOCAB, seed: int = 0) -> str:
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(seed)
    cfg = GPT2Config(vocab_size=vocab, n_embd=width, n_layer=depth, n_head=2, n_positions=64,
                     bos_token_id=0, eos_token_id=0)  # fmt: skip
    GPT2LMHeadModel(cfg).save_pretrained(path)  # tied head: lm_head.weight is not in the file
    return str(path)


def _run(tmp_path: Path, experts: dict[str, str], *extra: str) -> subprocess.CompletedProcess:
    fix = ROOT / "tests" / "fixtures"
    cmd = [
        sys.executable, "run.py", f"paths.output_root={tmp_path / 'out'}", "trainer=tiny", "tracking.enabled=false",
        "task=lm/wikitext2", "model=tiny_gpt2", "task.block_size=32", f"task.local.train={fix / 'lm_train.txt'}",
        f"task.local.eval={fix / 'lm_dev.txt'}", "compose=mergeme", "compose.heterogeneous.enabled=true",
        *[f"+compose.experts.{d}={p}" for d, p in experts.items()], *extra,
    ]  # fmt: skip
    return subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=600)


def test_run_py_fine_tunes_experts_of_two_depths_from_checkpoints(tmp_path):
    import json

    experts = {"a": _gpt2(tmp_path / "a", depth=1, seed=1), "b": _gpt2(tmp_path / "b", depth=3, width=32, seed=2)}
    proc = _run(tmp_path, experts, "trainer.max_steps=2", "trainer.eval_every=steps", "trainer.eval_steps=2")
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "missing keys" not in proc.stdout + proc.stderr
    run_dir = next((tmp_path / "out").rglob("metrics.json")).parent
    metrics = json.loads((run_dir / "metrics.json").read_text())["metrics"]
    losses = [json.loads(x.read_text()) for x in (run_dir / "checkpoints").rglob("trainer_state.json")]
    history = [e["loss"] for s in losses for e in s["log_history"] if "loss" in e]
    assert len(history) == 2 and all(math.isfinite(x) for x in history)
    assert math.isfinite(metrics["final_perplexity"])
    saved = safetensors.torch.load_file(str(run_dir / "final_model" / "model.safetensors"))
    assert saved["embed.weight"].shape == (MINILM_VOCAB, 32) and "experts.1.h.2.mlp.c_fc.weight" in saved


def test_every_trainable_parameter_gets_a_gradient_and_an_optimizer_group(tmp_path):
    """What run.py trains: the MoE built from the checkpoints and the optimizer its Trainer makes."""
    from camex.compose import config as compose_config
    from camex.train import _compose_heterogeneous, _trainer_classes

    experts = {"a": _gpt2(tmp_path / "a", depth=1, seed=1), "b": _gpt2(tmp_path / "b", depth=2, width=32, seed=2)}
    spec = compose_config.parse({"experts": experts, "heterogeneous": {"enabled": True, "top_k": 2}}, default_base=None)
    moe = _compose_heterogeneous(spec)
    trainer_cls, args_cls = _trainer_classes(False)
    trainer = trainer_cls(model=moe, args=args_cls(output_dir=str(tmp_path / "o"), report_to="none", use_cpu=True))
    grouped = [id(p) for g in trainer.create_optimizer().param_groups for p in g["params"]]
    trainable = {n: p for n, p in moe.named_parameters() if p.requires_grad}
    assert sorted(grouped) == sorted(id(p) for p in trainable.values())  # each exactly once
    ids = torch.randint(0, MINILM_VOCAB, (3, 10), generator=torch.Generator().manual_seed(0))
    moe(ids, labels=ids)["loss"].backward()
    lacking = [n for n, p in trainable.items() if p.grad is None or not p.grad.abs().sum() > 0]
    assert not lacking, lacking
    assert not moe.experts[0].wte.weight.requires_grad  # the experts' own token embeddings are unused


def test_other_vocabularies_are_refused_in_one_line_before_any_work(tmp_path):
    experts = {"a": _gpt2(tmp_path / "a", depth=1), "b": _gpt2(tmp_path / "b", depth=2, vocab=MINILM_VOCAB + 1)}
    proc = _run(tmp_path, experts, "trainer.max_steps=2")
    assert proc.returncode == 2, proc.stderr[-2000:]
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and "vocabularies differ (a: 30522, b: 30523)" in lines[0], lines
    assert not (tmp_path / "out").exists() or not list((tmp_path / "out").rglob("*.safetensors"))
    small = {"a": _gpt2(tmp_path / "sa", depth=1, vocab=100), "b": _gpt2(tmp_path / "sb", depth=2, vocab=100)}
    proc = _run(tmp_path, small, "trainer.max_steps=2")  # the MiniLM tokenizer has 30522 tokens
    lines = proc.stderr.strip().splitlines()
    assert proc.returncode == 2 and len(lines) == 1, proc.stderr[-2000:]
    assert "model.tokenizer has 30522 tokens, more than the vocabulary of compose.experts (100)" in lines[0]


@pytest.mark.parametrize(
    "change, needle",
    [
        ({"heterogeneous": {"enabled": True, "top_k": 0}}, "compose.heterogeneous.top_k=0 is invalid"),
        ({"heterogeneous": {"enabled": "yes"}}, "compose.heterogeneous.enabled='yes' is invalid"),
        ({"router": {"init": "centroid"}}, "compose.router.init=centroid is not available"),
        ({"routing": {"method": "perplexity"}}, "compose.routing.method is not available"),
        ({"save": "somewhere"}, "compose.save is not available"),
    ],
)
def test_options_a_heterogeneous_moe_cannot_use_are_refused(tmp_path, change, needle):
    from camex.compose import ComposeError
    from camex.compose import config as compose_config

    cfg = {"experts": {"a": _gpt2(tmp_path / "a", depth=1)}, "heterogeneous": {"enabled": True}, **change}
    with pytest.raises(ComposeError, match=needle):
        compose_config.parse(cfg, default_base=None)
