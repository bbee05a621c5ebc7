"""The merge fused into the token GEMM's weight load (`camex.kernels.merged_gemm`) pinned to the
PyTorch merged linear: forward and every gradient (tokens, base, experts or deltas, scores, bias
pair), plain and around-the-base merging, odd shapes over several token, output and inner tiles,
fp32 and bf16/fp16 tokens; and `merged_linear` selecting it only when switched on, on CUDA.

Triton's interpreter (`TRITON_INTERPRET=1`, read when triton is imported) runs the kernel on the
CPU, so the checks run in a fresh interpreter process; on CUDA the compiled kernel is checked
against the same reference (`gpu`-marked)."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]

CHECK = textwrap.dedent(
    """
    import torch
    from camex.kernels import merged_gemm as mg
    from camex.merging import merge

    TOL = {torch.float32: (1e-4, 1e-4), torch.bfloat16: (2e-2, 5e-2), torch.float16: (2e-3, 5e-3)}

    def operands(dtype, bias, around, device, seed=0):
        g = torch.Generator().manual_seed(seed)
        units, tokens, out, inner, n = 2, 21, 45, 37, 3
        x = torch.randn(units, tokens, inner, generator=g).to(device, dtype).requires_grad_()
        base = torch.randn(out, inner, generator=g).to(device).requires_grad_()
        deltas = torch.randn(n, out, inner, generator=g).to(device).requires_grad_()
        scores = torch.rand(units, n, generator=g).to(device).requires_grad_()
        pair = [torch.randn(out, generator=g), torch.randn(n, out, generator=g)] if bias else []
        pair = [t.to(device).requires_grad_() for t in pair]
        w = torch.randn(units, tokens, out, generator=g).to(device, dtype)
        return [x, base, deltas, scores, *pair], w

    def check(dtype, bias, around, device, fused):
        # `fused(x, base, deltas, scores, alpha, base_bias, delta_bias, around)` against the
        # plain PyTorch formulation with the same (possibly low-precision) tokens
        ins, w = operands(dtype, bias, around, device)
        pair = ins[4:] if bias else [None, None]
        dbias = pair[1] if pair[1] is None or not around else merge.domain_vectors(pair[1], pair[0])
        got = fused(*ins[:4], 0.7, pair[0], dbias, around)
        want = merge._plain(*ins[:4], 0.7, pair[0], dbias, around)
        assert got.dtype == want.dtype == dtype, (got.dtype, want.dtype)
        g_got = torch.autograd.grad((got * w).float().sum(), ins)
        g_want = torch.autograd.grad((want * w).float().sum(), ins)
        names = ["out", "x", "base", "deltas", "scores", "base_bias", "delta_bias"]
        rtol, atol = TOL[dtype]
        for name, a, b in zip(names, (got, *g_got), (want, *g_want)):
            assert a.dtype == b.dtype, (name, a.dtype, b.dtype)
            scale = max(1.0, b.abs().max().item())
            torch.testing.assert_close(a.float(), b.float(), rtol=rtol, atol=atol * scale,
                                       msg=lambda m: f"{dtype} bias={bias} around={around} {name}: {m}")

    def kernel(x, base, deltas, scores, alpha, base_bias, delta_bias, around):
        return mg.merged_linear_triton(x, base, deltas, scores, alpha, base_bias, delta_bias, around=around)

    def run(device):
        blocks = mg.BLOCK_T, mg.BLOCK_J, mg.BLOCK_K
        mg.BLOCK_T, mg.BLOCK_J, mg.BLOCK_K = 16, 16, 16  # 2 token, 3 output and 3 inner tiles, masked
        try:
            for bias in (False, True):
                for around in (False, True):
                    check(torch.float32, bias, around, device, kernel)
            check(torch.bfloat16, True, True, device, kernel)
            check(torch.float16, False, False, device, kernel)
        finally:  # the gpu-marked test runs this in the test process
            mg.BLOCK_T, mg.BLOCK_J, mg.BLOCK_K = blocks
    """
)

# `merged_linear` itself with the switch on (the kernel's operand test bypassed: no CUDA here),
# fp32 and under bf16 autocast, against the same call with the switch off
SWITCH = textwrap.dedent(
    """
    mg.usable = lambda *operands: True
    calls, kernel_path = [], mg.merged_linear_triton
    mg.merged_linear_triton = lambda *args, **kw: calls.append(kw) or kernel_path(*args, **kw)
    for autocast in (False, True):
        ins, w = operands(torch.float32, True, True, 'cpu', seed=1)
        outs = []
        for on in (True, False):
            merge.FUSED_GEMM = on
            with torch.autocast('cpu', dtype=torch.bfloat16, enabled=autocast):
                y = merge.merged_linear(*ins[:4], 0.7, *ins[4:], around=True)
            outs.append((y, *torch.autograd.grad((y.float() * w).sum(), ins)))
        # ∂scores sums O·I products with cancellation: bf16 tokens leave both paths ~0.3 % of the
        # largest entry off an fp64 reference, so the tolerance is relative to that entry
        rtol, atol = (2e-2, 1e-2) if autocast else (1e-4, 1e-5)
        for a, b in zip(*outs):
            assert a.dtype == b.dtype
            scale = max(1.0, b.abs().max().item())
            torch.testing.assert_close(a.float(), b.float(), rtol=rtol, atol=atol * scale)
    assert calls == [{"around": True}] * 2, calls  # the kernel ran when switched on, only then
    """
)


def _interpret(code: str) -> None:
    env = {**os.environ, "TRITON_INTERPRET": "1", "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([sys.executable, "-c", CHECK + code + "\nprint('ok')\n"], env=env,
                          capture_output=True, text=True, timeout=300)  # fmt: skip
    assert proc.returncode == 0 and proc.stdout.strip() == "ok", proc.stderr[-3000:]


def test_fused_merge_gemm_matches_pytorch_under_the_triton_interpreter():
    pytest.importorskip("triton")
    _interpret("\nrun('cpu')")


def test_merged_linear_takes_the_fused_gemm_only_when_switched_on_under_the_interpreter():
    pytest.importorskip("triton")
    _interpret(SWITCH)


def test_fused_merge_gemm_is_off_by_default_and_cuda_only():
    from camex.kernels import merged_gemm
    from camex.merging import merge

    assert merge.FUSED_GEMM is False
    x, base, deltas = torch.zeros(2, 3, 5), torch.zeros(4, 5), torch.zeros(3, 4, 5)
    assert not merged_gemm.usable(x, base, deltas)
    if torch.cuda.is_available():
        assert merged_gemm.usable(x.cuda(), base.cuda(), deltas.cuda()) == merged_gemm.available()
    if merged_gemm.available():  # operands that do not fit together are refused before any launch
        with pytest.raises(ValueError, match=r"merged GEMM: x \(2, 3, 5\), base \(4, 6\)"):
            merged_gemm.merged_linear_triton(x, torch.zeros(4, 6), torch.zeros(3, 4, 6), torch.zeros(2, 3))


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_fused_merge_gemm_matches_pytorch_on_cuda():
    pytest.importorskip("triton")
    torch.backends.cuda.matmul.allow_tf32 = False
    scope: dict = {}
    exec(CHECK, scope)
    scope["run"]("cuda")
