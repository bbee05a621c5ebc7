"""Save a composed (or trained) MoE and restore it exactly: `camex.load(path)`.

A saved folder holds `model.safetensors` (every parameter of the MoE), `config.json` (the Hugging
Face config of the dense architecture), `camex_composition.json` (the composition: sources, merge
variant and options, shared-weight merge, router init, seed), the tokenizer when one is given, and
a `README.md` model card listing the same.
"""

from __future__ import annotations

import json
from dataclasses import asdict
from pathlib import Path

from torch import nn

from camex.compose.build import Composition, model_class
from camex.compose.routers import install_oracle
from camex.compose.sources import ComposeError, open_checkpoint
from camex.upcycle import plan_for
from camex.upcycle.build import apply_plan
from camex.variants import MoEOptions, get_variant

COMPOSITION_FILE = "camex_composition.json"


def _card(c: Composition) -> str:
    rows = "\n".join(f"| {d} | `{src}` |" for d, src in c.experts.items())
    shared = ", ".join(f"{k}={v}" for k, v in c.shared.items())
    router = ", ".join(f"{k}={v}" for k, v in c.router.items())
    opts = ", ".join(f"{k}={v}" for k, v in c.options.items())
    init = ", ".join(c.initialised) or "none"
    return (
        f"# Mixture of experts composed with camex\n\n"
        f"Architecture `{c.architecture}`; base model `{c.base}`; {len(c.experts)} domain experts.\n\n"
        f"| domain (expert index in order) | source |\n|---|---|\n{rows}\n\n"
        f"- merge variant: `{c.variant}` ({opts})\n"
        f"- shared (non-FFN) weights: {shared}\n"
        f"- router initialisation: {router}\n"
        f"- seed: {c.seed}\n"
        f"- tensors held by no source (left at their initial values): {init}\n\n"
        f"Load with `camex.load(path)`.\n"
    )


def save(model: nn.Module, path: str | Path, *, tokenizer=None) -> Path:
    """Write the composed model to `path` (created; existing files of these names are replaced)."""
    from safetensors.torch import save_model

    composition: Composition | None = getattr(model, "camex_composition", None)
    if composition is None:
        raise ComposeError("this model was not built by camex.compose; nothing to save as a composition")
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    save_model(model, str(path / "model.safetensors"))
    model.config.to_json_file(str(path / "config.json"))
    (path / COMPOSITION_FILE).write_text(json.dumps(asdict(composition), indent=2))
    (path / "README.md").write_text(_card(composition))
    if tokenizer is not None:
        tokenizer.save_pretrained(str(path))
    return path


def load(path: str | Path) -> nn.Module:
    """The model `save` wrote, rebuilt layer by layer and loaded strictly (every tensor must match)."""
    from safetensors.torch import load_model
    from transformers import AutoConfig

    path = Path(path)
    file = path / COMPOSITION_FILE
    if not file.is_file():
        raise ComposeError(f"{path}: no {COMPOSITION_FILE}; not a model saved by camex.compose")
    c = Composition(**json.loads(file.read_text()))
    ckpt = open_checkpoint(str(path), "camex.load")
    cls = model_class(ckpt, c.architecture)
    model = cls(AutoConfig.from_pretrained(str(path)))
    opts = dict(c.options)
    if opts.get("layers") is not None:
        opts["layers"] = tuple(opts["layers"])
    options = MoEOptions(**opts)
    apply_plan(model, plan_for(model, options), get_variant(c.variant), options)
    if c.router.get("init") == "oracle":
        install_oracle(model)
    load_model(model, str(path / "model.safetensors"), strict=True)
    model.camex_composition = c
    model.eval()
    return model
