"""Routing units (SPEC §5): which tokens share one merged weight, and what the router sees.

* `sequence`: one unit per sequence, scored on the mean layer input over non-padding positions
  (`padding_mean="include"` keeps the released padding-inclusive mean).
* `segment`: causal segments of `T` tokens (the last may be shorter); segment `j` is merged from
  the scores of segment `j − 1`; segment 0 uses its own scores detached (released) or uniform
  scores (no token sees its future).
* `memory`: one unit per sequence scored on a pooled memory set by the model, such as the
  encoder output for decoder layers of an encoder-decoder model.
* `token`: one unit per token (vanilla SMoE).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Literal

import torch
import torch.nn.functional as F
from torch import nn

from camex.moe.gate import NoisyTopKGate

Unit = Literal["sequence", "segment", "memory", "token"]


class RoutingContext:
    """Per-forward facts about a stack of layers, filled by hooks on the stack's module.

    `token_mask` is the `[batch, length]` 0/1 padding mask of the stack's input (None: no
    padding); `memory` the pooled `[batch, d]` encoder output that decoder layers route on.
    """

    def __init__(self) -> None:
        self.token_mask: torch.Tensor | None = None
        self.memory: torch.Tensor | None = None

    def clear(self) -> None:
        self.token_mask = None
        self.memory = None


@dataclass
class Routing:
    """Scores `[units, n]` of one routed forward and how units map to tokens."""

    scores: torch.Tensor
    unit: Unit
    segment_len: int = 0


class SharedRouting:
    """Hands one router's routing to the other linears of the same FFN block (router per block)."""

    def __init__(self) -> None:
        self.routing: Routing | None = None


def masked_mean(x: torch.Tensor, mask: torch.Tensor | None, dim: int) -> torch.Tensor:
    """Mean of `x` over `dim`, counting only positions where `mask` (shaped like x without the
    feature axis) is non-zero; a unit with no such position gets a zero vector."""
    if mask is None:
        return x.mean(dim)
    m = mask.to(x.dtype).unsqueeze(-1)
    return (x * m).sum(dim) / m.sum(dim).clamp(min=1.0)


def as_sequences(x: torch.Tensor) -> torch.Tensor:
    """View `[batch, ..., d]` (a timm Swin block gives `[B, H, W, C]`) as `[batch, length, d]`."""
    if x.dim() < 3:
        raise ValueError(f"sequence routing needs inputs shaped [batch, ..., features], got {tuple(x.shape)}")
    return x.reshape(x.shape[0], -1, x.shape[-1])


def pad_to_segments(x: torch.Tensor, segment_len: int) -> tuple[torch.Tensor, int]:
    """Right-pad `[B, L, d]` to a multiple of `segment_len`; returns `[B, S, T, d]` and `S`."""
    b, length, d = x.shape
    s = math.ceil(length / segment_len)
    x = F.pad(x, (0, 0, 0, s * segment_len - length))
    return x.view(b, s, segment_len, d), s


class UnitRouter(nn.Module):
    """Pools a layer's input into units and scores them with a gate."""

    def __init__(
        self,
        *,
        gate: NoisyTopKGate,
        unit: Unit,
        context: RoutingContext | None = None,
        padding_mean: Literal["exclude", "include"] = "exclude",
        segment_len: int = 256,
        first_segment: Literal["detach", "uniform"] = "detach",
    ) -> None:
        super().__init__()
        self.gate = gate
        self.unit = unit
        self.context = context
        self.padding_mean = padding_mean
        self.segment_len = segment_len
        self.first_segment = first_segment

    def extra_repr(self) -> str:
        return f"unit={self.unit}, segment_len={self.segment_len}, first_segment={self.first_segment}"

    def _token_mask(self, x: torch.Tensor) -> torch.Tensor | None:
        mask = self.context.token_mask if self.context is not None else None
        if mask is None or self.padding_mean == "include":
            return None
        length = x.shape[1]
        if mask.shape[0] != x.shape[0] or mask.shape[1] < length:
            raise ValueError(f"padding mask {tuple(mask.shape)} does not cover inputs {tuple(x.shape[:2])}")
        return mask[:, -length:]  # with a KV cache the mask also covers past positions

    def forward(self, x: torch.Tensor) -> Routing:
        if self.unit == "token":
            return Routing(self.gate(x.reshape(-1, x.shape[-1])), "token")
        if self.unit == "memory":
            memory = self.context.memory if self.context is not None else None
            if memory is None:
                raise RuntimeError("memory routing needs the pooled encoder output; run the whole model")
            return Routing(self.gate(memory.to(x.dtype)), "memory")
        seqs = as_sequences(x)
        if self.unit == "sequence":
            return Routing(self.gate(masked_mean(seqs, self._token_mask(seqs), 1)), "sequence")
        return self._route_segments(seqs)

    def _route_segments(self, x: torch.Tensor) -> Routing:
        b, t = x.shape[0], self.segment_len
        segs, s = pad_to_segments(x, t)
        mask = self._token_mask(x)
        real = torch.ones(x.shape[:2], dtype=x.dtype, device=x.device) if mask is None else mask.to(x.dtype)
        real, _ = pad_to_segments(real.unsqueeze(-1), t)
        pooled = masked_mean(segs, real.squeeze(-1), 2)  # [B, S, d]
        own = self.gate(pooled.reshape(b * s, -1)).view(b, s, -1)
        if self.first_segment == "uniform":
            first = torch.full_like(own[:, :1], 1.0 / own.shape[-1])
        else:
            first = own[:, :1].detach()
        used = torch.cat([first, own[:, :-1]], dim=1)  # segment j merges with segment j-1's scores
        return Routing(used.reshape(b * s, -1), "segment", t)


def per_unit(x: torch.Tensor, routing: Routing, fn: Callable[[torch.Tensor], torch.Tensor]) -> torch.Tensor:
    """Group the tokens of `x` `[batch, ..., d]` by routed unit as `[units, T, d]`, apply `fn`
    (a per-unit linear map to `[units, T, O]`) and return the result in the layout of `x`."""
    seqs = as_sequences(x)
    b, length, _ = seqs.shape
    if routing.unit == "segment":
        segs, s = pad_to_segments(seqs, routing.segment_len)
        seqs = segs.view(b * s, routing.segment_len, -1)
    y = fn(seqs)
    out_features = y.shape[-1]
    if routing.unit == "segment":
        y = y.view(b, -1, out_features)[:, :length]
    return y.reshape(*x.shape[:-1], out_features)


def apply_per_unit(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, routing: Routing) -> torch.Tensor:
    """`y = x Wᵤᵀ + bᵤ` with the unit's weight `weight[u]` `[units, O, I]` for its tokens."""

    def linear(seqs: torch.Tensor) -> torch.Tensor:
        if bias is None:
            return torch.bmm(seqs, weight.transpose(1, 2))
        return torch.baddbmm(bias.unsqueeze(1), seqs, weight.transpose(1, 2))

    return per_unit(x, routing, linear)
