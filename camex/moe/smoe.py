"""Vanilla sparse MoE linear (SPEC §8 SMoE): each token goes to its top-k of the experts."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from camex.moe.merged import take_routing
from camex.moe.units import SharedRouting, UnitRouter


class TokenMoELinear(nn.Module):
    """`y_t = Σ_{e ∈ topk(t)} g_{t,e} (x_t E_eᵀ + b_e)`, computed only for routed tokens."""

    def __init__(
        self,
        *,
        in_features: int,
        out_features: int,
        num_experts: int,
        bias: bool,
        router: UnitRouter | None,
        shared: SharedRouting | None = None,
    ) -> None:
        super().__init__()
        self.in_features, self.out_features, self.num_experts = in_features, out_features, num_experts
        self.router, self.shared = router, shared
        self.expert_weight = nn.Parameter(torch.empty(num_experts, out_features, in_features))
        self.expert_bias = nn.Parameter(torch.empty(num_experts, out_features)) if bias else None

    def extra_repr(self) -> str:
        return f"in={self.in_features}, out={self.out_features}, experts={self.num_experts}"

    @property
    def weight(self) -> torch.Tensor:
        """One expert's `[O, I]` weight, for model code that reads the dense layer's dtype (T5)."""
        return self.expert_weight[0]

    @torch.no_grad()
    def load_dense(self, weight: torch.Tensor, bias: torch.Tensor | None) -> None:
        self.expert_weight.copy_(weight.expand_as(self.expert_weight))
        if self.expert_bias is not None:
            self.expert_bias.copy_(bias.expand_as(self.expert_bias))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        routing = take_routing(x, self.router, self.shared)
        tokens = x.reshape(-1, self.in_features)
        if routing.unit != "token" or routing.scores.shape[0] != tokens.shape[0]:
            raise RuntimeError("TokenMoELinear needs token routing")
        out = tokens.new_zeros(tokens.shape[0], self.out_features)
        for e in range(self.num_experts):
            idx = routing.scores[:, e].nonzero().squeeze(-1)
            if idx.numel() == 0:
                continue
            bias = None if self.expert_bias is None else self.expert_bias[e]
            y = F.linear(tokens[idx], self.expert_weight[e], bias)
            # under autocast `y` is in the low precision while `out` keeps the input's dtype
            out = out.index_add(0, idx, (y * routing.scores[idx, e, None].to(y.dtype)).to(out.dtype))
        return out.view(*x.shape[:-1], self.out_features)
