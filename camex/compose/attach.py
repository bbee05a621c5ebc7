"""Heuristic routing attached to a composed decoder LM for training and evaluation (`run.py`
with `compose.routing.method` set): every forward pass that starts a sequence (no KV cache given)
first routes the batch (`camex.compose.heuristic.route`), then runs with those weights; cached
generation steps keep them. The extra cost accumulates in `model.camex_routing_cost`.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from camex.compose.heuristic import HeuristicRouting, RoutingCost, install_sequence_weights, route, task_vectors
from camex.compose.separate import block_list, separate_attention


def attach(
    model: nn.Module, spec: HeuristicRouting, sources: Sequence[nn.Module], base: nn.Module | None = None
) -> RoutingCost:
    """Route `model` (composed from `sources`, in the composition's expert order) by `spec`.
    The sources are frozen and kept outside the model's parameters (not trained, not saved),
    except their blocks under separate attention, which become the model's blocks."""
    sources = [s.eval().requires_grad_(False) for s in sources]
    if spec.method == "task_vector" and base is None:
        raise ValueError("compose.routing.method=task_vector needs the base model")
    taus = task_vectors(base, sources) if spec.method == "task_vector" else None
    if spec.attention == "separate":
        blocks = block_list(model)  # the same ModuleList, its entries replaced by the mixed blocks
        separate_attention(model, sources)
        for p in blocks.parameters():  # the experts' blocks are trainable parts of this model now
            p.requires_grad_(True)
    else:
        install_sequence_weights(model)
    holder, cost = model.camex_sequence_weights, RoutingCost()
    outside = {"sources": list(sources), "base": base}  # a plain dict: not registered as submodules

    def pre(module, args, kwargs):
        if kwargs.get("past_key_values") is not None and holder.weights is not None:
            cached = kwargs["past_key_values"]
            if getattr(cached, "get_seq_length", lambda: 0)() > 0:
                return None  # a generation step: the prompt's weights stay
        ids = kwargs.get("input_ids", args[0] if args else None)
        if ids is None:
            raise RuntimeError("heuristic routing needs input_ids")
        with torch.enable_grad() if spec.method == "task_vector" else torch.no_grad():
            holder.weights = route(spec, ids, kwargs.get("attention_mask"), sources=outside["sources"],
                                   base=outside["base"], taus=taus, cost=cost)  # fmt: skip
        return None

    model.register_forward_pre_hook(pre, with_kwargs=True)
    model.camex_routing_cost = cost
    return cost
