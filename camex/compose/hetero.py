"""Heterogeneous experts (MERGEME.md §2.3): decoder LMs of different depth and/or width that share
a vocabulary, in one sequence-routed MoE.

Each expert keeps its whole stack (blocks and final norm). The token embedding and the LM head
are shared at the largest width `d_m`, initialised as the mean of the experts' (narrower ones
zero-padded). Per expert a projection in (`d_m → d_i`) and out (`d_i → d_m`): the identity where
the widths match, random otherwise. A sequence-level router on the mean shared embedding of the
real tokens picks the top-K experts; their projected outputs are summed with its weights.

Not yet: training it through `run.py` (it is an `nn.Module` with the usual
`(input_ids, attention_mask, labels) -> {loss, logits}` interface).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from camex.compose.heuristic import topk_softmax
from camex.moe.units import masked_mean


def zero_padded_mean(tensors: Sequence[torch.Tensor], width: int) -> torch.Tensor:
    """The mean of `[rows, d_i]` tensors, each zero-padded on the right to `[rows, width]`."""
    return torch.stack([F.pad(t.detach().float(), (0, width - t.shape[-1])) for t in tensors]).mean(0)


def _projection(d_in: int, d_out: int) -> nn.Linear:
    layer = nn.Linear(d_in, d_out, bias=False)
    if d_in == d_out:
        with torch.no_grad():
            layer.weight.copy_(torch.eye(d_out))
    return layer  # otherwise PyTorch's random initialisation


class HeterogeneousMoE(nn.Module):
    def __init__(self, experts: Sequence[nn.Module], *, top_k: int = 1) -> None:
        super().__init__()
        if not experts:
            raise ValueError("heterogeneous MoE: no experts")
        vocab = [e.get_input_embeddings().weight.shape[0] for e in experts]
        if len(set(vocab)) > 1:
            raise ValueError(f"heterogeneous MoE: the experts' vocabularies differ (sizes {vocab}); "
                             "allowed: experts that share one tokenizer")  # fmt: skip
        widths = [e.get_input_embeddings().weight.shape[1] for e in experts]
        self.width, self.top_k = max(widths), top_k
        self.embed = nn.Embedding(vocab[0], self.width)
        self.head = nn.Linear(self.width, vocab[0], bias=False)
        with torch.no_grad():
            self.embed.weight.copy_(zero_padded_mean([e.get_input_embeddings().weight for e in experts], self.width))
            self.head.weight.copy_(zero_padded_mean([e.get_output_embeddings().weight for e in experts], self.width))
        # each expert's stack without its own embedding lookup or head: `base_model(inputs_embeds=...)`
        self.experts = nn.ModuleList(experts)
        self.proj_in = nn.ModuleList(_projection(self.width, d) for d in widths)
        self.proj_out = nn.ModuleList(_projection(d, self.width) for d in widths)
        self.router = nn.Linear(self.width, len(experts), bias=False)

    def route(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        """`[batch, n]`: softmax over the top-K router scores of the mean shared embedding."""
        e = self.embed(input_ids)
        mask = torch.ones_like(input_ids) if attention_mask is None else attention_mask
        return topk_softmax(self.router(masked_mean(e, mask, 1)), self.top_k)

    def forward(
        self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None, labels: torch.Tensor | None = None,
        expert_weights: torch.Tensor | None = None,
    ) -> dict:  # fmt: skip
        """`expert_weights` `[batch, n]` replaces the router (evaluation, tests)."""
        w = self.route(input_ids, attention_mask) if expert_weights is None else expert_weights
        e = self.embed(input_ids)
        mixed = torch.zeros_like(e)
        for k, expert in enumerate(self.experts):
            if not bool((w[:, k] != 0).any()):
                continue  # selected by no sequence of the batch
            h = expert.base_model(inputs_embeds=self.proj_in[k](e), attention_mask=attention_mask).last_hidden_state
            mixed = mixed + w[:, k].to(h.dtype).view(-1, 1, 1) * self.proj_out[k](h)
        logits = self.head(mixed)
        out = {"logits": logits, "expert_weights": w}
        if labels is not None:
            out["loss"] = F.cross_entropy(
                logits[:, :-1].flatten(0, 1).float(), labels[:, 1:].flatten(), ignore_index=-100
            )
        return out
