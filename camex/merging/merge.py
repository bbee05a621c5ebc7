"""Domain vectors, the merge rule `Ê = E_m + α Σ_i s_i γ̃_i` (SPEC §2) and the merged linear."""

from __future__ import annotations

import torch
from torch.autograd.function import once_differentiable

from camex.kernels import cpu_merge, merged_gemm
from camex.kernels.cpu_build import plain_cpu_fp32
from camex.merging import workspace


def domain_vectors(experts: torch.Tensor, base: torch.Tensor) -> torch.Tensor:
    """`τ_i = E_i − E_m` for experts `[n, *shape]` around a base `[*shape]`.

    Written `E_i + (−E_m)` (the same IEEE result): the backward pass then reduces the incoming
    gradient over the experts before negating it, instead of negating an `[n, *shape]` copy.
    """
    return experts + base.neg().unsqueeze(0)


def merge_flat(
    base: torch.Tensor,
    deltas: torch.Tensor,
    scores: torch.Tensor,
    alpha: float = 1.0,
    *,
    out: torch.Tensor | None = None,
) -> torch.Tensor:
    """One merged tensor per routed unit: `base + alpha · Σ_i scores[u, i] · deltas[i]`.

    `base` is `[*shape]`, `deltas` `[n, *shape]` (already masked and curved), `scores`
    `[units, n]`. Returns `[units, *shape]`. The rule is linear in the scores, so it is a single
    `[units, n] @ [n, prod(shape)]` product with `alpha` applied inside it: no `[units, n, *shape]`
    tensor is formed and no scaled copy of the deltas either. `out` (`[units, *shape]`) receives it.
    """
    units, n = scores.shape[0], deltas.shape[0]
    flat = None if out is None else out.view(units, -1)
    flat = torch.addmm(base.reshape(1, -1), scores.to(deltas.dtype), deltas.reshape(n, -1), alpha=alpha, out=flat)
    return flat.view(units, *base.shape)


# On CPU the merged weights are built for a tile of output rows at a time, for every unit: a
# tile's weights, its slice of the deltas and its gradients (`units + n` rows of `I` entries each)
# take at most this much, and the tile's buffers are reused across calls (`workspace`) instead of
# being mapped and page-faulted afresh on every call, as large CPU allocations are. 48 MiB rather
# than 16 since the merge and its reductions run in one pass each (`cpu_merge`): the token products
# on wider tiles run closer to the dense GEMM's rate, and that now outweighs keeping a tile in the
# last-level cache (T5 `wi`: 1 and 2 threads, benchmarks/budgets.py; docs/benchmarks.md, "Tile and
# block budgets" and "Compiled CPU kernels for the merge").
CPU_BLOCK_BYTES = 48 * 2**20
# Up to this size, all units' merged weights are kept for the backward pass instead of rebuilt
# there (few units: the rebuild would re-read all the deltas for a small saving in memory).
CPU_KEEP_BYTES = 24 * 2**20


def row_tile(base: torch.Tensor, units: int, experts: int) -> int:
    """Output rows per tile: all of them off the CPU (the caching allocator recycles memory there)."""
    rows, row_bytes = base.shape[0], (units + experts) * base.shape[1] * base.element_size()
    if base.device.type != "cpu":
        return max(rows, 1)
    return max(1, min(rows, CPU_BLOCK_BYTES // max(row_bytes, 1)))


def keeps_weights(base: torch.Tensor, units: int) -> bool:
    """Whether the forward pass keeps every unit's merged weights for the backward pass."""
    return base.device.type != "cpu" or units * base.numel() * base.element_size() <= CPU_KEEP_BYTES


class _MergedLinear(torch.autograd.Function):
    """`y_u = x_u Ŵ_uᵀ + b̂_u` with `Ŵ = merge_flat(base, deltas, scores, alpha)` (and the bias alike).

    With `around` the deltas hold the experts `E_i` and `τ_i = E_i − base` is taken inside each
    tile: `Ŵ_u = base + α Σ_i s_ui E_i − (α Σ_i s_ui) base`, so no `[n, O, I]` tensor of domain
    vectors is formed (nor its gradient); `∂base = Σ_u (1 − α Σ_i s_ui) ∂Ŵ_u` and
    `∂s_ui = α ⟨∂Ŵ_u, E_i − base⟩` are reduced per tile. (The bias deltas are always differences.)

    Output rows are processed in tiles (`row_tile`), each for every unit at once: merge the
    tile's weights `[units, rows, I]`, then `y_u[:, rows] = x_u Ŵ_u[rows]ᵀ`. The backward pass
    walks the same tiles: `∂x` accumulates over them, and each tile's `∂Ŵ = ∂y_uᵀ x_u` becomes its
    rows of `∂deltas` and `∂base` and its share of `∂scores`. Where the weights are kept
    (`keeps_weights`: always off the CPU, where there is one tile) the backward pass reads them and
    writes `∂Ŵ` over them once `∂x` is known (unless autograd keeps the graph for another
    backward); otherwise it rebuilds each tile (a `[units, n] @ [n, rows·I]` product, cheap next to
    the token matmuls) in a tile-sized buffer and writes `∂Ŵ` over that.

    Mixed precision: `x` may come in a lower precision than the parameters (autocast). The merge
    and every reduction onto the parameters' gradients then stay in the parameters' dtype (fp32
    accumulation) in a tile-sized buffer, and only the token products run in `x`'s dtype, on a
    copy of each merged tile in that dtype, as autocast's own linear would.
    """

    @staticmethod
    def forward(ctx, x, base, deltas, scores, alpha, base_bias, delta_bias, around, reuse):
        with torch.autocast(x.device.type, enabled=False):  # the dtypes are chosen here
            units, n = scores.shape
            rows, keep = row_tile(base, units, n), keeps_weights(base, units)
            bias = None if base_bias is None else merge_flat(base_bias, delta_bias, scores, alpha).to(x.dtype)
            y = workspace.empty_like(x, (*x.shape[:-1], base.shape[0]))
            if keep:  # saved for the backward pass
                weights = workspace.empty_like(x, (units * base.shape[0] * base.shape[1],))
            else:
                weights = workspace.buffer("merge_tile", units * rows * base.shape[1], x)
            merged = _merge_buffer(x, base, units, rows)
            coefs = _kernel_coefficients(merged, base, deltas, scores, alpha, around)
            for r in _blocks(base.shape[0], rows):
                w = _merge_rows(weights, merged, base, deltas, scores, alpha, r, kept=keep, around=around, coefs=coefs)
                _apply(x, w, None if bias is None else bias[:, r], out=y[..., r])
        ctx.alpha, ctx.rows, ctx.around, ctx.reuse = alpha, rows, around, reuse
        ctx.save_for_backward(x, base, deltas, scores, weights if keep else None, delta_bias)
        return y

    @staticmethod
    @once_differentiable
    def backward(ctx, grad):
        x, base, deltas, scores, weight, delta_bias = ctx.saved_tensors
        with torch.autocast(x.device.type, enabled=False):
            grads = _MergedLinear._backward(ctx, grad.to(x.dtype), x, base, deltas, scores, weight, delta_bias)
        return (*grads, None, None)

    @staticmethod
    def _backward(ctx, grad, x, base, deltas, scores, weight, delta_bias):
        need_x, need_base, need_deltas, need_scores, _, need_bias, need_dbias, *_ = ctx.needs_input_grad
        alpha, rows, around = ctx.alpha, ctx.rows, ctx.around
        units, n = scores.shape
        grad = grad.contiguous()
        grad_x = workspace.empty_like(x) if need_x else None
        grad_base = workspace.empty_like(base) if need_base else None
        grad_deltas = None
        if need_deltas:  # written tile by tile after the tile's last read of the deltas
            reuse = ctx.reuse and deltas.is_contiguous() and not workspace.graph_is_kept()
            grad_deltas = deltas.detach() if reuse else workspace.empty_like(deltas)
        need_w = need_base or need_deltas or need_scores
        scratch = None  # where ∂Ŵ of a tile goes, unless it can overwrite the kept weights
        if weight is None or (need_w and workspace.graph_is_kept()):
            scratch = workspace.buffer("merge_tile", units * rows * base.shape[1], x)
        merged = _merge_buffer(x, base, units, rows) if weight is None or need_w else None
        coefs = _kernel_coefficients(merged, base, deltas, scores, alpha, around)
        kernel = coefs is not None and (grad_deltas is None or cpu_merge.rows_fit(grad_deltas))
        scaled = (scores.t() * alpha).contiguous()  # [n, units]
        # ∂scores accumulates transposed, [n, units]: deltas @ ∂Ŵᵀ runs faster than ∂Ŵ @ deltasᵀ
        # for these shapes (K = rows·I: 0.72 against 1.21 ms per T5 tile, CPU time); around the base,
        # ⟨∂Ŵ_u, base⟩ (it enters ∂s_u) in the row after it: one buffer, as the kernel fills it
        dots = scores.new_zeros(n + around, units) if need_scores else None
        grad_scores_t = None if dots is None else dots[:n]
        base_dot = dots[n] if dots is not None and around else None
        if around and not kernel:  # ∂base weighs each unit by its base coefficient
            base_coef = (1.0 - alpha * scores.sum(1)).unsqueeze(0)  # [1, units]
        for r in _blocks(base.shape[0], rows):
            if weight is None:
                w = _merge_rows(scratch, merged, base, deltas, scores, alpha, r, kept=False, around=around, coefs=coefs)
            else:
                w = _tile(weight, units, r, base.shape[1], kept=True)
            g = grad[..., r]
            if need_x:  # out= forms rather than in-place ones, which FLOP counters do not see
                torch.baddbmm(grad_x, g, w, beta=0.0 if r.start == 0 else 1.0, out=grad_x)
            if not need_w:
                continue
            target = w if scratch is None else _tile(scratch, units, r, base.shape[1], kept=False)
            gw = torch.bmm(g.transpose(1, 2), x, out=target)
            if merged is not None:  # lower-precision ∂Ŵ: reduce it onto the parameters in their dtype
                gw = _tile(merged, units, r, base.shape[1], kept=False).copy_(gw)
            if kernel:
                cpu_merge.merge_grad(
                    gw, deltas[:, r], at=scaled, c=coefs[1], base=base[r] if need_scores and around else None,
                    grad_base=grad_base[r] if need_base else None,
                    grad_deltas=grad_deltas[:, r] if need_deltas else None, dots=dots, threads=torch.get_num_threads(),
                )  # fmt: skip
                continue
            gw = gw.view(units, -1)
            if need_base and around:
                torch.mm(base_coef, gw, out=grad_base[r].view(1, -1))
            elif need_base:
                torch.sum(gw, 0, out=grad_base[r].view(-1))
            if need_scores:
                torch.addmm(grad_scores_t, deltas[:, r].reshape(n, -1), gw.t(), out=grad_scores_t)
                if around:
                    torch.addmv(base_dot, gw, base[r].reshape(-1), out=base_dot)
            if need_deltas:  # last: it may overwrite these rows of the deltas
                torch.mm(scaled, gw, out=grad_deltas[:, r].view(n, -1))
        grad_scores = grad_scores_t.t().contiguous() if need_scores else None
        if need_scores:
            if around:
                grad_scores.sub_(base_dot.unsqueeze(1))
            grad_scores.mul_(alpha)
        grad_bias = grad_dbias = None
        if delta_bias is not None:
            grad_b = grad.sum(1, dtype=base.dtype)  # [units, O]
            grad_bias = grad_b.sum(0) if need_bias else None
            grad_dbias = torch.mm(scores.t(), grad_b).mul_(alpha) if need_dbias else None
            if need_scores:
                torch.addmm(grad_scores, grad_b, delta_bias.t(), alpha=alpha, out=grad_scores)
        return grad_x, grad_base, grad_deltas, grad_scores, None, grad_bias, grad_dbias


def _merge_buffer(x: torch.Tensor, base: torch.Tensor, units: int, rows: int) -> torch.Tensor | None:
    """A tile in the parameters' dtype for the merge product, where the token products run in a
    lower one (None where they share one dtype: the merge then writes the weights directly)."""
    return None if x.dtype == base.dtype else workspace.buffer("merge_fp32", units * rows * base.shape[1], base)


def _blocks(n: int, size: int):
    for start in range(0, n, size):
        yield slice(start, min(start + size, n))


def _tile(buffer: torch.Tensor, units: int, rows: slice, width: int, *, kept: bool) -> torch.Tensor:
    """The `[units, len(rows), width]` tile of `buffer`: at its place among all tiles where the
    buffer keeps every tile (tile after tile, each contiguous), else at the buffer's start."""
    count = rows.stop - rows.start
    start = units * rows.start * width if kept else 0
    return buffer[start : start + units * count * width].view(units, count, width)


# The compiled CPU merge and reductions (`camex.kernels.cpu_merge`): None uses them for fp32 CPU
# tensors whenever they built here, on PyTorch's thread count; False keeps PyTorch's ops everywhere
# (the reference the tests pin them to). Measured: docs/benchmarks.md.
CPU_KERNELS: bool | None = None


def _kernel_coefficients(merged, base, deltas, scores, alpha, around) -> tuple[torch.Tensor, torch.Tensor] | None:
    """`(a, c)` with `Ŵ_u = c_u·base + Σ_i a_ui·deltas_i`, where the compiled CPU kernels take this
    pass (fp32 CPU operands, one dtype throughout), else None."""
    if CPU_KERNELS is False or merged is not None or not plain_cpu_fp32(base) or scores.dtype != torch.float32:
        return None
    if deltas.dtype != torch.float32 or not cpu_merge.rows_fit(deltas) or not cpu_merge.available():
        return None
    a = (scores * alpha).contiguous()
    c = 1.0 - alpha * scores.sum(1) if around else torch.ones_like(scores[:, 0])
    return a, c.contiguous()


def _merge_rows(
    buffer, merged, base, deltas, scores, alpha, rows: slice, *, kept: bool, around: bool, coefs=None
) -> torch.Tensor:
    """The merged weights' output rows `rows` for every unit, `[units, len(rows), I]`, in `buffer`
    (merged in `merged`, in the parameters' dtype, first where `buffer` holds a lower precision).
    `around`: `deltas` are experts, and `α (Σ_i s_ui) base` is taken off each unit's rows. With
    `coefs` (`_kernel_coefficients`) the compiled kernel merges in one pass."""
    w = _tile(buffer, scores.shape[0], rows, base.shape[1], kept=kept)
    if coefs is not None:
        cpu_merge.merge_into(base[rows], deltas[:, rows], *coefs, w, threads=torch.get_num_threads())
        return w
    t = w if merged is None else _tile(merged, scores.shape[0], rows, base.shape[1], kept=False)
    merge_flat(base[rows], deltas[:, rows], scores, alpha, out=t)
    if around:
        t.view(t.shape[0], -1).addr_(scores.sum(1), base[rows].reshape(-1), alpha=-alpha)
    return w if merged is None else w.copy_(t)


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
    *,
    around: bool = False,
    reuse_deltas: bool = False,
) -> torch.Tensor:
    """Each routed unit's tokens through its merged weight: `y_u = x_u Ŵ_uᵀ (+ b̂_u)`.

    `around=True`: `deltas` (and `delta_bias`) hold the experts themselves and the merge is taken
    around the base, `Ŵ = base + α Σ_i s_i (E_i − base)`, without forming the domain vectors.
    `reuse_deltas=True`: `deltas` is the caller's temporary, used nowhere else, so the backward
    pass writes `∂deltas` over it instead of into a new `[n, O, I]` tensor (unless the graph is
    kept for another backward pass).

    `x` is `[units, T, I]`, `base` `[O, I]`, `deltas` `[n, O, I]`, `scores` `[units, n]`; the bias
    pair is `[O]` and `[n, O]`. Same result as `merge_flat` followed by a batched matmul, with the
    leaner backward of `_MergedLinear`. Under autocast the token products run in autocast's dtype
    and the merge in the parameters' dtype (as autocast's linear casts an fp32 weight); inputs of
    another dtype than the deltas outside autocast take the plain path. Under `torch.compile` the
    plain formulation is traced instead of the tile loop (one tile of all rows, as off the CPU),
    so the compiler sees one static graph and fuses the merge itself.
    """
    if (base_bias is None) != (delta_bias is None):
        raise ValueError("give both the base bias and the bias deltas, or neither")
    if around and delta_bias is not None:  # a bias is small: its domain vectors are formed
        delta_bias = domain_vectors(delta_bias, base_bias)
    scores = scores.to(deltas.dtype)
    device = x.device.type
    if torch.is_autocast_enabled(device):
        low = torch.get_autocast_dtype(device)
        if deltas.is_floating_point() and deltas.element_size() > torch.finfo(low).bits // 8:
            x = x.to(low)  # only ever down, as autocast's own matmuls cast
    elif x.dtype != deltas.dtype:
        return _plain(x, base, deltas, scores, alpha, base_bias, delta_bias, around)
    if torch.compiler.is_compiling():
        return _plain(x, base, deltas, scores, alpha, base_bias, delta_bias, around)
    with torch.autocast(device, enabled=False):
        if FUSED_GEMM and merged_gemm.usable(x, base, deltas):
            return merged_gemm.merged_linear_triton(
                x, base, deltas, scores, alpha, base_bias, delta_bias, around=around
            )
        return _MergedLinear.apply(x, base, deltas, scores, alpha, base_bias, delta_bias, around, reuse_deltas)


# The merge fused into the token GEMM's weight load (`camex.kernels.merged_gemm`, Triton, CUDA
# tensors only). Off until a GPU measurement shows where it pays (`scripts/gpu_check.sh` times
# both paths; docs/gpu_path.md).
FUSED_GEMM = False


def _plain(x, base, deltas, scores, alpha, base_bias, delta_bias, around=False) -> torch.Tensor:
    """`merge_flat` and a batched matmul in `x`'s dtype, by plain autograd."""
    if around:
        deltas = domain_vectors(deltas, base)
    with torch.autocast(x.device.type, enabled=False):
        weight = merge_flat(base, deltas, scores, alpha).to(x.dtype).transpose(1, 2)
        if base_bias is None:
            return torch.bmm(x, weight)
        return torch.baddbmm(merge_flat(base_bias, delta_bias, scores, alpha).to(x.dtype).unsqueeze(1), x, weight)
