"""EP-CAMEx (SPEC §7): one base expert propagated through consecutive layers of one shape.

`E_m^(l+1) = E_m^(l) + (β/n) Σ_i M_i^(l)(τ_i^(l))`. Only the first layer stores a base expert;
the chain computes every later layer's base (and each layer's `M_i(τ_i)`, reused by layers
without a mask) once per forward pass, or once per parameter change when autograd is off.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

from camex.merging import domain_vectors
from camex.moe.cache import ParameterMemo, parameter_key
from camex.moe.merged import MergedExpertLinear

BaseHook = Callable[[int, torch.Tensor, torch.Tensor | None], None]  # (layer index, its base weight, base bias)


@dataclass
class Link:
    base_weight: torch.Tensor
    base_bias: torch.Tensor | None
    curved_weight: torch.Tensor  # M_i(τ_i), no mask, not scaled by α
    curved_bias: torch.Tensor | None


class ExpertChain:
    def __init__(self, layers: list[MergedExpertLinear], *, beta: float = 1.0) -> None:
        if not layers or layers[0].base_weight is None:
            raise ValueError("the first layer of an EP chain must store the base expert")
        shapes = {tuple(layer.expert_weight.shape) for layer in layers}
        if len(shapes) != 1:
            raise ValueError(f"EP chain layers must share one shape, got {sorted(shapes)}")
        if any(layer.base_weight is not None for layer in layers[1:]):
            raise ValueError("only the first layer of an EP chain may store a base expert")
        self.layers, self.beta = list(layers), beta
        self._pass = 0
        self._memo = ParameterMemo()
        self._traced: list[Link] | None = None  # the links of the pass being compiled
        for i, layer in enumerate(self.layers):
            layer.chain, layer.chain_index = self, i

    def __len__(self) -> int:
        return len(self.layers)

    def new_pass(self) -> None:
        """A new forward pass with autograd: links must be rebuilt in its graph."""
        self._pass += 1

    def forget(self) -> None:
        """Drop the memoised links (a layer entering train or eval mode calls this)."""
        self._memo.clear()

    def parameters_through(self, index: int) -> list[torch.Tensor]:
        return [p for layer in self.layers[: index + 1] for p in layer.merge_parameters()]

    def link(self, index: int) -> Link:
        if torch.compiler.is_compiling():
            # The memo's key reads storage addresses and a pass counter, which would put guards on
            # every step. The chain's first layer runs first in every forward pass: it builds all
            # links inside the graph being traced and the later layers read them; the last one
            # drops them, so no step's links outlive its graph.
            if index == 0 or self._traced is None:
                self._traced = self._links()
            links = self._traced
            if index == len(self) - 1:
                self._traced = None
            return links[index]
        grad = torch.is_grad_enabled()
        key = (grad, self._pass if grad else None, parameter_key(self.parameters_through(len(self) - 1)))
        return self._memo.get(key, self._links)[index]

    @torch.no_grad()
    def start_from_dense(self) -> None:
        """Upcycle each later layer so that, at step 0, it computes its own dense weight.

        On entry every layer's experts hold that layer's dense weight `W_l` (as `load_dense`
        leaves them) and every curvature factor the identity, so `M_i = c·Id` (`c` = rank, 1
        without curvature). A later layer merges around the base the chain propagates to it,
        `E_m^(l) ≠ W_l`; experts `E_i = E_m^(l) + (W_l − E_m^(l)) / (α c)` make its merged weight
        `E_m^(l) + α c Σ_i s_i (E_i − E_m^(l)) = W_l` for any scores summing to 1. The bases come
        from the chain's own walk, each computed once the layers before it are set.
        """

        def fit(index: int, base_w: torch.Tensor, base_b: torch.Tensor | None) -> None:
            if index == 0:
                return
            layer = self.layers[index]
            scale = layer.alpha * (layer.curvature.rank if layer.curvature is not None else 1)
            if scale == 0:
                raise ValueError("merge.alpha=0 leaves EP-CAMEx's later layers at the propagated base; allowed: α ≠ 0")
            if scale == 1:  # E_i = W_l already; skipping keeps them bit-exact (no b + (w − b) rounding)
                return
            for experts, base in ((layer.expert_weight, base_w), (layer.expert_bias, base_b)):
                if experts is not None and base is not None:
                    experts.copy_(base + (experts - base) / scale)

        self._links(before_curve=fit)
        self.forget()

    def _links(self, before_curve: BaseHook | None = None) -> list[Link]:
        first = self.layers[0]
        base_w, base_b = first.base_weight, first.base_bias
        links = []
        for index, layer in enumerate(self.layers):
            if before_curve is not None:
                before_curve(index, base_w, base_b)
            curved_w = layer.curve(domain_vectors(layer.expert_weight, base_w))
            curved_b = None
            if base_b is not None:
                curved_b = layer.curve(domain_vectors(layer.expert_bias, base_b), bias=True)
            links.append(Link(base_w, base_b, curved_w, curved_b))
            step = self.beta / layer.num_experts
            base_w = base_w + step * curved_w.sum(0)
            base_b = None if base_b is None else base_b + step * curved_b.sum(0)
        return links
