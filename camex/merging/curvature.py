"""Kronecker-factored curvature operator `M_i` of rank r (SPEC §4).

`M_i(τ) = Σ_ρ (A_ρi ⊗ B_ρi) τ (C_ρi ⊗ D_ρi)ᵀ`: viewing `τ ∈ R^{O×I}` as a tensor
`[o1, o2, i1, i2]` (row `(a, b) ↦ a·o2 + b`, column `(c, e) ↦ c·i2 + e`), each term multiplies
one small square matrix into each mode. A bias `τ_b ∈ R^O` uses the two output modes only.

The r terms are summed inside one autograd function that keeps only `τ` and the factors for the
backward pass and recomputes each term's partial products there, so neither the forward nor
the saved state ever holds r copies of `τ`.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch.autograd.function import once_differentiable


def nearest_factors(d: int) -> tuple[int, int]:
    """`(f, d / f)` with `f` the largest divisor of `d` not above `⌊√d⌋` (768 → (24, 32))."""
    if d < 1:
        raise ValueError(f"cannot factor dimension {d}")
    f = math.isqrt(d)
    while d % f:
        f -= 1
    return f, d // f


def _mode(x: torch.Tensor, f: torch.Tensor, k: int) -> torch.Tensor:
    """Multiply `f` `[n, d, d]` into mode `k` of `x` `[n, d_0, ..., d_{m-1}]`.

    Outer modes are one batched matmul on a view; an inner mode is moved to the front first (one
    transient copy of `x`), never broadcast, which would copy `f` once per row of `x`.
    """
    n, dims = x.shape[0], x.shape[1:]
    if k == 0:
        return torch.bmm(f, x.reshape(n, dims[0], -1)).view_as(x)
    if k == len(dims) - 1:
        return torch.bmm(x.reshape(n, -1, dims[k]), f.transpose(1, 2)).view_as(x)
    front = x.movedim(k + 1, 1)
    out = torch.bmm(f, front.reshape(n, dims[k], -1)).view(front.shape)
    return out.movedim(1, k + 1)


def _mode_grad(grad: torch.Tensor, inp: torch.Tensor, k: int) -> torch.Tensor:
    """Gradient of the factor of `_mode(inp, f, k)` given the gradient of its output."""
    n, dims = inp.shape[0], inp.shape[1:]
    pre = math.prod(dims[:k])
    g = grad.reshape(n, pre, dims[k], -1)
    x = inp.reshape(n, pre, dims[k], -1)
    return torch.einsum("npjq,npkq->njk", g, x)


def _term(x: torch.Tensor, factors: Sequence[torch.Tensor], rho: int) -> torch.Tensor:
    for k in reversed(range(len(factors))):
        x = _mode(x, factors[k][rho], k)
    return x


class _KroneckerSum(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: torch.Tensor, *factors: torch.Tensor) -> torch.Tensor:
        out = _term(x, factors, 0)
        for rho in range(1, factors[0].shape[0]):
            out = out + _term(x, factors, rho)
        ctx.save_for_backward(x, *factors)
        return out

    @staticmethod
    @once_differentiable
    def backward(ctx, grad: torch.Tensor):
        x, *factors = ctx.saved_tensors
        need_x, *need_f = ctx.needs_input_grad
        grad_x = torch.zeros_like(x) if need_x else None
        grad_f = [torch.zeros_like(f) if need else None for f, need in zip(factors, need_f)]
        for rho in range(factors[0].shape[0]):
            inputs = [x] * len(factors)  # inputs[k] is what the mode-k product received
            h = x
            for k in reversed(range(1, len(factors))):
                h = _mode(h, factors[k][rho], k)
                inputs[k - 1] = h
            g = grad
            for k, f in enumerate(factors):
                if grad_f[k] is not None:
                    grad_f[k][rho] = _mode_grad(g, inputs[k], k)
                if k + 1 < len(factors) or need_x:
                    g = _mode(g, f[rho].transpose(-1, -2), k)
            if need_x:
                grad_x += g
        return (grad_x, *grad_f)


def kronecker_apply(tau: torch.Tensor, factors: Sequence[torch.Tensor]) -> torch.Tensor:
    """Apply `M_i` to each of `tau` `[n, O, I]` (or a bias `[n, O]`).

    `factors` holds one `[r, n, d_k, d_k]` tensor per mode: `(A, B, C, D)` for a weight with
    `O = d_A·d_B`, `I = d_C·d_D`; `(A, B)` for a bias. Returns a tensor shaped like `tau`.
    """
    dims = [f.shape[-1] for f in factors]
    n = tau.shape[0]
    if math.prod(dims) != math.prod(tau.shape[1:]):
        raise ValueError(f"factor dims {dims} do not tile a tensor of shape {tuple(tau.shape[1:])}")
    out = _KroneckerSum.apply(tau.reshape(n, *dims), *factors)
    return out.view_as(tau)


def identity_factors(r: int, n: int, dims: Sequence[int]) -> list[torch.Tensor]:
    """Factors of `M_i = r · Id` (every factor the identity), the released initialisation."""
    return [torch.eye(d).expand(r, n, d, d).clone() for d in dims]
