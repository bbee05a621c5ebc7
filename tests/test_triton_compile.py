"""The Triton kernels compile ahead of time for NVIDIA GPUs without one (Triton's own ptxas), at
the block sizes the launchers pick for the paper's 768 ↔ 3072 FFN shapes, and the shared memory
each needs (the compiler stages dot operands and reshapes there) fits one block's limit: A100
(sm_80) 163 KiB, H100/H200 (sm_90) 227 KiB. The interpreter checks values, not this: a kernel
over the limit compiles and then fails at launch ("out of resources")."""

from __future__ import annotations

import pytest

triton = pytest.importorskip("triton")

from triton.backends.compiler import GPUTarget  # noqa: E402
from triton.compiler import ASTSource, compile  # noqa: E402

SHARED_LIMIT = {80: 163 * 1024, 90: 227 * 1024}
PAPER = [(3072, 768), (768, 3072)]


def _compile(fn, constexprs: dict, warps: int, cc: int, ptr: str = "*fp32"):
    """Compile `fn` for `sm_<cc>`; pointers `ptr` (`*_ptr` arguments), `scale` fp32, the rest i32."""
    names = [p.name for p in fn.params if not p.is_constexpr]
    signature = {n: ptr if n.endswith("_ptr") else "fp32" if n == "scale" else "i32" for n in names}
    source = ASTSource(fn=fn, signature=signature, constexprs=constexprs)
    return compile(source, target=GPUTarget("cuda", cc, 32), options={"num_warps": warps})


def _curvature_configs(shapes) -> set[tuple]:
    """(kernel name, Q2, BA, BC, SUM, warps) of every launch of the fused curvature for weights and
    biases of these (out, in) shapes, as `camex.kernels.kronecker` plans them."""
    import torch

    from camex.kernels import kronecker
    from camex.merging.curvature import nearest_factors

    configs = set()
    for out, inp in shapes:
        (o1, o2), (i1, i2) = nearest_factors(out), nearest_factors(inp)
        launches = [  # (m1, m2, width, rows, SUM of the forward, SUM of the backward)
            (o1, o2, inp, False, True, False),  # weight, output side
            (i1, i2, out, True, False, True),  # weight, input side
            (o1, o2, 1, False, True, True),  # bias
        ]
        for d1, d2, width, rows, fwd_sum, bwd_sum in launches:
            _, _, meta = kronecker._launch(torch.zeros(1, 2, d1, d1), d1, d2, width, rows)
            block = (meta["Q2"], meta["BA"], meta["BC"])
            configs |= {("_fwd_kernel", *block, fwd_sum, meta["num_warps"])}
            configs |= {("_bwd_kernel", *block, bwd_sum, meta["num_warps"])}
    return configs


def _check_curvature(configs, cc: int) -> None:
    from camex.kernels import kronecker

    for name, q2, ba, bc, total, warps in sorted(configs):
        consts = {"Q2": q2, "BA": ba, "BC": bc, "SUM": total, "DOT": "ieee"}
        shared = _compile(getattr(kronecker, name), consts, warps, cc).metadata.shared
        assert shared <= SHARED_LIMIT[cc], (name, consts, cc, shared)


def _check_merged_gemm(cc: int) -> None:
    from camex.kernels import merged_gemm as mg

    for ptr in ("*bf16", "*fp32"):
        consts = {"BT": mg.BLOCK_T, "BJ": mg.BLOCK_J, "BK": mg.BLOCK_K, "DOT": "ieee", "NATIVE": True}
        shared = _compile(mg._merged_gemm_kernel, consts, 4, cc, ptr=ptr).metadata.shared
        assert shared <= SHARED_LIMIT[cc], (ptr, cc, shared)


def test_the_largest_paper_shape_kernels_compile_for_an_a100_within_its_shared_memory():
    """The backward kernel at o2 = 64 (3072 = 48·64): the most shared memory of any launch
    (82 KiB; 322 KiB with the 16384-entry tiles used before) and the merged GEMM, in bf16."""
    configs = {c for c in _curvature_configs(PAPER[:1]) if c[0] == "_bwd_kernel" and c[1] == 64}
    assert configs
    _check_curvature(configs, 80)
    _check_merged_gemm(80)


@pytest.mark.slow
@pytest.mark.parametrize("cc", [80, 90])
def test_every_paper_shape_kernel_compiles_within_shared_memory(cc):
    _check_curvature(_curvature_configs(PAPER), cc)
    _check_merged_gemm(cc)
