"""Checkpoints to compose from: where they are, what tensors they hold, and one tensor at a time.

A source is a local directory, `package:<name>` (weights shipped in a registry package) or a hub
id (offline: a clear error unless it is in the Hugging Face cache). Only the safetensors headers
are read to check shapes; tensors are read one by one, each file opened only for that read, so a
checkpoint's pages never stay mapped while others are read.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

import torch

from camex.models import ModelError, _check_source, resolve_source


class ComposeError(ModelError):
    """A composition that cannot work (bad source, mismatched expert, bad option); exit status 2."""


@dataclass
class Checkpoint:
    """One source: its name in messages, its directory, and `key -> (file, shape, dtype)`."""

    label: str
    ref: str
    path: Path
    tensors: dict[str, tuple[Path, tuple[int, ...], str]] = field(default_factory=dict)
    config: dict = field(default_factory=dict)

    def read(self, key: str) -> torch.Tensor:
        from safetensors import safe_open

        file = self.tensors[key][0]
        with safe_open(str(file), framework="pt") as f:
            return f.get_tensor(key).clone()  # a copy: nothing of the file stays mapped


def _local_dir(ref: str, label: str) -> Path:
    if ref.startswith(("/", "./", "../", "~")) and not Path(ref).expanduser().is_dir():
        raise ComposeError(f"{label}={ref}: no such directory")
    try:
        path = resolve_source(ref, label)
        _check_source(path, label)
    except ModelError as e:
        raise ComposeError(str(e)) from None
    except ValueError as e:  # huggingface_hub refuses a malformed repo id
        raise ComposeError(
            f"{label}={ref}: neither a local directory nor a hub id ({str(e).splitlines()[0]})"
        ) from None
    if Path(path).expanduser().is_dir():
        return Path(path).expanduser()
    from huggingface_hub import snapshot_download

    try:
        return Path(snapshot_download(path, allow_patterns=["*.json", "*.safetensors", "*.txt", "*.model"]))
    except Exception as e:  # not found, gated, unreachable: one line naming the source
        raise ComposeError(f"{label}={ref}: cannot fetch it from the Hugging Face Hub ({type(e).__name__})") from None


def open_checkpoint(ref: str, label: str) -> Checkpoint:
    """Index a source's safetensors files (headers only) and read its config.json."""
    from safetensors import safe_open

    path = _local_dir(str(ref), label)
    files = sorted(path.glob("*.safetensors"))
    if not files:
        raise ComposeError(f"{label}={ref}: no *.safetensors file in {path}; save the model with safetensors")
    ckpt = Checkpoint(label, str(ref), path)
    config = path / "config.json"
    if config.is_file():
        ckpt.config = json.loads(config.read_text())
    for file in files:
        with safe_open(str(file), framework="pt") as f:
            for key in f.keys():
                sl = f.get_slice(key)
                ckpt.tensors[key] = (file, tuple(sl.get_shape()), sl.get_dtype())
    return ckpt
