"""The merge fused into the token GEMM's weight load, in Triton (SPEC §2; issue 20).

`y_u = x_u Ŵ_uᵀ (+ b̂_u)` with `Ŵ_u = c0_u · base + Σ_i c_ui D_i`: plain merging takes `D = τ`,
`c = α s`, `c0 = 1`; merging around the base (`D = E`, the experts) `c0 = 1 − α Σ_i s_ui`. A
program owns a `[tokens, out]` tile of one unit and, for every chunk of the inner dimension,
builds its `[out, chunk]` weight tile in registers from `base` and the `n` experts (fp32), casts
it to the tokens' dtype and multiplies: no `[units, O, I]` merged weight is written to memory.
fp32 accumulation; tokens in bf16/fp16/fp32, parameters in their own dtype.

Backward: `∂x_u = ∂y_u Ŵ_u` by the same kernel with the weight read transposed (strides
swapped), then `G_u = ∂y_uᵀ x_u` in fp32 (one batched matmul, PyTorch) and from it
`∂base = Σ_u c0_u G_u`, `∂D_i = Σ_u c_ui G_u`, `∂c0_u = ⟨G_u, base⟩`, `∂c_ui = ⟨G_u, D_i⟩`; the
coefficients' gradients reach the scores by autograd. Opt-in (`camex.merging.merge.FUSED_GEMM`,
CUDA only) until a GPU measurement shows where it pays (`scripts/gpu_check.sh` times both).
"""

from __future__ import annotations

import torch
from torch.autograd.function import once_differentiable

from camex.kernels.kronecker import dot_precision, triton

if triton is not None:
    import triton.language as tl

    @triton.jit
    def _merged_gemm_kernel(a_ptr, base_ptr, d_ptr, c0_ptr, c_ptr, out_ptr, T, J, K, n_exp, sj, sk,
                            BT: tl.constexpr, BJ: tl.constexpr, BK: tl.constexpr, DOT: tl.constexpr,
                            NATIVE: tl.constexpr):  # fmt: skip
        """`out[u, t, j] = Σ_k a[u, t, k] W_u[j, k]`, `W_u = c0_u base + Σ_e c_ue D_e` read at
        `j·sj + k·sk` (so `W_uᵀ` too), each `[BJ, BK]` weight tile merged in registers and rounded
        to `a`'s dtype. `NATIVE=False` (Triton's interpreter, whose bf16 `dot` is wrong) multiplies
        the rounded operands in fp32 instead: the same products, exact in fp32, and sums."""
        u = tl.program_id(0)
        t = tl.program_id(1) * BT + tl.arange(0, BT)
        j = tl.program_id(2) * BJ + tl.arange(0, BJ)
        c0 = tl.load(c0_ptr + u)
        size = J * K
        acc = tl.zeros((BT, BJ), dtype=tl.float32)
        for k0 in range(0, K, BK):
            k = k0 + tl.arange(0, BK)
            w_offs = j[:, None] * sj + k[None, :] * sk
            w_mask = (j[:, None] < J) & (k[None, :] < K)
            w = c0 * tl.load(base_ptr + w_offs, mask=w_mask, other=0.0).to(tl.float32)
            for e in range(n_exp):
                ce = tl.load(c_ptr + u * n_exp + e)
                w += ce * tl.load(d_ptr + e * size + w_offs, mask=w_mask, other=0.0).to(tl.float32)
            a_mask = (t[:, None] < T) & (k[None, :] < K)
            a = tl.load(a_ptr + u * T * K + t[:, None] * K + k[None, :], mask=a_mask, other=0.0)
            w = w.to(a.dtype)
            if NATIVE:
                acc += tl.dot(a, tl.trans(w), input_precision=DOT)
            else:
                acc += tl.dot(a.to(tl.float32), tl.trans(w.to(tl.float32)), input_precision=DOT)
        o_mask = (t[:, None] < T) & (j[None, :] < J)
        tl.store(out_ptr + u * T * J + t[:, None] * J + j[None, :], acc.to(out_ptr.dtype.element_ty), mask=o_mask)


# Tile sizes (untuned: no GPU has timed them yet). Tokens per tile at least 16, as `tl.dot` wants.
BLOCK_T, BLOCK_J, BLOCK_K = 32, 64, 32


def _gemm(a: torch.Tensor, base: torch.Tensor, deltas: torch.Tensor, c0: torch.Tensor, c: torch.Tensor,
          transposed: bool) -> torch.Tensor:  # fmt: skip
    """`a_u W_uᵀ` (`transposed=False`, `a` `[units, T, I]`) or `a_u W_u` (`a` `[units, T, O]`)."""
    units, tokens, inner = a.shape
    rows, cols = base.shape
    width, strides = (cols, (1, cols)) if transposed else (rows, (cols, 1))
    out = torch.empty((units, tokens, width), device=a.device, dtype=a.dtype)
    grid = (units, triton.cdiv(tokens, BLOCK_T), triton.cdiv(width, BLOCK_J))
    _merged_gemm_kernel[grid](
        a, base, deltas, c0, c, out, tokens, width, inner, deltas.shape[0], *strides,
        BT=BLOCK_T, BJ=BLOCK_J, BK=BLOCK_K, DOT=dot_precision(a), NATIVE=a.is_cuda,
    )  # fmt: skip
    return out


class _FusedMergedGemm(torch.autograd.Function):
    """`y_u = x_u (c0_u base + Σ_i c_ui D_i)ᵀ` by the fused kernel, fp32 coefficients."""

    @staticmethod
    def forward(ctx, x, base, deltas, c0, c):
        ctx.save_for_backward(x, base, deltas, c0, c)
        return _gemm(x, base, deltas, c0, c, transposed=False)

    @staticmethod
    @once_differentiable
    def backward(ctx, grad):
        x, base, deltas, c0, c = ctx.saved_tensors
        grad = grad.to(x.dtype).contiguous()
        grad_x = _gemm(grad, base, deltas, c0, c, transposed=True) if ctx.needs_input_grad[0] else None
        units, n = c.shape
        g = torch.bmm(grad.transpose(1, 2).float(), x.float()).view(units, -1)  # ∂Ŵ_u, fp32
        flat_base, flat_d = base.reshape(-1).float(), deltas.reshape(n, -1).float()
        grad_base = (c0 @ g).view(base.shape).to(base.dtype)
        grad_d = (c.t() @ g).view(deltas.shape).to(deltas.dtype)
        return grad_x, grad_base, grad_d, g @ flat_base, g @ flat_d.t()


def available() -> bool:
    return triton is not None


def usable(x: torch.Tensor, base: torch.Tensor, deltas: torch.Tensor) -> bool:
    """Whether the fused kernel takes these operands: CUDA tensors, Triton installed, `x` 3-D,
    every offset within 32 bits."""
    if not (available() and x.is_cuda and base.is_cuda and deltas.is_cuda and x.dim() == 3 and base.dim() == 2):
        return False
    return max(x.numel(), deltas.numel(), x.shape[0] * x.shape[1] * base.shape[0]) < 2**31


def merged_linear_triton(
    x: torch.Tensor,
    base: torch.Tensor,
    deltas: torch.Tensor,
    scores: torch.Tensor,
    alpha: float = 1.0,
    base_bias: torch.Tensor | None = None,
    delta_bias: torch.Tensor | None = None,
    *,
    around: bool = False,
) -> torch.Tensor:
    """`y_u = x_u Ŵ_uᵀ (+ b̂_u)` as `camex.merging.merge.merged_linear` computes it (`around`:
    `deltas` are the experts and the merge is taken around `base`; the bias deltas are always
    differences), the weight merged inside the token GEMM. Output in `x`'s dtype."""
    if triton is None:
        raise RuntimeError("triton is not installed")
    units, n = scores.shape
    if x.dim() != 3 or x.shape[0] != units or x.shape[2] != base.shape[1] or deltas.shape != (n, *base.shape):
        raise ValueError(
            f"merged GEMM: x {tuple(x.shape)}, base {tuple(base.shape)}, deltas {tuple(deltas.shape)}, "
            f"scores {tuple(scores.shape)}: want [units, T, I], [O, I], [n, O, I], [units, n]"
        )
    coeffs = alpha * scores.float()
    c0 = 1.0 - coeffs.sum(1) if around else torch.ones(units, device=coeffs.device)
    y = _FusedMergedGemm.apply(x.contiguous(), base.contiguous(), deltas.contiguous(), c0, coeffs.contiguous())
    if base_bias is None:
        return y
    bias = torch.addmm(base_bias.unsqueeze(0), scores.to(delta_bias.dtype), delta_bias, alpha=alpha)
    return y + bias.to(y.dtype).unsqueeze(1)
