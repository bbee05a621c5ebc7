"""EP-CAMEx (SPEC §7): one base expert propagated through consecutive layers of one shape.

`E_m^(l+1) = E_m^(l) + (β/n) Σ_i M_i^(l)(τ_i^(l))`. Only the first layer stores a base expert;
the chain computes every later layer's base (and each layer's `M_i(τ_i)`, reused by layers
without a mask) once per forward pass, or once per parameter change when autograd is off.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from camex.merging import domain_vectors
from camex.moe.cache import ParameterMemo, parameter_key
from camex.moe.merged import MergedExpertLinear


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
        for i, layer in enumerate(self.layers):
            layer.chain, layer.chain_index = self, i

    def __len__(self) -> int:
        return len(self.layers)

    def new_pass(self) -> None:
        """A new forward pass with autograd: links must be rebuilt in its graph."""
        self._pass += 1

    def parameters_through(self, index: int) -> list[torch.Tensor]:
        return [p for layer in self.layers[: index + 1] for p in layer.merge_parameters()]

    def link(self, index: int) -> Link:
        grad = torch.is_grad_enabled()
        key = (grad, self._pass if grad else None, parameter_key(self.parameters_through(len(self) - 1)))
        return self._memo.get(key, self._links)[index]

    def _links(self) -> list[Link]:
        first = self.layers[0]
        base_w, base_b = first.base_weight, first.base_bias
        links = []
        for layer in self.layers:
            curved_w = layer.curve(domain_vectors(layer.expert_weight, base_w))
            curved_b = None
            if base_b is not None:
                curved_b = layer.curve(domain_vectors(layer.expert_bias, base_b), bias=True)
            links.append(Link(base_w, base_b, curved_w, curved_b))
            step = self.beta / layer.num_experts
            base_w = base_w + step * curved_w.sum(0)
            base_b = None if base_b is None else base_b + step * curved_b.sum(0)
        return links
