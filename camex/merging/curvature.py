"""Kronecker-factored curvature operator `M_i` of rank r (SPEC §4).

`M_i(τ) = Σ_ρ (A_ρi ⊗ B_ρi) τ (C_ρi ⊗ D_ρi)ᵀ`: viewing `τ ∈ R^{O×I}` as a tensor
`[o1, o2, i1, i2]` (row `(a, b) ↦ a·o2 + b`, column `(c, e) ↦ c·i2 + e`), each term multiplies
one small square matrix into each mode. A bias `τ_b ∈ R^O` uses the two output modes only.

The r terms are summed inside one autograd function that keeps only `τ` and the factors for the
backward pass and recomputes each term's partial products there, so neither the forward nor
the saved state ever holds r copies of `τ`. Every mode product writes into a work buffer owned
by the pass (`out=`) and sized for a block of experts, so a pass allocates one τ-sized tensor
(its result) whatever r is, and no product copies `τ` to move a mode (see `_mode_into`). Cost
per pass and term: `m` mode products forward; `3m − 1` mode products and `m` contractions
backward (`m` = 4 for a weight).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch.autograd.function import once_differentiable

from camex.kernels import cpu_kron
from camex.kernels import kronecker as kernels
from camex.kernels.cpu_build import plain_cpu_fp32
from camex.kernels.kronecker import kronecker_triton
from camex.merging import workspace


def nearest_factors(d: int) -> tuple[int, int]:
    """`(f, d / f)` with `f` the largest divisor of `d` not above `⌊√d⌋` (768 → (24, 32))."""
    if d < 1:
        raise ValueError(f"cannot factor dimension {d}")
    f = math.isqrt(d)
    while d % f:
        f -= 1
    return f, d // f


def _order(dims: Sequence[int]) -> list[int]:
    """Modes in the order the forward applies them: one outer mode first, the other last.

    Both ends are outer modes, so the final forward product can accumulate the r terms in place
    and the final backward product (the mode applied first, transposed) can accumulate `∂τ`. The
    backward pass recomputes the input of every product but the last one, so the larger outer
    mode goes last: mode 0, unless the last mode is larger. For MiniLM-L6's and T5's `wo` (last
    mode 48 or 64, first 16 or 24) recomputing the other three then costs 72 rather than 104, and
    104 rather than 144, of the passes' summed mode sizes.
    """
    modes = list(range(len(dims)))
    return modes if dims[-1] > dims[0] else modes[::-1]


def _mode_into(
    x: torch.Tensor, f: torch.Tensor, k: int, out: torch.Tensor, *, alpha: float = 1.0, accumulate: bool = False
) -> torch.Tensor:
    """`out (+)= alpha · (f ×_k x)`: multiply `f` `[n, d, d]` into mode `k` of `x` `[n, d_0, ..., d_{m-1}]`.

    `x` and `out` are contiguous and distinct. On the CPU in fp32 the compiled kernel runs
    (`_cpu_kernel`). Otherwise an outer mode is one `baddbmm` on views (the
    accumulation and `alpha` ride on the GEMM); an inner mode is one GEMM for all experts with
    each expert's factor copied over its outer rows where that copy is small (`_batch_inner`),
    else one GEMM per expert with the factor broadcast (batch stride 0), so `x` is never copied.
    """
    n, dims = x.shape[0], x.shape[1:]
    d, beta = dims[k], 1.0 if accumulate else 0.0
    if _cpu_kernel(x, f, out):
        cpu_kron.mode_into(x, f, k, out, alpha=alpha, beta=beta, threads=torch.get_num_threads())
        return out
    if k == 0:
        o = out.view(n, d, -1)
        torch.baddbmm(o, f, x.view(n, d, -1), beta=beta, alpha=alpha, out=o)
        return out
    if k == len(dims) - 1:
        o = out.view(n, -1, d)
        torch.baddbmm(o, x.view(n, -1, d), f.transpose(1, 2), beta=beta, alpha=alpha, out=o)
        return out
    if accumulate or alpha != 1.0:
        raise ValueError("inner modes neither accumulate nor scale")
    pre = math.prod(dims[:k])
    xv, ov = x.view(n, pre, d, -1), out.view(n, pre, d, -1)
    if _batch_inner(n, d, xv.shape[-1]):
        fs = f.unsqueeze(1).expand(n, pre, d, d).reshape(n * pre, d, d)
        torch.bmm(fs, xv.view(n * pre, d, -1), out=ov.view(n * pre, d, -1))
        return out
    f = f.contiguous()  # a transposed factor (backward) broadcast over rows would be copied pre times
    for i in range(n):
        torch.bmm(f[i].expand(pre, d, d), xv[i], out=ov[i])
    return out


# The compiled CPU mode products and contractions (`camex.kernels.cpu_kron`): None uses them for
# fp32 CPU tensors whenever they built here, on PyTorch's thread count; False keeps PyTorch's GEMMs
# everywhere (the reference the tests pin them to). Measured: docs/benchmarks.md.
CPU_KERNELS: bool | None = None


def _cpu_kernel(x: torch.Tensor, f: torch.Tensor, out: torch.Tensor) -> bool:
    """Whether the compiled kernel takes these operands (`f` may be strided: a transposed factor)."""
    if CPU_KERNELS is False or not plain_cpu_fp32(x, out) or f.dtype != torch.float32 or f.device.type != "cpu":
        return False
    return cpu_kron.available()


# An inner-mode product or contraction runs as one GEMM over all experts (one parallel region
# instead of one per expert: on a busy machine every region waits for its slowest thread) when
# the `[n, pre, d, d]` per-row factor block it needs is at most 1/INNER_COPY_RATIO of the operand.
INNER_COPY_RATIO = 8


def _batch_inner(n: int, d: int, post: int) -> bool:
    return n > 1 and d * INNER_COPY_RATIO <= post


def _contract_into(g: torch.Tensor, h: torch.Tensor, k: int, out: torch.Tensor, *, alpha: float = 1.0) -> None:
    """`out[i] = alpha · Σ g[i] h[i]` over every mode but `k`: the factor gradient of `f ×_k h`
    given the gradient `g` of its output (`out` `[n, d, d]`, indexed `[output row, input row]`)."""
    n, dims = g.shape[0], g.shape[1:]
    d = dims[k]
    if _cpu_kernel(g, h, out) and h.is_contiguous():
        cpu_kron.contract_into(g, h, k, out, alpha=alpha, threads=torch.get_num_threads())
        return
    if k == 0:
        torch.baddbmm(out, g.view(n, d, -1), h.view(n, d, -1).transpose(1, 2), beta=0.0, alpha=alpha, out=out)
    elif k == len(dims) - 1:
        torch.baddbmm(out, g.view(n, -1, d).transpose(1, 2), h.view(n, -1, d), beta=0.0, alpha=alpha, out=out)
    else:
        pre = math.prod(dims[:k])
        gv, hv = g.view(n, pre, d, -1), h.view(n, pre, d, -1)
        if _batch_inner(n, d, gv.shape[-1]):  # every expert's per-row products at once
            post = gv.shape[-1]
            partial = workspace.buffer("kron_partial", n * pre * d * d, g).view(n * pre, d, d)
            torch.bmm(gv.view(n * pre, d, post), hv.view(n * pre, d, post).transpose(1, 2), out=partial)
            torch.sum(partial.view(n, pre, d, d), 1, out=out)
        else:  # one expert's per-row products, reused across experts
            partial = workspace.buffer("kron_partial", pre * d * d, g).view(pre, d, d)
            for i in range(n):
                torch.bmm(gv[i], hv[i].transpose(1, 2), out=partial)
                torch.sum(partial, 0, out=out[i])
        if alpha != 1.0:
            out.mul_(alpha)


# On CPU the work buffers hold a block of experts of at most this size: buffers under glibc's mmap
# threshold are recycled by the heap instead of being mapped and page-faulted afresh on every call.
# 24 MiB rather than 12 (two T5-base FFN experts per block instead of one): fewer, larger products;
# measured with the merged linear's budget, camex r=1 3-14 % faster on one thread and on two idle
# ones (docs/benchmarks.md).
CPU_BLOCK_BYTES = 24 * 2**20
# On one thread, experts up to this size get blocks of at most this size instead: a pass keeps
# about five block-sized buffers busy (input, τ, two chain buffers, output), which then stay in a
# 32 MiB last-level cache together. A T5-base expert (9 MiB) cannot fit, and larger blocks pay
# there; a MiniLM-L6 expert (2.25 MiB) can: its curvature ran 12-15 % faster in blocks of one
# than of all 7. On several threads every block costs each product a parallel region, and with
# another process on the cores (PyTorch's threads spin) r = 8 ran 1.26-1.41x slower in blocks of
# one, so there the byte budget holds (docs/benchmarks.md, "Cache-sized curvature blocks").
CPU_CACHE_BLOCK_BYTES = 4 * 2**20


def expert_block(x: torch.Tensor) -> int:
    """Experts per block: all of them off the CPU (the caching allocator recycles memory there)."""
    n = x.shape[0]
    if x.device.type != "cpu" or n == 0:
        return max(n, 1)
    expert, budget = max(x[0].numel() * x.element_size(), 1), CPU_BLOCK_BYTES
    if expert <= CPU_CACHE_BLOCK_BYTES and torch.get_num_threads() == 1:
        budget = min(budget, CPU_CACHE_BLOCK_BYTES)
    return max(1, min(n, budget // expert))


def _blocks(n: int, size: int):
    for start in range(0, n, size):
        yield slice(start, min(start + size, n))


class _KroneckerSum(torch.autograd.Function):
    """`scale · Σ_ρ f_ρ,0 ×_0 (... (f_ρ,m-1 ×_{m-1} τ))` with hand-written, allocation-lean passes.

    `τ = x`, or `τ_i = x_i − base` where a base is given: the difference is then taken block by
    block inside the passes (and `∂base = −Σ_i ∂τ_i` reduced there), so no τ-sized tensor of
    domain vectors is formed, written and page-faulted, and no extra pass over it runs.

    Experts are independent, so both passes walk blocks of experts (`expert_block`) through a
    few block-sized work buffers reused across calls (`workspace`); only the output (forward) and
    `∂x` (backward) are τ-sized. Forward, per term: a chain of mode products ping-pongs between
    two work buffers and the last one accumulates into the output inside the GEMM. Backward, per
    term: recompute the partial products `h_j` (m - 1 buffers), then walk the modes back,
    contracting the running gradient with `h_j` for each factor gradient and overwriting the
    buffer of the partial just consumed with the next running gradient: `3m - 1` mode products
    and `m` contractions per term.
    """

    @staticmethod
    def forward(
        ctx, x: torch.Tensor, base: torch.Tensor | None, scale: float, reuse_grad: bool, *factors: torch.Tensor
    ) -> torch.Tensor:
        x = x.contiguous()
        n, rank, order = x.shape[0], factors[0].shape[0], _order(x.shape[1:])
        chain, last = order[:-1], order[-1]  # the products before the final one, an outer mode
        size = expert_block(x)
        work = [_work(f"kron{j}", size, x) for j in range(min(len(chain), 2))]
        taus = None if base is None else _work("kron_tau", size, x)
        out = workspace.empty_like(x)
        for e in _blocks(n, size):
            nb = e.stop - e.start
            xs = x[e] if taus is None else torch.sub(x[e], base, out=taus[:nb])
            outs, ws = out[e], [w[:nb] for w in work]
            for rho in range(rank):
                h = xs
                for j, k in enumerate(chain):
                    h = _mode_into(h, factors[k][rho, e], k, ws[j % 2])
                _mode_into(h, factors[last][rho, e], last, outs, alpha=scale, accumulate=rho > 0)
        ctx.scale, ctx.reuse_grad = scale, reuse_grad
        ctx.save_for_backward(x, base, *factors)
        return out

    @staticmethod
    @once_differentiable
    def backward(ctx, grad: torch.Tensor):
        x, base, *factors = ctx.saved_tensors
        need_x, need_base, _, _, *need_f = ctx.needs_input_grad
        n, m, rank, scale = x.shape[0], len(factors), factors[0].shape[0], ctx.scale
        order = _order(x.shape[1:])  # step j applied mode order[j] to inputs[j]
        grad_f = [torch.empty_like(f) if need else None for f, need in zip(factors, need_f)]
        steps = [j for j in range(m) if need_f[order[j]]]
        need_tau = need_x or need_base
        if not steps and not need_tau:
            return (None, None, None, None, *grad_f)
        lowest = 0 if need_tau else min(steps)  # the gradient must flow back down to this step
        top = max(steps, default=0)  # the highest step whose input partial is needed
        grad = grad.contiguous()
        size = expert_block(x)
        # ∂τ goes to ∂x directly (over the incoming gradient where the caller allows it: each
        # block's gradient is then copied aside first if r > 1 terms read it); where only the
        # base needs it, into a block buffer
        reuse = need_x and ctx.reuse_grad and not workspace.graph_is_kept()
        grad_x = grad if reuse else workspace.empty_like(x) if need_x else None
        grads = _work("kron_grad", size, x) if reuse and rank > 1 else None
        grad_tau = None if need_x or not need_base else _work("kron_gtau", size, x)
        grad_base = torch.zeros_like(base) if need_base else None
        work = [_work(f"kron{j}", size, x) for j in range(m - 1)]
        taus = None if base is None or top == 0 else _work("kron_tau", size, x)
        for e in _blocks(n, size):
            nb = e.stop - e.start
            ws = [w[:nb] for w in work]
            xs = x[e] if taus is None else torch.sub(x[e], base, out=taus[:nb])
            gx = None if not need_tau else (grad_x[e] if grad_x is not None else grad_tau[:nb])
            block_grad = grad[e] if grads is None else grads[:nb].copy_(grad[e])
            for rho in range(rank):
                inputs = [xs]  # inputs[j] is what step j received; inputs[j] lives in ws[j - 1]
                for j in range(top):
                    inputs.append(_mode_into(inputs[j], factors[order[j]][rho, e], order[j], ws[j]))
                g, alpha = block_grad, scale
                for j in reversed(range(lowest, m)):
                    k = order[j]
                    if grad_f[k] is not None:
                        _contract_into(g, inputs[j], k, grad_f[k][rho, e], alpha=alpha)
                    f_t = factors[k][rho, e].transpose(-1, -2)
                    if j > lowest:  # inputs[j] is consumed: its buffer takes the next gradient
                        g = _mode_into(g, f_t, k, ws[j - 1], alpha=alpha)
                    elif need_tau:  # j == 0: an outer mode, so the r terms accumulate in the GEMM
                        _mode_into(g, f_t, k, gx, alpha=alpha, accumulate=rho > 0)
                    alpha = 1.0
            if need_base:  # τ_i = x_i − base
                for i in range(nb):
                    grad_base.sub_(gx[i])
        return (grad_x, grad_base, None, None, *grad_f)


def _work(name: str, size: int, x: torch.Tensor) -> torch.Tensor:
    """A reused work buffer for a block of `size` experts shaped like `x`'s."""
    return workspace.buffer(name, size * x[0].numel(), x).view(size, *x.shape[1:])


def kronecker_apply(
    tau: torch.Tensor,
    factors: Sequence[torch.Tensor],
    *,
    scale: float = 1.0,
    base: torch.Tensor | None = None,
    reuse_grad: bool = False,
) -> torch.Tensor:
    """Apply `scale · M_i` to each of `tau` `[n, O, I]` (or a bias `[n, O]`).

    `factors` holds one `[r, n, d_k, d_k]` tensor per mode: `(A, B, C, D)` for a weight with
    `O = d_A·d_B`, `I = d_C·d_D`; `(A, B)` for a bias. Returns a new tensor shaped like `tau`.
    `scale` is applied inside the last GEMM of each pass, at no cost. With `base` (`[O, I]`),
    `tau` holds the experts and `M_i` is applied to `tau_i − base` (the same result as
    `kronecker_apply(domain_vectors(tau, base), ...)`), on the CPU without forming the differences.
    `reuse_grad=True`: the gradient reaching the result belongs to the caller alone (it is a
    temporary, no hook or other consumer keeps it), so the backward pass writes `∂tau` over it.
    """
    dims = [f.shape[-1] for f in factors]
    n = tau.shape[0]
    if math.prod(dims) != math.prod(tau.shape[1:]):
        raise ValueError(f"factor dims {dims} do not tile a tensor of shape {tuple(tau.shape[1:])}")
    with torch.autocast(tau.device.type, enabled=False):  # parameter-only maths, in the parameters' dtype
        x = tau.reshape(n, *dims)
        if base is not None and (torch.compiler.is_compiling() or fused_kernel(x, factors)):
            x, base = x + base.reshape(dims).neg(), None  # domain_vectors, for the traced and fused paths
        if torch.compiler.is_compiling():  # a static graph of plain products for the compiler to fuse
            out = kronecker_traced(x, factors, scale=scale)
        elif fused_kernel(x, factors):
            out = kronecker_triton(x, factors, scale=scale).to(x.dtype)
        else:
            base = None if base is None else base.reshape(dims)
            out = _KroneckerSum.apply(x, base, scale, reuse_grad, *factors)
    return out.reshape(tau.shape)


# The fused Triton kernels (`camex.kernels.kronecker`): None picks them for CUDA tensors whenever
# Triton is installed and their tiles fit (`kernels.fits`); True also where they do not fit (may
# fail to compile); False keeps the PyTorch passes everywhere (the fallback and reference).
FUSED: bool | None = None


def fused_kernel(x: torch.Tensor, factors: Sequence[torch.Tensor]) -> bool:
    """Whether `kronecker_apply` runs the fused Triton kernels for these operands."""
    if FUSED is False or not x.is_cuda or len(factors) not in (2, 4) or not kernels.available():
        return False
    return all(f.is_cuda for f in factors) and (FUSED is True or kernels.fits(x, factors))


_LETTERS = "abcdefgh"


def kronecker_traced(x: torch.Tensor, factors: Sequence[torch.Tensor], *, scale: float = 1.0) -> torch.Tensor:
    """`scale · Σ_ρ f_ρ,0 ×_0 (... (f_ρ,m-1 ×_{m-1} x))` for `x` `[n, d_0, ..., d_{m-1}]` by plain
    autograd, one einsum per mode and term: what `torch.compile` traces, and a reference."""
    m = len(factors)
    modes = _LETTERS[:m]
    out = None
    for rho in range(factors[0].shape[0]):
        h = x
        for k in _order([f.shape[-1] for f in factors]):
            spec = f"nz{modes[k]},n{modes}->n{modes[:k]}z{modes[k + 1 :]}"
            h = torch.einsum(spec, factors[k][rho], h)
        out = h if out is None else out + h
    return out * scale


def identity_factors(r: int, n: int, dims: Sequence[int]) -> list[torch.Tensor]:
    """Factors of `M_i = r · Id` (every factor the identity), the released initialisation."""
    return [torch.eye(d).expand(r, n, d, d).clone() for d in dims]
