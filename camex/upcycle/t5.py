"""T5 (ReLU `wi`/`wo` and gated `wi_0`/`wi_1`/`wo`), encoder and decoder stacks."""

from __future__ import annotations

from torch import nn

from camex.moe.units import RoutingContext
from camex.upcycle.sites import Plan, Site


def is_t5(model: nn.Module) -> bool:
    return any(type(m).__name__ == "T5Stack" for m in model.modules())


def plan_t5(model: nn.Module, *, decoder_routing: str) -> Plan:
    plan = Plan("t5", [])
    for stack in model.modules():
        if type(stack).__name__ != "T5Stack":
            continue
        kind = "decoder" if stack.is_decoder else "encoder"
        context = RoutingContext()
        on_memory = stack.is_decoder and decoder_routing == "encoder"
        (plan.memory_hooks if stack.is_decoder else plan.mask_hooks).append((stack, context))
        for i, block in enumerate(stack.block):
            ffn = block.layer[-1].DenseReluDense
            roles = ("wi_0", "wi_1", "wo") if hasattr(ffn, "wi_0") else ("wi", "wo")
            for role in roles:
                plan.sites.append(
                    Site(
                        ffn,
                        role,
                        kind,
                        i,
                        role,
                        context,
                        "memory" if on_memory else "sequence",
                        stack.config.d_model if on_memory else None,
                    )
                )
    return plan
