"""Optimizer parameter groups for upcycled models.

Weight decay pulls a tensor towards zero. That is right for weights, wrong for biases and norm
gains, and wrong for curvature factors, whose neutral value is the identity, not zero (SPEC §4).
The released code decays the factors too (the Trainer's default groups); `decay_curvature=True`
(`merge.curvature_decay`) keeps that for parity runs.
"""

from __future__ import annotations

from torch import nn

from camex.moe.curvature import KroneckerCurvature

_NO_DECAY_TYPES = (nn.LayerNorm, nn.GroupNorm, nn.BatchNorm1d, nn.BatchNorm2d, nn.Embedding)


def _no_decay(module: nn.Module, name: str) -> bool:
    return isinstance(module, _NO_DECAY_TYPES) or "norm" in type(module).__name__.lower() or name.endswith("bias")


def curvature_parameters(model: nn.Module) -> set[int]:
    """Ids of every parameter held by a curvature operator, however deeply it nests them
    (its factors sit in `nn.ParameterList` children named "0", "1", ...: no name rule sees them)."""
    return {id(p) for m in model.modules() if isinstance(m, KroneckerCurvature) for p in m.parameters()}


def parameter_groups(model: nn.Module, weight_decay: float, *, decay_curvature: bool = False) -> list[dict]:
    """Two AdamW groups covering every trainable parameter exactly once."""
    curvature = set() if decay_curvature else curvature_parameters(model)
    decay, no_decay, seen = [], [], set()
    for module in model.modules():
        for name, p in module.named_parameters(recurse=False):
            if not p.requires_grad or id(p) in seen:
                continue
            seen.add(id(p))
            keep = id(p) in curvature or _no_decay(module, name)
            (no_decay if keep else decay).append(p)
    return [
        {"params": decay, "weight_decay": weight_decay},
        {"params": no_decay, "weight_decay": 0.0},
    ]
