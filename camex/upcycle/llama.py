"""Llama-family decoders (Llama, Qwen2, Mistral...): gated `mlp.{gate,up,down}_proj` per layer.

Recognised by structure, not by class name, so every decoder built the Llama way qualifies: a
module with `layers[i].mlp` holding the three projections. Routing is causal, by segment (GPT-2).
"""

from __future__ import annotations

from torch import nn

from camex.moe.units import RoutingContext
from camex.upcycle.sites import Plan, Site

ROLES = ("gate_proj", "up_proj", "down_proj")


def _decoders(model: nn.Module) -> list[nn.Module]:
    found = []
    for m in model.modules():
        layers = getattr(m, "layers", None)
        if (
            isinstance(layers, nn.ModuleList)
            and layers
            and all(hasattr(getattr(layers[0], "mlp", None), r) for r in ROLES)
        ):
            found.append(m)
    return found


def is_llama(model: nn.Module) -> bool:
    return bool(_decoders(model))


def plan_llama(model: nn.Module) -> Plan:
    plan = Plan("llama", [])
    for decoder in _decoders(model):
        context = RoutingContext()
        plan.mask_hooks.append((decoder, context))
        for i, layer in enumerate(decoder.layers):
            for role in ROLES:
                plan.sites.append(Site(layer.mlp, role, "layers", i, role, context, "segment"))
    return plan
