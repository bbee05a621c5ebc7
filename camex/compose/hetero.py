"""Heterogeneous experts (MERGEME.md §2.3): decoder LMs of different depth and/or width that share
a vocabulary, in one sequence-routed MoE.

Each expert keeps its whole stack (blocks and final norm). The token embedding and the LM head
are shared at the largest width `d_m`, initialised as the mean of the experts' (narrower ones
zero-padded). Per expert a projection in (`d_m → d_i`) and out (`d_i → d_m`): the identity where
the widths match, random otherwise. A sequence-level router on the mean shared embedding of the
real tokens picks the top-K experts; their projected outputs are summed with its weights.

`from_checkpoints` builds it from saved experts (`run.py` with `compose.heterogeneous.enabled=true`,
docs/compose.md); the experts' vocabularies are compared from their config.json before any weight
is read (`check_vocabularies`). Only each expert's stack is kept (`base_model`): its own LM head is
dropped and its own token embedding, never used (the shared one feeds it), is frozen.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from camex.compose.heuristic import topk_softmax
from camex.compose.sources import Checkpoint, ComposeError, open_checkpoint
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


@dataclass
class HeteroSpec:
    """`compose.heterogeneous`: the experts are the whole MoE (no base, no shared merge)."""

    enabled: bool = False
    top_k: int = 2  # experts per sequence, from the sequence router (conf/compose/mergeme.yaml)

    def __post_init__(self) -> None:
        if not isinstance(self.enabled, bool):
            raise ValueError(f"compose.heterogeneous.enabled={self.enabled!r} is invalid; allowed: true | false")
        if isinstance(self.top_k, bool) or not isinstance(self.top_k, int) or self.top_k < 1:
            raise ValueError(f"compose.heterogeneous.top_k={self.top_k!r} is invalid; allowed: an integer >= 1")


def check_vocabularies(checkpoints: Mapping[str, Checkpoint]) -> int:
    """The vocabulary size every expert's config.json states; one line naming them if they differ."""
    sizes = {d: c.config.get("vocab_size") for d, c in checkpoints.items()}
    lacking = [d for d, v in sizes.items() if not isinstance(v, int)]
    if lacking:
        raise ComposeError(f"compose.experts.{lacking[0]}: its config.json has no vocab_size; allowed: "
                           "a causal LM saved with save_pretrained")  # fmt: skip
    if len(set(sizes.values())) > 1:
        said = ", ".join(f"{d}: {v}" for d, v in sizes.items())
        raise ComposeError(f"compose.experts: the experts' vocabularies differ ({said}); "
                           "compose.heterogeneous needs experts that share one tokenizer")  # fmt: skip
    return next(iter(sizes.values()))


class HeterogeneousMoE(nn.Module):
    _keys_to_ignore_on_save = None  # read by the transformers Trainer when a checkpoint misses keys

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
        # each expert's stack without its own embedding lookup or head: `base_model(inputs_embeds=...)`;
        # its token embedding is never used, so it is frozen rather than left without a gradient
        self.experts = nn.ModuleList(e.base_model for e in experts)
        for e in experts:
            e.get_input_embeddings().requires_grad_(False)
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
        """`expert_weights` `[batch, n]` replaces the router (evaluation, tests); the weights used
        are kept in `last_expert_weights`."""
        w = self.route(input_ids, attention_mask) if expert_weights is None else expert_weights
        e = self.embed(input_ids)
        mixed = torch.zeros_like(e)
        for k, expert in enumerate(self.experts):
            if not bool((w[:, k] != 0).any()):
                continue  # selected by no sequence of the batch
            h = expert(inputs_embeds=self.proj_in[k](e), attention_mask=attention_mask).last_hidden_state
            mixed = mixed + w[:, k].to(h.dtype).view(-1, 1, 1) * self.proj_out[k](h)
        logits = self.head(mixed)
        self.last_expert_weights = w.detach()
        out = {"logits": logits}
        if labels is not None:
            out["loss"] = F.cross_entropy(
                logits[:, :-1].flatten(0, 1).float(), labels[:, 1:].flatten(), ignore_index=-100
            )
        return out


def from_checkpoints(experts: Mapping[str, str], *, top_k: int = 1) -> HeterogeneousMoE:
    """The heterogeneous MoE of saved causal LMs `{domain: checkpoint}` (expert `i` is the `i`-th
    domain); refused in one line, before any weight is read, if their vocabularies differ."""
    from transformers import AutoModelForCausalLM

    checkpoints = {d: open_checkpoint(ref, f"compose.experts.{d}") for d, ref in experts.items()}
    check_vocabularies(checkpoints)
    return HeterogeneousMoE([AutoModelForCausalLM.from_pretrained(str(c.path)) for c in checkpoints.values()],
                            top_k=top_k)  # fmt: skip
