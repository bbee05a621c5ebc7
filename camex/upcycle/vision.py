"""timm vision transformers (ViT, Swin, ...): every block's `mlp.fc1` and `mlp.fc2`.

Blocks are numbered in model order across stages, so a Swin's stages form one index range.
Images have no padding, so routing needs no mask.
"""

from __future__ import annotations

from torch import nn

from camex.moe.units import RoutingContext
from camex.upcycle.sites import Plan, Site


def _mlps(model: nn.Module) -> list[nn.Module]:
    return [
        m
        for name, m in model.named_modules()
        if name.endswith("mlp") and isinstance(getattr(m, "fc1", None), nn.Linear) and isinstance(m.fc2, nn.Linear)
    ]


def is_timm_vision(model: nn.Module) -> bool:
    return type(model).__module__.startswith("timm.") and bool(_mlps(model))


def plan_vision(model: nn.Module) -> Plan:
    context = RoutingContext()
    sites = []
    for i, mlp in enumerate(_mlps(model)):
        sites += [Site(mlp, role, "blocks", i, role, context, "sequence") for role in ("fc1", "fc2")]
    return Plan("timm", sites)
