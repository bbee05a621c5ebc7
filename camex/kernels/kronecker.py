"""Fused Kronecker curvature `scale · Σ_ρ (A_ρ ⊗ B_ρ) τ (C_ρ ⊗ D_ρ)ᵀ` in Triton (SPEC §4).

`τ_i ∈ R^{O×I}` is viewed as `[o1, o2, i1, i2]`. Forward, two passes over `τ`, every expert in
one launch (grid axis 0 is the expert):

1. input side, on tiles of rows: each row `[i1, i2]` becomes `C_ρ X D_ρᵀ` for every term, with
   the tile read once (`U_ρ = τ K_ρᵀ`, `K = C ⊗ D`);
2. output side, on tiles of columns: each column `[o1, o2]` becomes `Σ_ρ A_ρ U_ρ B_ρᵀ`,
   accumulated over the terms in fp32 and stored once, scaled.

Backward, with `G` the output's gradient and `W = A ⊗ B`: recompute `U_ρ` (pass 1), then on
column tiles `H_ρ = scale · W_ρᵀ G` together with `∂A_ρ` and `∂B_ρ` (from `G` and `U_ρ`), then on
row tiles `∂τ = Σ_ρ H_ρ K_ρ` together with `∂C_ρ` and `∂D_ρ` (from `H_ρ` and `τ`). Factor
gradients are reduced over tiles inside the kernels (atomic adds into fp32 buffers). A bias
(two modes) uses the column passes only. Inputs may be bf16/fp16 or fp32; products accumulate
in fp32. Factor dimensions are padded to powers of two (at least 16, as `tl.dot` needs) with
masked loads. `camex.merging.curvature` picks this path on CUDA; its PyTorch passes are the
fallback and the reference (`tests/test_triton_kernels.py` runs both under Triton's interpreter).
"""

from __future__ import annotations

import torch

try:
    import triton
    import triton.language as tl
except ImportError:  # pragma: no cover - triton ships with CUDA builds of torch
    triton = None


def available() -> bool:
    return triton is not None


def _pad(d: int) -> int:
    return max(16, 1 << (d - 1).bit_length())


if triton is not None:

    @triton.jit
    def _load_factor(ptr, rho, e, d, P: tl.constexpr, TRANS: tl.constexpr):
        """Factor `[r, n, d, d]` entry block `[P, P]` of term `rho`, expert `e` (transposed if asked)."""
        i = tl.arange(0, P)
        row, col = (i[None, :], i[:, None]) if TRANS else (i[:, None], i[None, :])
        mask = (row < d) & (col < d)
        return tl.load(ptr + (rho * tl.num_programs(0) + e) * d * d + row * d + col, mask=mask, other=0.0).to(
            tl.float32
        )

    @triton.jit
    def _row_offsets(rows, d1, d2, P1: tl.constexpr, P2: tl.constexpr):
        c = tl.arange(0, P1)
        f = tl.arange(0, P2)
        offs = rows[:, None, None] * (d1 * d2) + c[None, :, None] * d2 + f[None, None, :]
        return offs, (c[None, :, None] < d1) & (f[None, None, :] < d2)

    @triton.jit
    def _col_offsets(cols, width, d1, d2, Q1: tl.constexpr, Q2: tl.constexpr):
        a = tl.arange(0, Q1)
        b = tl.arange(0, Q2)
        offs = (a[:, None, None] * d2 + b[None, :, None]) * width + cols[None, None, :]
        mask = (a[:, None, None] < d1) & (b[None, :, None] < d2) & (cols[None, None, :] < width)
        return offs, mask

    @triton.jit
    def _in_side(X, P1: tl.constexpr, P2: tl.constexpr, BR: tl.constexpr, c_f, d_f, DOT: tl.constexpr):
        """Each row `[P1, P2]` of `X` `[BR, P1, P2]` to `c_f · row · d_fᵀ` (d_f passed transposed)."""
        y = tl.reshape(tl.dot(tl.reshape(X, (BR * P1, P2)), d_f, input_precision=DOT), (BR, P1, P2))
        return tl.dot(tl.broadcast_to(c_f[None, :, :], (BR, P1, P1)), y, input_precision=DOT)

    @triton.jit
    def _out_side(U, Q1: tl.constexpr, Q2: tl.constexpr, BC: tl.constexpr, a_f, b_f, DOT: tl.constexpr):
        """Each column `[Q1, Q2]` of `U` `[Q1, Q2, BC]` to `a_f · col · b_fᵀ`."""
        v = tl.dot(tl.broadcast_to(b_f[None, :, :], (Q1, Q2, Q2)), U, input_precision=DOT)
        return tl.reshape(tl.dot(a_f, tl.reshape(v, (Q1, Q2 * BC)), input_precision=DOT), (Q1, Q2, BC))

    @triton.jit
    def _fwd_in_kernel(x_ptr, c_ptr, d_ptr, u_ptr, R, n_rows, d1, d2,
                       P1: tl.constexpr, P2: tl.constexpr, BR: tl.constexpr, DOT: tl.constexpr):  # fmt: skip
        """Pass 1: `U_ρ[e, rows] = τ[e, rows] (C_ρ ⊗ D_ρ)ᵀ` for every term; the tile is read once."""
        e = tl.program_id(0)
        rows = tl.program_id(1) * BR + tl.arange(0, BR)
        offs, mask = _row_offsets(rows, d1, d2, P1, P2)
        mask = mask & (rows[:, None, None] < n_rows)
        size = n_rows * d1 * d2
        x = tl.load(x_ptr + e * size + offs, mask=mask, other=0.0).to(tl.float32)
        for rho in range(R):
            c_f = _load_factor(c_ptr, rho, e, d1, P1, False)
            d_t = _load_factor(d_ptr, rho, e, d2, P2, True)
            z = _in_side(x, P1, P2, BR, c_f, d_t, DOT)
            tl.store(u_ptr + (rho * tl.num_programs(0) + e) * size + offs, z, mask=mask)

    @triton.jit
    def _fwd_out_kernel(u_ptr, u_stride_r, a_ptr, b_ptr, out_ptr, scale, R, width, d1, d2,
                        Q1: tl.constexpr, Q2: tl.constexpr, BC: tl.constexpr, DOT: tl.constexpr):  # fmt: skip
        """Pass 2: `out[e, :, cols] = scale · Σ_ρ (A_ρ ⊗ B_ρ) U_ρ[e, :, cols]`, accumulated in fp32."""
        e = tl.program_id(0)
        cols = tl.program_id(1) * BC + tl.arange(0, BC)
        offs, mask = _col_offsets(cols, width, d1, d2, Q1, Q2)
        size = d1 * d2 * width
        acc = tl.zeros((Q1, Q2, BC), dtype=tl.float32)
        for rho in range(R):
            u = tl.load(u_ptr + rho * u_stride_r + e * size + offs, mask=mask, other=0.0).to(tl.float32)
            a_f = _load_factor(a_ptr, rho, e, d1, Q1, False)
            b_f = _load_factor(b_ptr, rho, e, d2, Q2, False)
            acc += _out_side(u, Q1, Q2, BC, a_f, b_f, DOT)
        tl.store(out_ptr + e * size + offs, acc * scale, mask=mask)

    @triton.jit
    def _bwd_out_kernel(g_ptr, u_ptr, u_stride_r, a_ptr, b_ptr, h_ptr, ga_ptr, gb_ptr, scale, R, width, d1, d2,
                        Q1: tl.constexpr, Q2: tl.constexpr, BC: tl.constexpr, DOT: tl.constexpr):  # fmt: skip
        """Column tiles: `H_ρ = scale · W_ρᵀ G`, `∂A_ρ += scale · G (B_ρ U_ρ)ᵀ`, `∂B_ρ += scale · (A_ρᵀ G) U_ρᵀ`
        (contracted over every other mode), the factor gradients added atomically over tiles."""
        e = tl.program_id(0)
        n = tl.num_programs(0)
        cols = tl.program_id(1) * BC + tl.arange(0, BC)
        offs, mask = _col_offsets(cols, width, d1, d2, Q1, Q2)
        size = d1 * d2 * width
        g = tl.load(g_ptr + e * size + offs, mask=mask, other=0.0).to(tl.float32) * scale
        ia = tl.arange(0, Q1)
        ib = tl.arange(0, Q2)
        mask_a = (ia[:, None] < d1) & (ia[None, :] < d1)
        mask_b = (ib[:, None] < d2) & (ib[None, :] < d2)
        for rho in range(R):
            u = tl.load(u_ptr + rho * u_stride_r + e * size + offs, mask=mask, other=0.0).to(tl.float32)
            a_t = _load_factor(a_ptr, rho, e, d1, Q1, True)
            b_f = _load_factor(b_ptr, rho, e, d2, Q2, False)
            b_t = _load_factor(b_ptr, rho, e, d2, Q2, True)
            v = tl.dot(tl.broadcast_to(b_f[None, :, :], (Q1, Q2, Q2)), u, input_precision=DOT)  # B ×₂ U
            grad_a = tl.dot(tl.reshape(g, (Q1, Q2 * BC)), tl.trans(tl.reshape(v, (Q1, Q2 * BC))), input_precision=DOT)
            atg = tl.reshape(tl.dot(a_t, tl.reshape(g, (Q1, Q2 * BC)), input_precision=DOT), (Q1, Q2, BC))
            grad_b = tl.sum(tl.dot(atg, tl.permute(u, (0, 2, 1)), input_precision=DOT), axis=0)
            h = tl.dot(tl.broadcast_to(b_t[None, :, :], (Q1, Q2, Q2)), atg, input_precision=DOT)
            tl.store(h_ptr + (rho * n + e) * size + offs, h, mask=mask)
            fa = (rho * n + e) * d1 * d1 + ia[:, None] * d1 + ia[None, :]
            fb = (rho * n + e) * d2 * d2 + ib[:, None] * d2 + ib[None, :]
            tl.atomic_add(ga_ptr + fa, grad_a, mask=mask_a)
            tl.atomic_add(gb_ptr + fb, grad_b, mask=mask_b)

    @triton.jit
    def _bwd_in_kernel(h_ptr, x_ptr, c_ptr, d_ptr, gx_ptr, gc_ptr, gd_ptr, R, n_rows, d1, d2,
                       P1: tl.constexpr, P2: tl.constexpr, BR: tl.constexpr, DOT: tl.constexpr):  # fmt: skip
        """Row tiles: `∂τ = Σ_ρ C_ρᵀ H_ρ D_ρ` per row, `∂C_ρ += Σ H (X D_ρᵀ)ᵀ`, `∂D_ρ += Σ Hᵀ (C_ρ X)`."""
        e = tl.program_id(0)
        n = tl.num_programs(0)
        rows = tl.program_id(1) * BR + tl.arange(0, BR)
        offs, mask = _row_offsets(rows, d1, d2, P1, P2)
        mask = mask & (rows[:, None, None] < n_rows)
        size = n_rows * d1 * d2
        x = tl.load(x_ptr + e * size + offs, mask=mask, other=0.0).to(tl.float32)
        ic = tl.arange(0, P1)
        idd = tl.arange(0, P2)
        mask_c = (ic[:, None] < d1) & (ic[None, :] < d1)
        mask_d = (idd[:, None] < d2) & (idd[None, :] < d2)
        acc = tl.zeros((BR, P1, P2), dtype=tl.float32)
        for rho in range(R):
            h = tl.load(h_ptr + (rho * n + e) * size + offs, mask=mask, other=0.0).to(tl.float32)
            c_f = _load_factor(c_ptr, rho, e, d1, P1, False)
            c_t = _load_factor(c_ptr, rho, e, d1, P1, True)
            d_f = _load_factor(d_ptr, rho, e, d2, P2, False)
            d_t = _load_factor(d_ptr, rho, e, d2, P2, True)
            acc += _in_side(h, P1, P2, BR, c_t, d_f, DOT)  # Cᵀ H D
            xd = tl.reshape(tl.dot(tl.reshape(x, (BR * P1, P2)), d_t, input_precision=DOT), (BR, P1, P2))
            grad_c = tl.sum(tl.dot(h, tl.permute(xd, (0, 2, 1)), input_precision=DOT), axis=0)
            cx = tl.dot(tl.broadcast_to(c_f[None, :, :], (BR, P1, P1)), x, input_precision=DOT)
            grad_d = tl.dot(tl.trans(tl.reshape(h, (BR * P1, P2))), tl.reshape(cx, (BR * P1, P2)), input_precision=DOT)
            fc = (rho * n + e) * d1 * d1 + ic[:, None] * d1 + ic[None, :]
            fd = (rho * n + e) * d2 * d2 + idd[:, None] * d2 + idd[None, :]
            tl.atomic_add(gc_ptr + fc, grad_c, mask=mask_c)
            tl.atomic_add(gd_ptr + fd, grad_d, mask=mask_d)
        tl.store(gx_ptr + e * size + offs, acc, mask=mask)


# register-tile budgets: elements of one `[rows, i1, i2]` or `[o1, o2, cols]` tile
_ROW_ELEMS, _COL_WIDTH = 8192, 16


# Largest register tile (elements) a kernel is launched with by default. The column passes hold
# `B` broadcast over `o1` (`[o1, o2, o2]`, padded) and the row passes `C` over a row tile, so the
# paper's 768/3072 FFN shapes (o2 = 64: a 64³ tile) do not fit yet: `fits` is False for them and
# `camex.merging.curvature` keeps the PyTorch passes there.
TILE_BUDGET = 16384


def fits(x: torch.Tensor, factors) -> bool:
    """Whether every register tile of the kernels for `x` `[n, *dims]` stays within `TILE_BUDGET`."""
    dims = [f.shape[-1] for f in factors]
    q1, q2 = _pad(dims[0]), _pad(dims[1])
    tiles = [q1 * q2 * q2, q1 * q2 * _COL_WIDTH, q1 * q1]
    if len(dims) == 4:
        p1, p2 = _pad(dims[2]), _pad(dims[3])
        br = _row_tile(p1, p2)
        tiles += [br * p1 * p1, br * p1 * p2, br * p2 * p1]
    return max(tiles) <= TILE_BUDGET


def _dot_precision(x: torch.Tensor) -> str:
    return "tf32" if x.is_cuda and torch.backends.cuda.matmul.allow_tf32 else "ieee"


def _row_tile(p1: int, p2: int) -> int:
    return max(1, min(64, _ROW_ELEMS // (p1 * p2)))


def _input_side(x: torch.Tensor, c: torch.Tensor, d: torch.Tensor) -> torch.Tensor:
    """`U_ρ = x (C_ρ ⊗ D_ρ)ᵀ`, `[r, n, O, i1, i2]`, for `x` `[n, O, i1, i2]`."""
    n, rows, d1, d2 = x.shape
    r = c.shape[0]
    p1, p2 = _pad(d1), _pad(d2)
    br = _row_tile(p1, p2)
    u = torch.empty((r, *x.shape), device=x.device, dtype=torch.float32)
    _fwd_in_kernel[(n, triton.cdiv(rows, br))](
        x, c, d, u, r, rows, d1, d2, P1=p1, P2=p2, BR=br, DOT=_dot_precision(x)
    )  # fmt: skip
    return u


def _check(x: torch.Tensor, factors) -> None:
    n = x.shape[0]
    for f in factors:
        if f.shape[1] != n or f.shape[-1] != f.shape[-2] or not f.is_contiguous():
            raise ValueError(f"factor of shape {tuple(f.shape)} for {n} experts: want contiguous [r, n, d, d]")


class KroneckerTriton(torch.autograd.Function):
    """`scale · Σ_ρ f_ρ,0 ×_0 (... (f_ρ,m-1 ×_{m-1} x))` for `x` `[n, o1, o2(, i1, i2)]`, fp32 out."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, scale: float, *factors: torch.Tensor) -> torch.Tensor:
        x = x.contiguous()
        factors = tuple(f.contiguous() for f in factors)
        _check(x, factors)
        ctx.scale = scale
        ctx.save_for_backward(x, *factors)
        return _forward(x, factors, scale)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        x, *factors = ctx.saved_tensors
        grad_x, grad_f = _backward(grad.contiguous(), x, factors, ctx.scale)
        return (grad_x.to(x.dtype), None, *(g.to(f.dtype) for g, f in zip(grad_f, factors)))


def _forward(x: torch.Tensor, factors, scale: float) -> torch.Tensor:
    n, d1, d2 = x.shape[:3]
    r = factors[0].shape[0]
    if len(factors) == 4:
        u = _input_side(x.reshape(n, d1 * d2, x.shape[3], x.shape[4]), factors[2], factors[3])
        stride_r = u[0].numel()
    else:
        u, stride_r = x, 0  # a bias: every term reads τ itself
    width = 1 if len(factors) == 2 else x.shape[3] * x.shape[4]
    out = torch.empty(x.shape, device=x.device, dtype=torch.float32)
    q1, q2 = _pad(d1), _pad(d2)
    _fwd_out_kernel[(n, triton.cdiv(width, _COL_WIDTH))](
        u, stride_r, factors[0], factors[1], out, scale, r, width, d1, d2,
        Q1=q1, Q2=q2, BC=_COL_WIDTH, DOT=_dot_precision(x),
    )  # fmt: skip
    return out


def _backward(grad: torch.Tensor, x: torch.Tensor, factors, scale: float):
    n, d1, d2 = x.shape[:3]
    r = factors[0].shape[0]
    dot = _dot_precision(x)
    grad_f = [torch.zeros(f.shape, device=f.device, dtype=torch.float32) for f in factors]
    if len(factors) == 4:
        rows = x.reshape(n, d1 * d2, x.shape[3], x.shape[4])
        u = _input_side(rows, factors[2], factors[3])
        stride_r, width = u[0].numel(), x.shape[3] * x.shape[4]
    else:
        u, stride_r, width = x, 0, 1
    h = torch.empty((r, *x.shape), device=x.device, dtype=torch.float32)
    q1, q2 = _pad(d1), _pad(d2)
    _bwd_out_kernel[(n, triton.cdiv(width, _COL_WIDTH))](
        grad, u, stride_r, factors[0], factors[1], h, grad_f[0], grad_f[1], scale, r, width, d1, d2,
        Q1=q1, Q2=q2, BC=_COL_WIDTH, DOT=dot,
    )  # fmt: skip
    if len(factors) == 2:
        return h.sum(0), grad_f
    i1, i2 = x.shape[3], x.shape[4]
    p1, p2 = _pad(i1), _pad(i2)
    br = _row_tile(p1, p2)
    grad_x = torch.empty(x.shape, device=x.device, dtype=torch.float32)
    _bwd_in_kernel[(n, triton.cdiv(d1 * d2, br))](
        h, rows, factors[2], factors[3], grad_x, grad_f[2], grad_f[3], r, d1 * d2, i1, i2,
        P1=p1, P2=p2, BR=br, DOT=dot,
    )  # fmt: skip
    return grad_x, grad_f


def kronecker_triton(x: torch.Tensor, factors, *, scale: float = 1.0) -> torch.Tensor:
    """The fused kernels behind an autograd function; `x` `[n, *dims]` with 2 or 4 modes."""
    if triton is None:
        raise RuntimeError("triton is not installed")
    if len(factors) not in (2, 4):
        raise ValueError(f"the fused curvature takes 2 or 4 modes, got {len(factors)}")
    return KroneckerTriton.apply(x, scale, *factors)
