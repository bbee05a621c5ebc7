"""Loading the best checkpoint of a model with a tied head (GPT-2, SmolLM2): the head is not in the
safetensors file (it is the token embedding), which is no reason to warn; a key really missing is."""

from __future__ import annotations

import pytest
import torch


def _trainer(tmp_path):
    from transformers import GPT2Config, GPT2LMHeadModel

    from camex.train import _trainer_classes

    torch.manual_seed(0)
    model = GPT2LMHeadModel(GPT2Config(vocab_size=50, n_embd=8, n_layer=1, n_head=2, n_positions=16))
    trainer_cls, args_cls = _trainer_classes(False)
    args = args_cls(output_dir=str(tmp_path / "out"), report_to="none", use_cpu=True)
    return trainer_cls(model=model, args=args)


@pytest.fixture
def warnings(monkeypatch):
    import transformers.trainer

    said: list[str] = []
    monkeypatch.setattr(transformers.trainer.logger, "warning", lambda msg, *a, **k: said.append(str(msg)))
    return said


def test_best_checkpoint_of_a_tied_head_loads_without_a_missing_key_warning(tmp_path, warnings):
    trainer = _trainer(tmp_path)
    model = trainer.model
    best = tmp_path / "checkpoint-1"
    trainer.save_model(str(best))  # safetensors: lm_head.weight is left out (tied)
    saved = model.transformer.wte.weight.detach().clone()
    with torch.no_grad():
        model.transformer.wte.weight.add_(1.0)  # training went on after the best step
    trainer.state.best_model_checkpoint = str(best)
    trainer._load_best_model()
    assert not [w for w in warnings if "missing keys" in w], warnings
    assert model.lm_head.weight is model.transformer.wte.weight  # still tied, and restored
    assert torch.equal(model.lm_head.weight, saved)


def test_a_key_really_missing_from_the_best_checkpoint_is_still_reported(tmp_path, warnings):
    from safetensors.torch import load_file, save_file

    trainer = _trainer(tmp_path)
    best = tmp_path / "checkpoint-1"
    trainer.save_model(str(best))
    file = best / "model.safetensors"
    tensors = load_file(str(file))
    del tensors["transformer.ln_f.weight"]
    save_file(tensors, str(file), metadata={"format": "pt"})
    trainer.state.best_model_checkpoint = str(best)
    trainer._load_best_model()
    missing = [w for w in warnings if "missing keys" in w]
    assert missing and "transformer.ln_f.weight" in missing[0] and "lm_head.weight" not in missing[0]
