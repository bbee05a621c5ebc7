"""Optimizer parameter groups for upcycled models.

Weight decay pulls a tensor towards zero. That is right for weights, wrong for biases and norm
gains, and wrong for curvature factors, whose neutral value is the identity, not zero.
"""

from __future__ import annotations

from torch import nn

from camex.moe.curvature import KroneckerCurvature

_NO_DECAY_TYPES = (nn.LayerNorm, nn.GroupNorm, nn.BatchNorm1d, nn.BatchNorm2d, nn.Embedding, KroneckerCurvature)


def _no_decay(module: nn.Module, name: str) -> bool:
    return (
        isinstance(module, _NO_DECAY_TYPES)
        or "norm" in type(module).__name__.lower()
        or name.endswith("bias")
        or name.endswith("_factors")
    )


def parameter_groups(model: nn.Module, weight_decay: float) -> list[dict]:
    """Two AdamW groups covering every trainable parameter exactly once."""
    decay, no_decay, seen = [], [], set()
    for module in model.modules():
        for name, p in module.named_parameters(recurse=False):
            if not p.requires_grad or id(p) in seen:
                continue
            seen.add(id(p))
            (no_decay if _no_decay(module, name) else decay).append(p)
    return [
        {"params": decay, "weight_decay": weight_decay},
        {"params": no_decay, "weight_decay": 0.0},
    ]
