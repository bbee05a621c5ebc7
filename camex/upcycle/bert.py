"""BERT family (BERT, MiniLM, RoBERTa...): `intermediate.dense` and `output.dense` per layer."""

from __future__ import annotations

from torch import nn

from camex.moe.units import RoutingContext
from camex.upcycle.sites import Plan, Site


def _encoders(model: nn.Module) -> list[nn.Module]:
    """Modules holding `encoder.layer[i].{intermediate,output}.dense` (BertModel and kin)."""
    found = []
    for m in model.modules():
        layers = getattr(getattr(m, "encoder", None), "layer", None)
        if isinstance(layers, nn.ModuleList) and layers and hasattr(layers[0], "intermediate"):
            found.append(m)
    return found


def is_bert(model: nn.Module) -> bool:
    return bool(_encoders(model))


def plan_bert(model: nn.Module) -> Plan:
    plan = Plan("bert", [])
    for encoder_model in _encoders(model):
        context = RoutingContext()
        plan.mask_hooks.append((encoder_model, context))
        for i, layer in enumerate(encoder_model.encoder.layer):
            plan.sites.append(Site(layer.intermediate, "dense", "layer", i, "intermediate", context, "sequence"))
            plan.sites.append(Site(layer.output, "dense", "layer", i, "output", context, "sequence"))
    return plan
