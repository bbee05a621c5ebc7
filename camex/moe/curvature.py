"""Learnable Kronecker-factored curvature operators `M_1..M_n` of one linear (SPEC §4)."""

from __future__ import annotations

import torch
from torch import nn

from camex.merging.curvature import identity_factors, kronecker_apply, nearest_factors


class KroneckerCurvature(nn.Module):
    """Factors `[r, n, d, d]` per mode of `[o1, o2, i1, i2]`, all the identity at start.

    The weight operator has four factors (A, B over outputs; C, D over inputs); a bias gets its
    own two-factor operator over `(o1, o2)`.
    """

    def __init__(self, *, num_experts: int, rank: int, out_features: int, in_features: int, bias: bool) -> None:
        super().__init__()
        if rank < 1:
            raise ValueError(f"curvature rank must be >= 1, got {rank}")
        out_dims, in_dims = nearest_factors(out_features), nearest_factors(in_features)
        self.rank = rank
        self.weight_factors = nn.ParameterList(identity_factors(rank, num_experts, out_dims + in_dims))
        self.bias_factors = nn.ParameterList(identity_factors(rank, num_experts, out_dims)) if bias else None

    def extra_repr(self) -> str:
        dims = [f.shape[-1] for f in self.weight_factors]
        return f"rank={self.rank}, modes={dims}"

    def weight(self, taus: torch.Tensor, base: torch.Tensor | None = None, *, reuse_grad: bool = False) -> torch.Tensor:
        """`M_i(τ_i)`; with `base`, `taus` holds the experts and `τ_i = taus_i − base`.
        `reuse_grad`: see `kronecker_apply` (the result's gradient may be overwritten)."""
        return kronecker_apply(taus, list(self.weight_factors), base=base, reuse_grad=reuse_grad)

    def bias(self, taus: torch.Tensor, base: torch.Tensor | None = None) -> torch.Tensor:
        return kronecker_apply(taus, list(self.bias_factors), base=base)
