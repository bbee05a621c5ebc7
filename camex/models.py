"""Load the dense model and its tokenizer for a task head (SPEC §9: heads as released).

`model.pretrained` is a hub id, a local directory, `package:<name>` (weights shipped inside a
registry package: its `model/` folder, or the package folder itself when `model.gguf_file` names a
GGUF file in it) or null (build from `model.config`, for tiny test models). `model.config` keys are
passed to `from_pretrained`, so `model.config.num_hidden_layers=2` loads a truncated copy (the first
two blocks) of a pretrained decoder.
"""

from __future__ import annotations

import importlib.util
import os
from pathlib import Path
from typing import Any

import torch
from torch import nn

from camex.tasks.base import Head, ModelInfo

FAMILIES = ("t5", "gpt2", "bert", "llama", "timm")
HEADS_BY_FAMILY: dict[str, tuple[str, ...]] = {
    "t5": ("sequence_classification", "regression", "seq2seq"),
    "bert": ("sequence_classification", "regression"),
    "gpt2": ("sequence_classification", "regression", "causal_lm"),
    "llama": ("sequence_classification", "regression", "causal_lm"),  # Llama-architecture decoders
    "timm": ("image_classification",),
}


class ModelError(ValueError):
    """A model config that cannot work; the message names the key."""


def hub_offline() -> bool:
    flags = ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE")
    return any(os.environ.get(k, "").lower() in ("1", "true", "yes") for k in flags)


def resolve_source(ref: str | None, key: str) -> str | None:
    """A local path for `package:<name>` (its `model/` folder, else the package folder when it
    holds a GGUF file) and for `asset:<name>` (camex/assets/<name>, e.g. a corpus-fitted
    tokenizer: camex.tasks.corpus_tokenizer), the path or hub id unchanged otherwise."""
    if ref is not None and ref.startswith("asset:"):
        folder = Path(__file__).resolve().parent / "assets" / ref.split(":", 1)[1]
        if not folder.is_dir():
            known = sorted(p.name for p in folder.parent.iterdir() if p.is_dir())
            raise ModelError(f"{key}={ref}: no such asset; allowed: {', '.join(f'asset:{k}' for k in known)}")
        return str(folder)
    if ref is None or not ref.startswith("package:"):
        return ref
    package = ref.split(":", 1)[1]
    spec = importlib.util.find_spec(package.replace("-", "_"))
    if spec is None or spec.origin is None:
        raise ModelError(f"{key}={ref}: package {package!r} is not installed (see scripts/setup.sh)")
    root = Path(spec.origin).parent
    if (root / "model").is_dir():
        return str(root / "model")
    if any(root.glob("*.gguf")):
        return str(root)
    raise ModelError(f"{key}={ref}: package {package!r} ships no model/ folder and no GGUF file")


def plain_after_gguf(model: nn.Module) -> nn.Module:
    """A model read from a GGUF file and fully de-quantised (plain float layers, the only way
    transformers loads one without the GGML kernels) is an ordinary model: drop the GGUF quantizer
    so it can be trained and saved (transformers refuses both while it is attached)."""
    quantizer = getattr(model, "hf_quantizer", None)
    if quantizer is None or "gguf" not in type(quantizer).__name__.lower():
        return model
    dequantised = not getattr(quantizer, "supported", False) or quantizer.quantization_config.dequantize
    if not dequantised or not all(p.is_floating_point() for p in model.parameters()):
        raise ModelError("model.gguf_file: the GGUF weights were not de-quantised (GGML kernels in use); "
                         "uninstall the `kernels` package to train this model")  # fmt: skip
    model.hf_quantizer = None
    model.is_quantized = False
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    return model


def gguf_kwargs(model_cfg: dict[str, Any]) -> dict[str, str]:
    """`{gguf_file: name}` for `from_pretrained` when the model is a GGUF file, else nothing."""
    name = model_cfg.get("gguf_file")
    return {"gguf_file": name} if name else {}


LOCAL_PREFIXES = ("/", "./", "../", "~", ".\\")  # a path, never a hub id (`org/name` has no such start)


def _check_source(ref: str | None, key: str, *, family: str | None = None, gguf_file: str | None = None) -> None:
    """A local path must exist and hold something (a Transformers model: its config.json, or the
    GGUF file `gguf_file`); offline, a hub id fails at once with a hint instead of a long retry."""
    if ref is None:
        return
    path = Path(ref).expanduser()
    if path.exists() or ref.startswith(LOCAL_PREFIXES):
        if not path.exists():
            raise ModelError(f"{key}={ref}: no such file or folder; allowed: a local model folder or a hub id")
        if path.is_dir() and not any(path.iterdir()):
            raise ModelError(f"{key}={ref}: the folder is empty; allowed: a folder holding a saved model or a hub id")
        if gguf_file is not None and path.is_dir():
            if not (path / gguf_file).is_file():
                found = sorted(p.name for p in path.glob("*.gguf"))
                raise ModelError(f"model.gguf_file={gguf_file}: no such file in {ref}; allowed: {found}")
            return
        if key == "model.pretrained" and family not in (None, "timm") and path.is_dir():
            if not (path / "config.json").is_file():
                raise ModelError(f"{key}={ref}: the folder holds no config.json, so it is not a saved Transformers "
                                 "model; allowed: a folder written by save_pretrained or a hub id")  # fmt: skip
        return
    if not hub_offline():
        return
    from huggingface_hub import try_to_load_from_cache

    if isinstance(try_to_load_from_cache(ref, "config.json"), str):
        return  # downloaded before: loads offline from the Hugging Face cache
    raise ModelError(
        f"{key}={ref}: the Hugging Face Hub is unreachable (HF_HUB_OFFLINE is set) and no local copy exists; "
        f"pass a local directory, e.g. {key}=/path/to/model"
    )


def trust_remote_code(model_cfg: dict[str, Any]) -> bool:
    """Whether a hub model may run its own Python code: only when the user says so, never by default."""
    return model_cfg.get("trust_remote_code") is True


def check(model_cfg: dict[str, Any]) -> None:
    family = model_cfg.get("family")
    if not isinstance(model_cfg.get("trust_remote_code", False), bool):
        raise ModelError(f"model.trust_remote_code={model_cfg['trust_remote_code']!r} is invalid; allowed: true, false")
    for key in ("name", "pretrained", "tokenizer", "architecture", "gguf_file"):
        value = model_cfg.get(key)
        if value is not None and not (isinstance(value, str) and value.strip()):
            raise ModelError(f"model.{key}={value!r} is invalid; allowed: null or a non-empty name or path")
    for key, least in (("max_length", 0), ("image_size", 1)):  # max_length 0: no text input (vision)
        value = model_cfg.get(key)
        if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < least):
            raise ModelError(f"model.{key}={value!r} is invalid; allowed: null or an integer >= {least}")
    config = model_cfg.get("config")
    if config is not None and not isinstance(config, dict):
        raise ModelError(f"model.config={config!r} is invalid; allowed: a mapping of model config fields")
    if "trust_remote_code" in (config or {}):
        raise ModelError("model.config.trust_remote_code is not a model field; set model.trust_remote_code instead")
    if family not in FAMILIES:
        raise ModelError(f"model.family={family!r} is not one of {list(FAMILIES)}")
    if model_cfg.get("pretrained") is None and family == "timm" and not model_cfg.get("architecture"):
        raise ModelError("model.architecture is required for a timm model built from scratch (model.pretrained=null)")
    pretrained = resolve_source(model_cfg.get("pretrained"), "model.pretrained")
    tokenizer = resolve_source(model_cfg.get("tokenizer"), "model.tokenizer")
    if family != "timm" and pretrained is None and tokenizer is None:
        raise ModelError("model.tokenizer is required when model.pretrained is null")
    gguf = model_cfg.get("gguf_file")
    if gguf is not None and pretrained is None:
        raise ModelError(f"model.gguf_file={gguf}: needs model.pretrained (the folder or package holding it)")
    _check_source(pretrained, "model.pretrained", family=family, gguf_file=gguf)
    _check_source(tokenizer, "model.tokenizer")


def model_info(model_cfg: dict[str, Any]) -> ModelInfo:
    family = model_cfg["family"]
    size = model_cfg.get("image_size")
    return ModelInfo(
        family=family,
        is_encoder_decoder=family == "t5",
        max_length=int(model_cfg.get("max_length") or 0),
        image_size=size,
        image_mean=(0.485, 0.456, 0.406) if family == "timm" else None,
        image_std=(0.229, 0.224, 0.225) if family == "timm" else None,
    )


def load_tokenizer(model_cfg: dict[str, Any]):
    if model_cfg["family"] == "timm":
        return None
    from transformers import AutoTokenizer

    own = model_cfg.get("tokenizer")
    source = resolve_source(own or model_cfg.get("pretrained"), "model.tokenizer")
    gguf = {} if own else gguf_kwargs(model_cfg)  # a GGUF file holds its tokenizer too
    tokenizer = AutoTokenizer.from_pretrained(source, trust_remote_code=trust_remote_code(model_cfg), **gguf)
    if tokenizer.pad_token is None:  # GPT-2 has none; pad with end-of-text like the HF examples
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


class VisionClassifier(nn.Module):
    """A timm classifier with the Trainer's interface: `(pixel_values, labels) -> {loss, logits}`.

    timm models return logits only, so the MoE auxiliary loss is added here in training.
    """

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, pixel_values: torch.Tensor, labels: torch.Tensor | None = None) -> dict:
        logits = self.model(pixel_values)
        out = {"logits": logits}
        if labels is not None:
            loss = nn.functional.cross_entropy(logits, labels)
            aux = getattr(self.model, "camex_aux_loss", None)
            if self.training and aux is not None:
                loss = loss + aux
            out["loss"] = loss
        return out


def _text_config(family: str, tokenizer, overrides: dict):
    from transformers import BertConfig, GPT2Config, LlamaConfig, T5Config

    ids = dict(vocab_size=len(tokenizer), pad_token_id=tokenizer.pad_token_id)
    if family == "t5":
        eos = tokenizer.eos_token_id if tokenizer.eos_token_id is not None else tokenizer.sep_token_id
        return T5Config(**ids, eos_token_id=eos, decoder_start_token_id=tokenizer.pad_token_id, **overrides)
    if family == "gpt2":
        eos = tokenizer.eos_token_id if tokenizer.eos_token_id is not None else tokenizer.sep_token_id
        return GPT2Config(**ids, bos_token_id=eos, eos_token_id=eos, **overrides)
    if family == "llama":
        return LlamaConfig(**ids, bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id, **overrides)
    return BertConfig(**ids, **overrides)


def _auto_class(family: str, head: Head):
    import transformers as tf

    if head == "seq2seq":
        return tf.T5ForConditionalGeneration
    if head == "causal_lm":
        return tf.AutoModelForCausalLM
    if family == "t5":
        return tf.T5ForSequenceClassification
    return tf.AutoModelForSequenceClassification


def build_model(model_cfg: dict[str, Any], *, head: Head, num_labels: int, tokenizer) -> nn.Module:
    """The dense model with the task's head, ready for `camex.upcycle`."""
    family = model_cfg["family"]
    if head not in HEADS_BY_FAMILY[family]:
        raise ModelError(f"model.family={family} has no {head} head; allowed: {list(HEADS_BY_FAMILY[family])}")
    overrides = dict(model_cfg.get("config") or {})
    pretrained = resolve_source(model_cfg.get("pretrained"), "model.pretrained")
    if family == "timm":
        import timm

        if pretrained is None:
            net = timm.create_model(model_cfg["architecture"], pretrained=False, num_classes=num_labels, **overrides)
        else:
            name = pretrained if Path(pretrained).exists() else f"hf-hub:{pretrained}"
            net = timm.create_model(name, pretrained=True, num_classes=num_labels, **overrides)
        return VisionClassifier(net)

    head_kwargs: dict[str, Any] = {}
    if head in ("sequence_classification", "regression"):
        head_kwargs = {"num_labels": num_labels}
        if head == "regression":
            head_kwargs["problem_type"] = "regression"
    cls = _auto_class(family, head)
    if pretrained is None:
        config = _text_config(family, tokenizer, overrides)
        for key, value in head_kwargs.items():
            setattr(config, key, value)
        model = cls.from_config(config) if hasattr(cls, "from_config") else cls(config)
    else:
        model = cls.from_pretrained(
            pretrained, **head_kwargs, **overrides, **gguf_kwargs(model_cfg),
            trust_remote_code=trust_remote_code(model_cfg),
        )  # fmt: skip
        if model_cfg.get("gguf_file"):
            plain_after_gguf(model)
    if model.config.pad_token_id is None and tokenizer is not None:
        model.config.pad_token_id = tokenizer.pad_token_id  # GPT-2 classification needs it
    return model
