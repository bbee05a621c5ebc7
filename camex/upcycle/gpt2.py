"""GPT-2: `mlp.c_fc` and `mlp.c_proj` (Conv1D, weights stored `[in, out]`); causal segments."""

from __future__ import annotations

from torch import nn

from camex.moe.units import RoutingContext
from camex.upcycle.sites import Plan, Site


def is_gpt2(model: nn.Module) -> bool:
    return any(type(m).__name__ == "GPT2Model" for m in model.modules())


def plan_gpt2(model: nn.Module) -> Plan:
    plan = Plan("gpt2", [])
    for transformer in (m for m in model.modules() if type(m).__name__ == "GPT2Model"):
        context = RoutingContext()
        plan.mask_hooks.append((transformer, context))
        for i, block in enumerate(transformer.h):
            for role in ("c_fc", "c_proj"):
                plan.sites.append(Site(block.mlp, role, "h", i, role, context, "segment"))
    return plan
