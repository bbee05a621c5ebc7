"""Merged-expert linear: one weight per routed unit, `Ê = E_m + α Σ_i s_i M_i(mask(τ_i))`.

Router, mask strategy and curvature operator are injected. In an EP-CAMEx chain the base expert
is not stored but received from the chain (`camex.moe.chain`).
"""

from __future__ import annotations

from typing import Literal

import torch
from torch import nn

from camex.merging import domain_vectors, merged_linear
from camex.moe.cache import ParameterMemo, parameter_key
from camex.moe.curvature import KroneckerCurvature
from camex.moe.masking import NoMask
from camex.moe.units import Routing, SharedRouting, UnitRouter, per_unit

MaskOrder = Literal["mask_first", "curvature_first"]


def take_routing(x: torch.Tensor, router: UnitRouter | None, shared: SharedRouting | None) -> Routing:
    """Route with the layer's own router (publishing to `shared`), or reuse the block's routing."""
    if router is not None:
        routing = router(x)
        if shared is not None:
            shared.routing = routing
        return routing
    if shared is None or shared.routing is None:
        raise RuntimeError("this layer shares its block's router, which has not run in this forward")
    return shared.routing


class MergedExpertLinear(nn.Module):
    def __init__(
        self,
        *,
        in_features: int,
        out_features: int,
        num_experts: int,
        bias: bool,
        router: UnitRouter | None,
        shared: SharedRouting | None = None,
        mask: NoMask | None = None,
        curvature: KroneckerCurvature | None = None,
        alpha: float = 1.0,
        mask_order: MaskOrder = "mask_first",
        store_base: bool = True,
    ) -> None:
        super().__init__()
        self.in_features, self.out_features, self.num_experts = in_features, out_features, num_experts
        self.router, self.shared, self.curvature = router, shared, curvature
        self.mask = mask or NoMask()
        self.alpha, self.mask_order = alpha, mask_order
        self.expert_weight = nn.Parameter(torch.empty(num_experts, out_features, in_features))
        self.expert_bias = nn.Parameter(torch.empty(num_experts, out_features)) if bias else None
        self.base_weight = nn.Parameter(torch.empty(out_features, in_features)) if store_base else None
        self.base_bias = nn.Parameter(torch.empty(out_features)) if bias and store_base else None
        self.chain = None  # an ExpertChain that supplies the base expert, for EP-CAMEx
        self.chain_index = 0
        self._eval_cache = ParameterMemo()
        self.eval_cache = True

    def extra_repr(self) -> str:
        return (
            f"in={self.in_features}, out={self.out_features}, experts={self.num_experts}, "
            f"alpha={self.alpha}, mask={self.mask}, order={self.mask_order}, "
            f"stores_base={self.base_weight is not None}"
        )

    @property
    def weight(self) -> torch.Tensor:
        """One expert's `[O, I]` weight, for model code that reads the dense layer's dtype (T5)."""
        return self.expert_weight[0]

    @torch.no_grad()
    def load_dense(self, weight: torch.Tensor, bias: torch.Tensor | None) -> None:
        """Upcycle: the base and every routed expert become copies of the dense weight."""
        self.expert_weight.copy_(weight.expand_as(self.expert_weight))
        if self.base_weight is not None:
            self.base_weight.copy_(weight)
        if self.expert_bias is not None:
            self.expert_bias.copy_(bias.expand_as(self.expert_bias))
            if self.base_bias is not None:
                self.base_bias.copy_(bias)

    # -- parameter-only part: the operands of the merge ------------------------------------
    def merge_parameters(self) -> list[torch.Tensor]:
        """Parameters the merged weight depends on, apart from the scores."""
        own = [self.base_weight, self.base_bias, self.expert_weight, self.expert_bias]
        own = [p for p in own if p is not None]
        if self.curvature is not None:
            own += list(self.curvature.parameters())
        return own

    def curve(self, taus: torch.Tensor, *, bias: bool = False) -> torch.Tensor:
        if self.curvature is None:
            return taus
        return self.curvature.bias(taus) if bias else self.curvature.weight(taus)

    def transform(self, taus: torch.Tensor, *, bias: bool = False) -> torch.Tensor:
        """`γ̃_i`: mask and curvature in the configured order (mask from raw `τ` either way)."""
        mask = self.mask.entries(taus, self.training)
        if mask is None:
            return self.curve(taus, bias=bias)
        if self.mask_order == "mask_first":
            return self.curve(taus * mask, bias=bias)
        return self.curve(taus, bias=bias) * mask

    def _operands(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
        if self.chain is not None:
            link = self.chain.link(self.chain_index)
            base_w, base_b = link.base_weight, link.base_bias
            if type(self.mask) is NoMask:  # the chain already computed M_i(τ_i)
                return base_w, link.curved_weight, base_b, link.curved_bias
        else:
            base_w, base_b = self.base_weight, self.base_bias
        if self._owns_curved():  # M_i(E_i − E_m) without forming τ; its gradient overwrites it
            curved_w = self.curvature.weight(self.expert_weight, base_w, reuse_grad=True)
            curved_b = None if base_b is None else self.curvature.bias(self.expert_bias, base_b)
            return base_w, curved_w, base_b, curved_b
        curved_w = self.transform(domain_vectors(self.expert_weight, base_w))
        curved_b = None if base_b is None else self.transform(domain_vectors(self.expert_bias, base_b), bias=True)
        return base_w, curved_w, base_b, curved_b

    def dependencies(self) -> list[torch.Tensor]:
        if self.chain is None:
            return self.merge_parameters()
        return self.chain.parameters_through(self.chain_index)

    def operands(self):
        """`(E_m, γ̃, b_m, γ̃_b)`; the merge applies α inside its product. Outside training with
        autograd off this depends on parameters only, so it is cached until a parameter changes
        (test-time reparameterisation): evaluation then costs what Euclidean merging costs.
        `eval_cache = False` turns the cache off (for benchmarks and debugging); a compiled
        forward computes the operands in its graph (the cache key reads storage addresses).
        Without a mask or chain, the backward pass of a CAMEx layer writes the gradient of `γ̃`
        (and then of `E`) over `γ̃`'s memory: a caller that backpropagates through the returned
        `γ̃` itself must not keep that gradient (no hook or `retain_grad` on it)."""
        if self._cached():
            return self._eval_cache.get(parameter_key(self.dependencies()), self._operands)
        self._eval_cache.clear()
        return self._operands()

    def _cached(self) -> bool:
        if not self.eval_cache or self.training or torch.is_grad_enabled():
            return False
        return not torch.compiler.is_compiling()

    def _owns_curved(self) -> bool:
        """Whether `_operands` forms `γ̃ = M(E − E_m)` for this forward alone: the merged linear
        then writes `∂γ̃` over `γ̃` in its backward pass, and the curvature `∂E` over `∂γ̃`, so
        three `[n, O, I]` tensors share one allocation (`reuse_deltas`, `reuse_grad`)."""
        return self.chain is None and type(self.mask) is NoMask and self.curvature is not None

    def _merges_experts(self) -> bool:
        """Euclidean merging without mask or chain, uncached: the merge takes the experts and the
        base and forms `τ` inside its tiles (`merged_linear(..., around=True)`)."""
        return self.curvature is None and self.chain is None and type(self.mask) is NoMask and not self._cached()

    def train(self, mode: bool = True) -> MergedExpertLinear:
        """Entering train or eval mode drops the cached operands (see `camex.moe.cache`)."""
        self._eval_cache.clear()
        if self.chain is not None:
            self.chain.forget()
        return super().train(mode)

    # -- forward ------------------------------------------------------------------------------
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.chain is not None and self.chain_index == 0 and torch.is_grad_enabled():
            if not torch.compiler.is_compiling():  # a compiled chain rebuilds its links every pass
                self.chain.new_pass()
        routing = take_routing(x, self.router, self.shared)
        scores = self.mask.scores(routing.scores, self.training)
        around, reuse = self._merges_experts(), self._owns_curved() and not self._cached()
        if around:
            self._eval_cache.clear()
            base_w, deltas_w, base_b, deltas_b = self.base_weight, self.expert_weight, self.base_bias, self.expert_bias
        else:
            base_w, deltas_w, base_b, deltas_b = self.operands()
        return per_unit(
            x,
            routing,
            lambda seqs: merged_linear(
                seqs, base_w, deltas_w, scores, self.alpha, base_b, deltas_b, around=around, reuse_deltas=reuse
            ),
        )
