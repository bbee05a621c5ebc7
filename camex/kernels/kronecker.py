"""Fused Kronecker curvature `scale · Σ_ρ (A_ρ ⊗ B_ρ) τ (C_ρ ⊗ D_ρ)ᵀ` in Triton (SPEC §4).

`τ_i ∈ R^{O×I}` is viewed as `[o1, o2, i1, i2]`. Forward, two passes over `τ`, every expert in
one launch (grid axis 0 is the expert):

1. input side, on tiles of rows: each row `[i1, i2]` becomes `C_ρ X D_ρᵀ` for every term, with
   the tile read once per block of `i1` (`U_ρ = τ K_ρᵀ`, `K = C ⊗ D`);
2. output side, on tiles of columns: each column `[o1, o2]` becomes `Σ_ρ A_ρ U_ρ B_ρᵀ`,
   accumulated over the terms in fp32 and stored once, scaled.

Both passes are one kernel (`_fwd_kernel`) over a view `[m1, m2, width]` of each expert's
matrix (rows: `[i1, i2, O]`; columns: `[o1, o2, I]`) given by strides. A program writes one
block of `m1` (grid axis 2) for a tile of `width` (grid axis 1): `F_ρ[block, :] ×₁ X` by 2-D
dots over chunks of `m1`, then `×₂ G_ρ` by one 2-D dot, so every tile is `[block, tile, m2]`
with `m2` padded (at most `TILE_BUDGET` entries: the paper's 48·64 take blocks of 16 rows of
`o1` by 4 columns by 64), whatever the size of `m1`.

Backward, with `G` the output's gradient: recompute `U_ρ` (pass 1); then the column view
computes `H_ρ = scale · (A_ρ ⊗ B_ρ)ᵀ G` with `∂A_ρ` and `∂B_ρ` (from `G` and `U_ρ`), and the row
view `∂τ = Σ_ρ H_ρ K_ρ` with `∂C_ρ` and `∂D_ρ` (from `H_ρ` and `τ`): one kernel
(`_bwd_kernel`) again. Factor gradients are reduced over tiles inside the kernel (atomic adds
into fp32 buffers). A bias (two modes) uses the column view only. Inputs may be bf16/fp16 or
fp32; products accumulate in fp32. Factor dimensions are padded to powers of two (at least 16,
as `tl.dot` needs) with masked loads. `camex.merging.curvature` picks this path on CUDA; its
PyTorch passes are the fallback and the reference (`tests/test_triton_kernels.py` runs both
under Triton's interpreter).
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
    def _tile(a0, cols, width, d1, d2, s1, s2, sw, BA: tl.constexpr, BC: tl.constexpr, Q2: tl.constexpr):
        """Offsets `[BA, BC, Q2]` of the entries `[m1 = a0 + a, m2 = b, w = cols]` of a view with
        strides `(s1, s2, sw)`, and their mask. `m2` is the last axis, so a tile reshapes for free
        to `[BA, BC·Q2]` (operand of an `m1` product) or `[BA·BC, Q2]` (of an `m2` product)."""
        a = a0 + tl.arange(0, BA)
        b = tl.arange(0, Q2)
        offs = a[:, None, None] * s1 + b[None, None, :] * s2 + cols[None, :, None] * sw
        mask = (a[:, None, None] < d1) & (b[None, None, :] < d2) & (cols[None, :, None] < width)
        return offs, mask

    @triton.jit
    def _fwd_kernel(x_ptr, x_stride_r, f_ptr, g_ptr, out_ptr, out_stride_r, scale, R, width, d1, d2, s1, s2, sw,
                    Q2: tl.constexpr, BA: tl.constexpr, BC: tl.constexpr, SUM: tl.constexpr,
                    DOT: tl.constexpr):  # fmt: skip
        """`out_ρ[e, block, :, cols] = scale · (F_ρ ⊗ G_ρ) X_ρ[e, :, :, cols]` for the block of `m1`
        `a0 + [0, BA)`: `W = F_ρ[block, :] ×₁ X_ρ` accumulated over `m1` chunks by 2-D dots, then
        `W ×₂ G_ρ`. `SUM`: the terms added in fp32 and stored once, else each term stored at its
        own offset. A stride 0 over the terms reads one `X` for every term."""
        e = tl.program_id(0)
        cols = tl.program_id(1) * BC + tl.arange(0, BC)
        a0 = tl.program_id(2) * BA
        size = d1 * d2 * width
        offs_out, mask_out = _tile(a0, cols, width, d1, d2, s1, s2, sw, BA, BC, Q2)
        acc = tl.zeros((BA * BC, Q2), dtype=tl.float32)
        for rho in range(R):
            w = tl.zeros((BA, BC * Q2), dtype=tl.float32)
            for k0 in range(0, d1, BA):
                offs, mask = _tile(k0, cols, width, d1, d2, s1, s2, sw, BA, BC, Q2)
                x = tl.load(x_ptr + rho * x_stride_r + e * size + offs, mask=mask, other=0.0).to(tl.float32)
                f_f = _load_block(f_ptr, rho, e, d1, a0, k0, BA, BA, False)
                w += tl.dot(f_f, tl.reshape(x, (BA, BC * Q2)), input_precision=DOT)
            g_t = _load_block(g_ptr, rho, e, d2, 0, 0, Q2, Q2, True)
            y = tl.dot(tl.reshape(w, (BA * BC, Q2)), g_t, input_precision=DOT)
            if SUM:
                acc += y
            else:
                out = tl.reshape(y * scale, (BA, BC, Q2))
                tl.store(out_ptr + rho * out_stride_r + e * size + offs_out, out, mask=mask_out)
        if SUM:
            tl.store(out_ptr + e * size + offs_out, tl.reshape(acc * scale, (BA, BC, Q2)), mask=mask_out)

    @triton.jit
    def _bwd_kernel(g_ptr, g_stride_r, x_ptr, x_stride_r, f_ptr, h_ptr, gf_ptr, gh_ptr, out_ptr,
                    out_stride_r, scale, R, width, d1, d2, s1, s2, sw,
                    Q2: tl.constexpr, BA: tl.constexpr, BC: tl.constexpr, SUM: tl.constexpr,
                    DOT: tl.constexpr):  # fmt: skip
        """Backward of `_fwd_kernel` for the block `a0 + [0, BA)` of the input's `m1`, with `Γ_ρ`
        the output's gradient (`g`) and `F_ρ`, `H_ρ` the factors (`f`, `h`): `Y = F_ρᵀ[block, :]
        ×₁ scale · Γ_ρ` (accumulated over `m1` chunks), `∂X_ρ = Y ×₂ H_ρᵀ` (summed over the terms
        where `SUM`), `∂H_ρ += Y X_ρᵀ` over the block, `∂F_ρ[:, block] += Γ_ρ (H_ρ ×₂ X_ρ)ᵀ` per
        chunk (contracted over every other mode); factor gradients added atomically over tiles."""
        e = tl.program_id(0)
        n = tl.num_programs(0)
        cols = tl.program_id(1) * BC + tl.arange(0, BC)
        a0 = tl.program_id(2) * BA
        size = d1 * d2 * width
        offs_x, mask_x = _tile(a0, cols, width, d1, d2, s1, s2, sw, BA, BC, Q2)
        ia = a0 + tl.arange(0, BA)
        ib = tl.arange(0, Q2)
        mask_h = (ib[:, None] < d2) & (ib[None, :] < d2)
        acc = tl.zeros((BA * BC, Q2), dtype=tl.float32)
        for rho in range(R):
            x = tl.load(x_ptr + rho * x_stride_r + e * size + offs_x, mask=mask_x, other=0.0).to(tl.float32)
            x = tl.reshape(x, (BA * BC, Q2))
            h_f = _load_block(h_ptr, rho, e, d2, 0, 0, Q2, Q2, False)
            h_t = _load_block(h_ptr, rho, e, d2, 0, 0, Q2, Q2, True)
            v = tl.reshape(tl.dot(x, h_t, input_precision=DOT), (BA, BC * Q2))  # H ×₂ X on the block
            y = tl.zeros((BA, BC * Q2), dtype=tl.float32)
            for k0 in range(0, d1, BA):
                offs, mask = _tile(k0, cols, width, d1, d2, s1, s2, sw, BA, BC, Q2)
                g = tl.load(g_ptr + rho * g_stride_r + e * size + offs, mask=mask, other=0.0).to(tl.float32)
                g = tl.reshape(g * scale, (BA, BC * Q2))
                f_t = _load_block(f_ptr, rho, e, d1, a0, k0, BA, BA, True)
                y += tl.dot(f_t, g, input_precision=DOT)
                grad_f = tl.dot(g, tl.trans(v), input_precision=DOT)  # rows k0 + [0, BA), columns the block
                ik = k0 + tl.arange(0, BA)
                ff = (rho * n + e) * d1 * d1 + ik[:, None] * d1 + ia[None, :]
                tl.atomic_add(gf_ptr + ff, grad_f, mask=(ik[:, None] < d1) & (ia[None, :] < d1))
            y = tl.reshape(y, (BA * BC, Q2))
            grad_h = tl.dot(tl.trans(y), x, input_precision=DOT)
            fh = (rho * n + e) * d2 * d2 + ib[:, None] * d2 + ib[None, :]
            tl.atomic_add(gh_ptr + fh, grad_h, mask=mask_h)
            dx = tl.dot(y, h_f, input_precision=DOT)
            if SUM:
                acc += dx
            else:
                tl.store(out_ptr + rho * out_stride_r + e * size + offs_x, tl.reshape(dx, (BA, BC, Q2)), mask=mask_x)
        if SUM:
            tl.store(out_ptr + e * size + offs_x, tl.reshape(acc, (BA, BC, Q2)), mask=mask_x)


# Largest register tile (entries) a kernel is launched with: every tile of a pass is `[BA, BC,
# m2]` (`BA` rows of mode `m1`, `BC` rows or columns of the matrix, `m2` padded) or a factor
# block (`[m2, m2]`, `[BA, BA]`). The bound also keeps the kernels' shared memory (the compiler
# stages dot operands and reshapes there) within an A100's or H100's: compiled for sm_80 at
# `m2 = 64`, the backward kernel takes 82 KiB with 4096-entry tiles and 322 KiB with 16384.
TILE_BUDGET = 4096
_TILE_ELEMS = TILE_BUDGET  # entries of one `[BA, BC, m2]` tile (tests lower it to force many tiles)


def _blocks(d1: int, d2: int) -> tuple[int, int, int]:
    """`(Q2, BA, BC)` of a pass over a `[d1, d2, width]` view: `m2` padded, and the tile's `m1`
    block (16 ≤ BA ≤ padded `m1`, as `tl.dot` wants) and width (1 ≤ BC ≤ 16), the largest whose
    tile stays within `_TILE_ELEMS` entries, the width first."""
    q2 = _pad(d2)
    bc = max(1, min(16, _TILE_ELEMS // (16 * q2)))
    return q2, max(16, min(_pad(d1), _TILE_ELEMS // (bc * q2))), bc


def fits(x: torch.Tensor, factors) -> bool:
    """Whether every register tile of the kernels for `x` `[n, *dims]` stays within `TILE_BUDGET`
    (and every offset within 32 bits)."""
    dims = [f.shape[-1] for f in factors]
    tiles = []
    for d1, d2 in zip(dims[::2], dims[1::2]):  # the column view, and the row view of a weight
        q2, ba, bc = _blocks(d1, d2)
        tiles += [ba * bc * q2, q2 * q2, ba * ba]
    # the kernels index `[r, n, O, I]` buffers with 32-bit offsets
    return max(tiles) <= TILE_BUDGET and factors[0].shape[0] * x.numel() < 2**31


def dot_precision(x: torch.Tensor) -> str:
    """`tl.dot`'s fp32 input precision: TF32 on CUDA where torch's matmuls allow it, else IEEE."""
    return "tf32" if x.is_cuda and torch.backends.cuda.matmul.allow_tf32 else "ieee"


def _launch(f: torch.Tensor, d1: int, d2: int, width: int, rows: bool) -> tuple[tuple, tuple, dict]:
    """Grid (expert, width tile, `m1` block), the terms and the view's sizes and strides, and the
    blocks, for the first factor `f` `[r, n, d1, d1]` of a pass: `rows`, the view `[i1, i2, O]` of
    `[n, O, I]` (`I = i1·i2`), else `[o1, o2, I]` (`O = o1·o2`)."""
    q2, ba, bc = _blocks(d1, d2)
    strides = (d2, 1, d1 * d2) if rows else (d2 * width, width, 1)
    warps = 8 if ba * bc * q2 > 2048 else 4  # untuned (no GPU has timed them yet)
    grid = (f.shape[1], triton.cdiv(width, bc), triton.cdiv(d1, ba))
    meta = {"Q2": q2, "BA": ba, "BC": bc, "DOT": dot_precision(f), "num_warps": warps}
    return grid, (f.shape[0], width, d1, d2, *strides), meta


def _forward_view(x, x_stride_r, f, g, out, out_stride_r, scale, d1, d2, width, *, rows: bool, total: bool):
    grid, view, meta = _launch(f, d1, d2, width, rows)
    _fwd_kernel[grid](x, x_stride_r, f, g, out, out_stride_r, scale, *view, SUM=total, **meta)


def _backward_view(grad, g_stride_r, x, x_stride_r, f, h, grad_f, grad_h, out, out_stride_r, scale, d1, d2, width,
                   *, rows: bool, total: bool):  # fmt: skip
    grid, view, meta = _launch(f, d1, d2, width, rows)
    _bwd_kernel[grid](
        grad, g_stride_r, x, x_stride_r, f, h, grad_f, grad_h, out, out_stride_r, scale, *view, SUM=total, **meta
    )  # fmt: skip


def _input_side(x: torch.Tensor, c: torch.Tensor, d: torch.Tensor) -> torch.Tensor:
    """`U_ρ = x (C_ρ ⊗ D_ρ)ᵀ`, `[r, n, O, I]` fp32, for `x` `[n, O, i1, i2]`: each term stored."""
    n, rows, i1, i2 = x.shape
    u = torch.empty((c.shape[0], n, rows, i1 * i2), device=x.device, dtype=torch.float32)
    _forward_view(x, 0, c, d, u, u[0].numel(), 1.0, i1, i2, rows, rows=True, total=False)
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


def _output_input(x: torch.Tensor, factors) -> tuple[torch.Tensor, int, int]:
    """The output side's input (`U`, or `τ` itself for a bias), its stride over the terms and
    its width (columns)."""
    n, d1, d2 = x.shape[:3]
    if len(factors) == 2:
        return x, 0, 1  # a bias: every term reads τ itself
    u = _input_side(x.reshape(n, d1 * d2, x.shape[3], x.shape[4]), factors[2], factors[3])
    return u, u[0].numel(), x.shape[3] * x.shape[4]


def _forward(x: torch.Tensor, factors, scale: float) -> torch.Tensor:
    d1, d2 = x.shape[1:3]
    u, stride_r, width = _output_input(x, factors)
    out = torch.empty(x.shape, device=x.device, dtype=torch.float32)
    _forward_view(u, stride_r, factors[0], factors[1], out, 0, scale, d1, d2, width, rows=False, total=True)
    return out


def _backward(grad: torch.Tensor, x: torch.Tensor, factors, scale: float):
    n, d1, d2 = x.shape[:3]
    r = factors[0].shape[0]
    grad_f = [torch.zeros(f.shape, device=f.device, dtype=torch.float32) for f in factors]
    u, stride_r, width = _output_input(x, factors)
    grad_x = torch.empty(x.shape, device=x.device, dtype=torch.float32)
    if len(factors) == 2:  # a bias: ∂τ = Σ_ρ H_ρ directly
        _backward_view(grad, 0, u, 0, factors[0], factors[1], grad_f[0], grad_f[1], grad_x, 0, scale, d1, d2,
                       width, rows=False, total=True)  # fmt: skip
        return grad_x, grad_f
    h = torch.empty((r, n, d1 * d2, width), device=x.device, dtype=torch.float32)
    _backward_view(grad, 0, u, stride_r, factors[0], factors[1], grad_f[0], grad_f[1], h, stride_r, scale, d1, d2,
                   width, rows=False, total=False)  # fmt: skip
    i1, i2 = x.shape[3:]
    _backward_view(h, stride_r, x, 0, factors[2], factors[3], grad_f[2], grad_f[3], grad_x, 0, 1.0, i1, i2,
                   d1 * d2, rows=True, total=True)  # fmt: skip
    return grad_x, grad_f


def kronecker_triton(x: torch.Tensor, factors, *, scale: float = 1.0) -> torch.Tensor:
    """The fused kernels behind an autograd function; `x` `[n, *dims]` with 2 or 4 modes."""
    if triton is None:
        raise RuntimeError("triton is not installed")
    if len(factors) not in (2, 4):
        raise ValueError(f"the fused curvature takes 2 or 4 modes, got {len(factors)}")
    return KroneckerTriton.apply(x, scale, *factors)
