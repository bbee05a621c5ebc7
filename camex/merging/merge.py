"""Domain vectors, the merge rule `Ê = E_m + α Σ_i s_i γ̃_i` (SPEC §2) and the merged linear."""

from __future__ import annotations

import torch
from torch.autograd.function import once_differentiable


def domain_vectors(experts: torch.Tensor, base: torch.Tensor) -> torch.Tensor:
    """`τ_i = E_i − E_m` for experts `[n, *shape]` around a base `[*shape]`.

    Written `E_i + (−E_m)` (the same IEEE result): the backward pass then reduces the incoming
    gradient over the experts before negating it, instead of negating an `[n, *shape]` copy.
    """
    return experts + base.neg().unsqueeze(0)


def merge_flat(base: torch.Tensor, deltas: torch.Tensor, scores: torch.Tensor, alpha: float = 1.0) -> torch.Tensor:
    """One merged tensor per routed unit: `base + alpha · Σ_i scores[u, i] · deltas[i]`.

    `base` is `[*shape]`, `deltas` `[n, *shape]` (already masked and curved), `scores`
    `[units, n]`. Returns `[units, *shape]`. The rule is linear in the scores, so it is a single
    `[units, n] @ [n, prod(shape)]` product with `alpha` applied inside it: no `[units, n, *shape]`
    tensor is formed and no scaled copy of the deltas either.
    """
    shape = base.shape
    flat = torch.addmm(base.reshape(1, -1), scores.to(deltas.dtype), deltas.reshape(deltas.shape[0], -1), alpha=alpha)
    return flat.view(scores.shape[0], *shape)


def _graph_is_kept() -> bool:
    """Whether the running backward pass keeps the graph for another one (unknown: assume so)."""
    probe = getattr(torch._C._autograd, "_get_current_graph_task_keep_graph", None)
    try:
        return True if probe is None else bool(probe())
    except RuntimeError:
        return True


# On CPU the merged weights are built for a block of units of at most this size at a time, in one
# recycled buffer: a layer never holds all `[units, O, I]` weights (nor their gradient) at once,
# and fresh memory, which the CPU allocator maps and page-faults on every call, stays small.
# Each block re-reads the deltas once, so blocks should not be much smaller than this.
CPU_BLOCK_BYTES = 48 * 2**20


def unit_block(base: torch.Tensor, units: int) -> int:
    """Units per block: all of them off the CPU (the caching allocator recycles memory there)."""
    if base.device.type != "cpu":
        return max(units, 1)
    return max(1, min(units, CPU_BLOCK_BYTES // max(base.numel() * base.element_size(), 1)))


class _MergedLinear(torch.autograd.Function):
    """`y_u = x_u Ŵ_uᵀ + b̂_u` with `Ŵ = merge_flat(base, deltas, scores, alpha)` (and the bias alike).

    Units are processed in blocks (`unit_block`). With one block (always on GPU) the merged
    weights are kept for the backward pass, which then writes `∂Ŵ_u = ∂y_uᵀ x_u` straight into
    their buffer once `∂x` is known (unless autograd keeps the graph for another backward). With
    several blocks (CPU) the backward pass rebuilds each block's weights (a `[u, n] @ [n, O·I]`
    product, cheap next to the token matmuls) in the block buffer and reuses it for their
    gradient, accumulating `∂deltas`, `∂base` and `∂scores` block by block.
    """

    @staticmethod
    def forward(ctx, x, base, deltas, scores, alpha, base_bias, delta_bias):
        units, n = scores.shape
        size = unit_block(base, units)
        bias = None if base_bias is None else merge_flat(base_bias, delta_bias, scores, alpha)
        if size >= units:
            weight = merge_flat(base, deltas, scores, alpha)
            y = _apply(x, weight, bias)
        else:
            weight, buffer = None, base.new_empty((size, *base.shape))
            y = x.new_empty((*x.shape[:-1], base.shape[0]))
            for u in _blocks(units, size):
                w = _merge_into(buffer[: u.stop - u.start], base, deltas, scores[u], alpha)
                _apply(x[u], w, None if bias is None else bias[u], out=y[u])
        ctx.alpha, ctx.size = alpha, size
        ctx.save_for_backward(x, base, deltas, scores, weight, delta_bias)
        return y

    @staticmethod
    @once_differentiable
    def backward(ctx, grad):
        x, base, deltas, scores, weight, delta_bias = ctx.saved_tensors
        need_x, need_base, need_deltas, need_scores, _, need_bias, need_dbias = ctx.needs_input_grad
        alpha, size = ctx.alpha, ctx.size
        units, n = scores.shape
        grad = grad.contiguous()
        grad_x = torch.empty_like(x) if need_x else None
        flat = deltas.reshape(n, -1)
        grad_base = torch.zeros_like(base).view(1, -1) if need_base else None
        grad_deltas = torch.empty_like(flat) if need_deltas else None
        grad_scores = scores.new_empty(units, n) if need_scores else None
        need_w = need_base or need_deltas or need_scores
        buffer = None
        if weight is None:
            buffer = base.new_empty((size, *base.shape))
        elif need_w and _graph_is_kept():  # the kept weights must survive this pass
            buffer = torch.empty_like(weight)
        for i, u in enumerate(_blocks(units, size)):
            w = (
                weight[u]
                if weight is not None
                else _merge_into(buffer[: u.stop - u.start], base, deltas, scores[u], alpha)
            )
            if need_x:
                torch.bmm(grad[u], w, out=grad_x[u])
            if not need_w:
                continue
            target = w if buffer is None or weight is None else buffer[u]  # Ŵ is dead once ∂x is known
            gw = torch.bmm(grad[u].transpose(1, 2), x[u], out=target).view(u.stop - u.start, -1)
            if need_base:
                grad_base.add_(gw.sum(0))
            if need_deltas:
                torch.addmm(grad_deltas, scores[u].t(), gw, beta=0.0 if i == 0 else 1.0, alpha=alpha, out=grad_deltas)
            if need_scores:
                torch.mm(gw, flat.t(), out=grad_scores[u])
        if need_scores:
            grad_scores.mul_(alpha)
        grad_bias = grad_dbias = None
        if delta_bias is not None:
            grad_b = grad.sum(1)  # [units, O]
            grad_bias = grad_b.sum(0) if need_bias else None
            grad_dbias = torch.mm(scores.t(), grad_b).mul_(alpha) if need_dbias else None
            if need_scores:
                grad_scores.addmm_(grad_b, delta_bias.t(), alpha=alpha)
        return (
            grad_x,
            None if grad_base is None else grad_base.view_as(base),
            None if grad_deltas is None else grad_deltas.view_as(deltas),
            grad_scores,
            None,
            grad_bias,
            grad_dbias,
        )


def _blocks(n: int, size: int):
    for start in range(0, n, size):
        yield slice(start, min(start + size, n))


def _merge_into(out: torch.Tensor, base, deltas, scores, alpha) -> torch.Tensor:
    flat = out.view(out.shape[0], -1)
    torch.addmm(base.reshape(1, -1), scores, deltas.reshape(deltas.shape[0], -1), alpha=alpha, out=flat)
    return out


def _apply(x, weight, bias, out=None) -> torch.Tensor:
    if bias is None:
        return torch.bmm(x, weight.transpose(1, 2), out=out)
    return torch.baddbmm(bias.unsqueeze(1), x, weight.transpose(1, 2), out=out)


def merged_linear(
    x: torch.Tensor,
    base: torch.Tensor,
    deltas: torch.Tensor,
    scores: torch.Tensor,
    alpha: float = 1.0,
    base_bias: torch.Tensor | None = None,
    delta_bias: torch.Tensor | None = None,
) -> torch.Tensor:
    """Each routed unit's tokens through its merged weight: `y_u = x_u Ŵ_uᵀ (+ b̂_u)`.

        `x` is `[units, T, I]`, `base` `[O, I]`, `deltas` `[n, O, I]`, `scores` `[units, n]`; the bias
        pair is `[O]` and `[n, O]`. Same result as `merge_flat` followed by a batched matmul, with the
        leaner backward of `_MergedLinear`. Inputs of another dtype than the deltas, or autocast,
    take that plain path.
    """
    if (base_bias is None) != (delta_bias is None):
        raise ValueError("give both the base bias and the bias deltas, or neither")
    scores = scores.to(deltas.dtype)
    if x.dtype != deltas.dtype or torch.is_autocast_enabled(x.device.type):  # autocast picks the dtypes
        weight = merge_flat(base, deltas, scores, alpha).to(x.dtype).transpose(1, 2)
        if base_bias is None:
            return torch.bmm(x, weight)
        return torch.baddbmm(merge_flat(base_bias, delta_bias, scores, alpha).to(x.dtype).unsqueeze(1), x, weight)
    return _MergedLinear.apply(x, base, deltas, scores, alpha, base_bias, delta_bias)
