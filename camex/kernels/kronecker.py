"""Fused Kronecker curvature `scale · Σ_ρ (A_ρ ⊗ B_ρ) τ (C_ρ ⊗ D_ρ)ᵀ` in Triton (SPEC §4).

`τ_i ∈ R^{O×I}` is viewed as `[o1, o2, i1, i2]`. Forward, two passes over `τ`, every expert in
one launch (grid axis 0 is the expert):

1. input side, on tiles of rows: each row `[i1, i2]` becomes `C_ρ X D_ρᵀ` for every term, with
   the tile read once (`U_ρ = τ K_ρᵀ`, `K = C ⊗ D`);
2. output side, on tiles of columns: each column `[o1, o2]` becomes `Σ_ρ A_ρ U_ρ B_ρᵀ`,
   accumulated over the terms in fp32 and stored once, scaled. A program writes one block of
   `o1` (grid axis 2): `A_ρ[block, :] ×₁ U_ρ` by 2-D dots over chunks of `o1`, then `×₂ B_ρ` by
   one 2-D dot, so no tile is larger than `[block, columns, o2]` (the paper's 3072 = 48·64
   rows take three blocks of 16 by 16 columns by 64).

Backward, with `G` the output's gradient and `W = A ⊗ B`: recompute `U_ρ` (pass 1), then on
column tiles (and `o1` blocks of `H`) `H_ρ = scale · W_ρᵀ G` together with `∂A_ρ` and `∂B_ρ`
(from `G` and `U_ρ`), then on row tiles `∂τ = Σ_ρ H_ρ K_ρ` together with `∂C_ρ` and `∂D_ρ`
(from `H_ρ` and `τ`). Factor
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
    def _row_offsets(rows, d1, d2, P1: tl.constexpr, P2: tl.constexpr):
        c = tl.arange(0, P1)
        f = tl.arange(0, P2)
        offs = rows[:, None, None] * (d1 * d2) + c[None, :, None] * d2 + f[None, None, :]
        return offs, (c[None, :, None] < d1) & (f[None, None, :] < d2)

    @triton.jit
    def _load_block(ptr, rho, e, d, r0, c0, BM: tl.constexpr, BK: tl.constexpr, TRANS: tl.constexpr):
        """Block `[BM, BK]` at rows `r0`, columns `c0` of factor `[r, n, d, d]` (term `rho`, expert
        `e`), or of its transpose."""
        i = r0 + tl.arange(0, BM)
        j = c0 + tl.arange(0, BK)
        row, col = (j[None, :], i[:, None]) if TRANS else (i[:, None], j[None, :])
        mask = (row < d) & (col < d)
        return tl.load(ptr + (rho * tl.num_programs(0) + e) * d * d + row * d + col, mask=mask, other=0.0).to(
            tl.float32
        )

    @triton.jit
    def _col_offsets(a0, cols, width, d1, d2, BA: tl.constexpr, BC: tl.constexpr, Q2: tl.constexpr):
        """Offsets `[BA, BC, Q2]` of the entries `[o1 = a0 + a, o2 = b, column]` of a `[d1·d2, width]`
        matrix, and their mask. `o2` is the last axis, so a tile reshapes for free to `[BA, BC·Q2]`
        (rows for an `o1` product) or `[BA·BC, Q2]` (rows for an `o2` product)."""
        a = a0 + tl.arange(0, BA)
        b = tl.arange(0, Q2)
        offs = (a[:, None, None] * d2 + b[None, None, :]) * width + cols[None, :, None]
        mask = (a[:, None, None] < d1) & (b[None, None, :] < d2) & (cols[None, :, None] < width)
        return offs, mask

    @triton.jit
    def _in_side(X, P1: tl.constexpr, P2: tl.constexpr, BR: tl.constexpr, c_f, d_f, DOT: tl.constexpr):
        """Each row `[P1, P2]` of `X` `[BR, P1, P2]` to `c_f · row · d_fᵀ` (d_f passed transposed)."""
        y = tl.reshape(tl.dot(tl.reshape(X, (BR * P1, P2)), d_f, input_precision=DOT), (BR, P1, P2))
        return tl.dot(tl.broadcast_to(c_f[None, :, :], (BR, P1, P1)), y, input_precision=DOT)

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
            c_f = _load_block(c_ptr, rho, e, d1, 0, 0, P1, P1, False)
            d_t = _load_block(d_ptr, rho, e, d2, 0, 0, P2, P2, True)
            z = _in_side(x, P1, P2, BR, c_f, d_t, DOT)
            tl.store(u_ptr + (rho * tl.num_programs(0) + e) * size + offs, z, mask=mask)

    @triton.jit
    def _fwd_out_kernel(u_ptr, u_stride_r, a_ptr, b_ptr, out_ptr, scale, R, width, d1, d2,
                        Q2: tl.constexpr, BA: tl.constexpr, BC: tl.constexpr, DOT: tl.constexpr):  # fmt: skip
        """Pass 2: `out[e, rows, cols] = scale · Σ_ρ (A_ρ ⊗ B_ρ) U_ρ[e, :, cols]` for the rows with
        `o1` in block `a0 + [0, BA)`: `W = A_ρ[block, :] ×₁ U_ρ`, accumulated over `o1` chunks of
        `U_ρ` by 2-D dots, then `W ×₂ B_ρ` (one 2-D dot); the terms added in fp32, stored once."""
        e = tl.program_id(0)
        cols = tl.program_id(1) * BC + tl.arange(0, BC)
        a0 = tl.program_id(2) * BA
        size = d1 * d2 * width
        acc = tl.zeros((BA * BC, Q2), dtype=tl.float32)
        for rho in range(R):
            w = tl.zeros((BA, BC * Q2), dtype=tl.float32)
            for k0 in range(0, d1, BA):
                offs, mask = _col_offsets(k0, cols, width, d1, d2, BA, BC, Q2)
                u = tl.load(u_ptr + rho * u_stride_r + e * size + offs, mask=mask, other=0.0).to(tl.float32)
                a_f = _load_block(a_ptr, rho, e, d1, a0, k0, BA, BA, False)
                w += tl.dot(a_f, tl.reshape(u, (BA, BC * Q2)), input_precision=DOT)
            b_t = _load_block(b_ptr, rho, e, d2, 0, 0, Q2, Q2, True)
            acc += tl.dot(tl.reshape(w, (BA * BC, Q2)), b_t, input_precision=DOT)
        offs, mask = _col_offsets(a0, cols, width, d1, d2, BA, BC, Q2)
        tl.store(out_ptr + e * size + offs, tl.reshape(acc * scale, (BA, BC, Q2)), mask=mask)

    @triton.jit
    def _bwd_out_kernel(g_ptr, u_ptr, u_stride_r, a_ptr, b_ptr, h_ptr, ga_ptr, gb_ptr, scale, R, width, d1, d2,
                        Q2: tl.constexpr, BA: tl.constexpr, BC: tl.constexpr, DOT: tl.constexpr):  # fmt: skip
        """Column tiles, `o1` in block `a0 + [0, BA)` of `H`'s rows: `Y = A_ρᵀ[block, :] ×₁ G`
        (accumulated over `o1` chunks of `G`), `H_ρ = Y ×₂ B_ρᵀ`, `∂B_ρ += Y U_ρᵀ` over the block;
        `∂A_ρ[:, block] += G (B_ρ ×₂ U_ρ[block])ᵀ` per chunk (contracted over every other mode),
        the factor gradients added atomically over tiles."""
        e = tl.program_id(0)
        n = tl.num_programs(0)
        cols = tl.program_id(1) * BC + tl.arange(0, BC)
        a0 = tl.program_id(2) * BA
        size = d1 * d2 * width
        offs_h, mask_h = _col_offsets(a0, cols, width, d1, d2, BA, BC, Q2)
        ia = a0 + tl.arange(0, BA)
        ib = tl.arange(0, Q2)
        mask_b = (ib[:, None] < d2) & (ib[None, :] < d2)
        for rho in range(R):
            u = tl.load(u_ptr + rho * u_stride_r + e * size + offs_h, mask=mask_h, other=0.0).to(tl.float32)
            u = tl.reshape(u, (BA * BC, Q2))
            b_f = _load_block(b_ptr, rho, e, d2, 0, 0, Q2, Q2, False)
            b_t = _load_block(b_ptr, rho, e, d2, 0, 0, Q2, Q2, True)
            v = tl.reshape(tl.dot(u, b_t, input_precision=DOT), (BA, BC * Q2))  # B ×₂ U on the block
            y = tl.zeros((BA, BC * Q2), dtype=tl.float32)
            for k0 in range(0, d1, BA):
                offs, mask = _col_offsets(k0, cols, width, d1, d2, BA, BC, Q2)
                g = tl.load(g_ptr + e * size + offs, mask=mask, other=0.0).to(tl.float32) * scale
                g = tl.reshape(g, (BA, BC * Q2))
                a_t = _load_block(a_ptr, rho, e, d1, a0, k0, BA, BA, True)
                y += tl.dot(a_t, g, input_precision=DOT)
                grad_a = tl.dot(g, tl.trans(v), input_precision=DOT)  # rows k0 + [0, BA), columns the block
                ik = k0 + tl.arange(0, BA)
                fa = (rho * n + e) * d1 * d1 + ik[:, None] * d1 + ia[None, :]
                tl.atomic_add(ga_ptr + fa, grad_a, mask=(ik[:, None] < d1) & (ia[None, :] < d1))
            y = tl.reshape(y, (BA * BC, Q2))
            grad_b = tl.dot(tl.trans(y), u, input_precision=DOT)
            fb = (rho * n + e) * d2 * d2 + ib[:, None] * d2 + ib[None, :]
            tl.atomic_add(gb_ptr + fb, grad_b, mask=mask_b)
            h = tl.dot(y, b_f, input_precision=DOT)
            tl.store(h_ptr + (rho * n + e) * size + offs_h, tl.reshape(h, (BA, BC, Q2)), mask=mask_h)

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
            c_f = _load_block(c_ptr, rho, e, d1, 0, 0, P1, P1, False)
            c_t = _load_block(c_ptr, rho, e, d1, 0, 0, P1, P1, True)
            d_f = _load_block(d_ptr, rho, e, d2, 0, 0, P2, P2, False)
            d_t = _load_block(d_ptr, rho, e, d2, 0, 0, P2, P2, True)
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


# Largest register tile (elements) a kernel is launched with by default. The row passes hold a
# tile of rows `[BR, i1, i2]` and `C` broadcast over it (`_ROW_ELEMS` per tile); the column passes
# hold `[BA, BC, o2]` tiles, `BA` rows of mode `o1` (a block of the output, or a chunk of the
# `o1` contraction) by `BC` columns, so the paper's 768 ↔ 3072 FFN shapes (`o2` padded to 64)
# fit with `BA = 16` (`_col_block`).
TILE_BUDGET = 16384
_ROW_ELEMS, _COL_WIDTH = 8192, 16
_COL_ELEMS = TILE_BUDGET  # elements of one column-pass tile (tests lower it to force several blocks)


def _col_block(d1: int, d2: int) -> tuple[int, int]:
    """`(Q2, BA)`: `o2` padded, and the `o1` block of a column-pass tile `[BA, BC, Q2]` (16 ≤ BA ≤
    padded `o1`, as `tl.dot` wants; the largest within `_COL_ELEMS`)."""
    q2 = _pad(d2)
    return q2, max(16, min(_pad(d1), _COL_ELEMS // (_COL_WIDTH * q2)))


def fits(x: torch.Tensor, factors) -> bool:
    """Whether every register tile of the kernels for `x` `[n, *dims]` stays within `TILE_BUDGET`
    (and every offset within 32 bits)."""
    dims = [f.shape[-1] for f in factors]
    q2, ba = _col_block(dims[0], dims[1])
    tiles = [ba * _COL_WIDTH * q2, q2 * q2, ba * ba]
    if len(dims) == 4:
        p1, p2 = _pad(dims[2]), _pad(dims[3])
        br = _row_tile(p1, p2)
        tiles += [br * p1 * p1, br * p1 * p2, br * p2 * p1]
    # the kernels index `[r, n, O, I]` buffers with 32-bit offsets
    return max(tiles) <= TILE_BUDGET and factors[0].shape[0] * x.numel() < 2**31


def _col_launch(n: int, width: int, d1: int, d2: int) -> tuple[tuple[int, int, int], dict]:
    """Grid (expert, column tile, `o1` block) and block sizes of a column pass."""
    q2, ba = _col_block(d1, d2)
    warps = 8 if ba * _COL_WIDTH * q2 > 8192 else 4  # untuned: several such tiles are live at once
    grid = (n, triton.cdiv(width, _COL_WIDTH), triton.cdiv(d1, ba))
    return grid, {"Q2": q2, "BA": ba, "BC": _COL_WIDTH, "num_warps": warps}


def dot_precision(x: torch.Tensor) -> str:
    """`tl.dot`'s fp32 input precision: TF32 on CUDA where torch's matmuls allow it, else IEEE."""
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
        x, c, d, u, r, rows, d1, d2, P1=p1, P2=p2, BR=br, DOT=dot_precision(x)
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
    grid, blocks = _col_launch(n, width, d1, d2)
    _fwd_out_kernel[grid](
        u, stride_r, factors[0], factors[1], out, scale, r, width, d1, d2, DOT=dot_precision(x), **blocks
    )  # fmt: skip
    return out


def _backward(grad: torch.Tensor, x: torch.Tensor, factors, scale: float):
    n, d1, d2 = x.shape[:3]
    r = factors[0].shape[0]
    dot = dot_precision(x)
    grad_f = [torch.zeros(f.shape, device=f.device, dtype=torch.float32) for f in factors]
    if len(factors) == 4:
        rows = x.reshape(n, d1 * d2, x.shape[3], x.shape[4])
        u = _input_side(rows, factors[2], factors[3])
        stride_r, width = u[0].numel(), x.shape[3] * x.shape[4]
    else:
        u, stride_r, width = x, 0, 1
    h = torch.empty((r, *x.shape), device=x.device, dtype=torch.float32)
    grid, blocks = _col_launch(n, width, d1, d2)
    _bwd_out_kernel[grid](
        grad, u, stride_r, factors[0], factors[1], h, grad_f[0], grad_f[1], scale, r, width, d1, d2,
        DOT=dot, **blocks,
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
