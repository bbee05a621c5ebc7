"""Separate attention (MERGEME.md §2.2): each selected expert runs its own whole block.

With heuristic routing (`camex.compose.heuristic`), block `i` of the composed decoder becomes
`h ← Σ_k w_k · block_i^{(k)}(h)`: each expert whose weight is non-zero for some sequence of the
batch runs its own attention and FFN on the shared hidden state, and the outputs are mixed with
each sequence's weights. Embeddings, the final norm and the LM head stay the model's (the merged
ones of a composed model). Merged attention (one attention, MoE FFNs) remains the default.

Generation keeps one KV cache per selected expert: the first running expert uses the model's own
cache (which also gives the model its position), the others a cache each held by the wrapper for
that same outer cache. Set the weights before the prompt and keep them through generation (the
set of running experts must not change while a cache is in use); greedy or sampled decoding, no
beam reordering of the extra caches.
"""

from __future__ import annotations

import inspect
from collections.abc import Sequence

import torch
from torch import nn

from camex.compose.heuristic import SequenceWeights


def block_list(model: nn.Module) -> nn.ModuleList:
    """The decoder's blocks: `layers` (Llama family) or `h` (GPT-2)."""
    from camex.upcycle.gpt2 import is_gpt2
    from camex.upcycle.llama import _decoders

    decoders = _decoders(model)
    if decoders:
        return decoders[0].layers
    if is_gpt2(model):
        return model.transformer.h
    raise ValueError(f"separate attention needs a decoder LM (Llama family or GPT-2); got {type(model).__name__}")


class ExpertCaches:
    """One KV cache per expert beyond the first running one, kept for one outer cache at a time."""

    def __init__(self) -> None:
        self.outer: object | None = None
        self.caches: dict[int, object] = {}

    def side(self, outer: object, expert: int):
        from transformers import DynamicCache

        if self.outer is not outer:  # a new generation (or a new cache): start fresh
            self.outer, self.caches = outer, {}
        return self.caches.setdefault(expert, DynamicCache())


class MixedBlock(nn.Module):
    """Block `i`: the experts' own blocks `i`, outputs mixed with the per-sequence weights."""

    def __init__(self, blocks: Sequence[nn.Module], weights: SequenceWeights, caches: ExpertCaches) -> None:
        super().__init__()
        self.experts = nn.ModuleList(blocks)
        self.weights, self.caches = weights, caches
        self._signature = inspect.signature(blocks[0].forward)

    def forward(self, hidden_states: torch.Tensor, *args, **kwargs):
        w = self.weights.weights
        if w is None:
            raise RuntimeError("separate attention needs the weights of each sequence: call set_sequence_weights first")
        if w.shape != (hidden_states.shape[0], len(self.experts)):
            raise RuntimeError(f"separate attention: weights {tuple(w.shape)} for a batch of {hidden_states.shape[0]} "
                               f"sequences and {len(self.experts)} experts")  # fmt: skip
        bound = self._signature.bind(hidden_states, *args, **kwargs)
        outer = bound.arguments.get("past_key_values")
        running = [k for k in range(len(self.experts)) if bool((w[:, k] != 0).any())]
        mixed, tuple_out = None, False
        for j, k in enumerate(running):
            if outer is not None and j > 0:
                bound.arguments["past_key_values"] = self.caches.side(outer, k)
            else:
                bound.arguments["past_key_values"] = outer
            y = self.experts[k](*bound.args, **bound.kwargs)
            tuple_out = isinstance(y, tuple)
            y = y[0] if tuple_out else y
            term = w[:, k].to(device=y.device, dtype=y.dtype).view(-1, *[1] * (y.dim() - 1)) * y
            mixed = term if mixed is None else mixed + term
        return (mixed,) if tuple_out else mixed


def separate_attention(model: nn.Module, experts: Sequence[nn.Module]) -> nn.Module:
    """Make `model` (the composed or base decoder: its embeddings, final norm and head are kept)
    run each expert's own blocks, mixed per sequence; returns it. `experts` are dense models of
    `model`'s architecture (same depth); their blocks are used, not copied. Route with
    `camex.compose.heuristic.set_sequence_weights(model, weights)`, weights `[batch, len(experts)]`."""
    if not experts:
        raise ValueError("separate attention needs at least one expert")
    blocks = block_list(model)
    per_expert = [block_list(e) for e in experts]
    for i, b in enumerate(per_expert):
        if len(b) != len(blocks):
            raise ValueError(f"expert {i} has {len(b)} blocks where the model has {len(blocks)}; experts must share "
                             "its depth (heterogeneous experts are not supported here)")  # fmt: skip
    holder = getattr(model, "camex_sequence_weights", None) or SequenceWeights()
    caches = ExpertCaches()
    for i in range(len(blocks)):
        blocks[i] = MixedBlock([b[i] for b in per_expert], holder, caches)
    model.camex_sequence_weights = holder
    return model
