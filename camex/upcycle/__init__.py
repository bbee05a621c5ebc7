"""Upcycle a dense pretrained model into a merged-expert model (SPEC §6).

    model = upcycle(model, "camex_ties", MoEOptions(num_experts=7, rank=1))

Every routed expert and the base expert start as copies of the dense FFN weight, so at step 0
the upcycled model computes what the dense model computes. Attention is untouched.
"""

from __future__ import annotations

from torch import nn

from camex.upcycle.bert import is_bert, plan_bert
from camex.upcycle.build import apply_plan
from camex.upcycle.gpt2 import is_gpt2, plan_gpt2
from camex.upcycle.llama import is_llama, plan_llama
from camex.upcycle.sites import Plan
from camex.upcycle.t5 import is_t5, plan_t5
from camex.upcycle.vision import is_timm_vision, plan_vision
from camex.variants import MergeVariant, MoEOptions, get_variant

FAMILIES = ("t5", "gpt2", "bert", "llama", "timm")


def plan_for(model: nn.Module, options: MoEOptions) -> Plan:
    if is_t5(model):
        return plan_t5(model, decoder_routing=options.decoder_routing)
    if is_gpt2(model):
        return plan_gpt2(model)
    if is_bert(model):
        return plan_bert(model)
    if is_llama(model):
        return plan_llama(model)
    if is_timm_vision(model):
        return plan_vision(model)
    raise ValueError(f"cannot upcycle {type(model).__name__}; supported families: {list(FAMILIES)}")


def upcycle(model: nn.Module, variant: str | MergeVariant, options: MoEOptions | None = None) -> nn.Module:
    """Replace the FFN linears of `model` in place with the variant's MoE layers; returns it."""
    variant = get_variant(variant) if isinstance(variant, str) else variant
    options = options or MoEOptions()
    if variant.layer == "dense":
        return model
    return apply_plan(model, plan_for(model, options), variant, options)


__all__ = ["FAMILIES", "plan_for", "upcycle"]
