"""The fused Triton curvature kernels pinned to the PyTorch passes: forward, `∂τ` and every
factor gradient, r ∈ {1, 3}, odd (padded, masked) mode sizes, several row and column tiles and
several `o1` blocks of a column tile (as the paper's 768 ↔ 3072 FFN shapes need).

Triton's interpreter (`TRITON_INTERPRET=1`, read when triton is imported) runs the kernels on the
CPU, so the check runs in a fresh interpreter process; on CUDA the compiled kernels are checked
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
    import math
    import torch
    from camex.kernels import kronecker as k
    from camex.merging.curvature import _KroneckerSum

    def check(r, dims, n, device):
        g = torch.Generator().manual_seed(r * 10 + len(dims))
        x = torch.randn(n, *dims, generator=g).to(device).requires_grad_()
        # factor noise shrinks with d beyond 8 so that outputs stay O(1) at FFN-like sizes
        noise = [0.3 / math.sqrt(max(d, 8) / 8) * torch.randn(r, n, d, d, generator=g) for d in dims]
        fs = [(torch.eye(d) + z).to(device).requires_grad_() for d, z in zip(dims, noise)]
        got = k.kronecker_triton(x, fs, scale=0.7)
        want = _KroneckerSum.apply(x, None, 0.7, False, *fs)
        w = torch.randn(want.shape, generator=g).to(device)
        g_got = torch.autograd.grad((got * w).sum(), [x, *fs])
        g_want = torch.autograd.grad((want * w).sum(), [x, *fs])
        names = ["out", "tau"] + [f"factor{i}" for i in range(len(dims))]
        for name, a, b in zip(names, (got, *g_got), (want, *g_want)):
            # factor gradients sum over O·I products: the tolerance grows with their magnitude
            atol = 1e-5 * max(10.0, b.abs().max().item())
            torch.testing.assert_close(a, b, rtol=1e-4, atol=atol, msg=lambda m: f"{r} {dims} {name}: {m}")

    def run(device, shapes, padded=()):
        for r in (1, 3):
            for dims, n in shapes:
                check(r, dims, n, device)
        for dims, n in padded:
            check(1, dims, n, device)
        # o1 = 20 in two blocks of 16 (the second masked), contracted in two chunks, r = 3
        check(3, (20, 5, 3, 7), 1, device)
        check(1, (20, 5), 2, device)
        tile, k._TILE_ELEMS = k._TILE_ELEMS, 512  # tiles of two rows or columns: factor gradients
        try:  # added over 8-11 tiles
            check(2, (3, 5, 3, 7), 1, device)
        finally:  # the gpu-marked test runs this in the test process
            k._TILE_ELEMS = tile
    """
)
# a weight with odd modes over two column tiles (I = 21), a bias, unit modes
SMALL = "[((3, 5, 3, 7), 3), ((3, 5), 2), ((1, 5, 2, 1), 2)]"
# the paper's padding pattern scaled down, r = 1: o2 = 33 (i2 = 33) pads to 64 as 3072 = 48·64
# does, o1 (i1) = 20 takes two blocks of 16 (in both orientations: 660 ↔ 15)
PADDED = "[((20, 33, 3, 5), 1), ((3, 5, 20, 33), 1)]"
# the paper's FFN factorisations themselves (768 = 24·32, 3072 = 48·64), one expert, r = 1
PAPER = "[((48, 64, 24, 32), 1), ((24, 32, 48, 64), 1)]"


def _interpret(code: str, timeout: int) -> None:
    env = {**os.environ, "TRITON_INTERPRET": "1", "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([sys.executable, "-c", CHECK + code + "\nprint('ok')\n"], env=env,
                          capture_output=True, text=True, timeout=timeout)  # fmt: skip
    assert proc.returncode == 0 and proc.stdout.strip() == "ok", proc.stderr[-3000:]


def test_fused_curvature_matches_pytorch_under_the_triton_interpreter():
    pytest.importorskip("triton")
    _interpret(f"\nrun('cpu', {SMALL}, {PADDED})", timeout=300)


@pytest.mark.slow
def test_fused_curvature_matches_pytorch_at_the_paper_ffn_shapes_under_the_interpreter():
    """3072 × 768 and 768 × 3072 (about 2.5 minutes each under the interpreter, 1 thread)."""
    pytest.importorskip("triton")
    _interpret(f"\nfor dims, n in {PAPER}:\n    check(1, dims, n, 'cpu')", timeout=900)


@pytest.mark.parametrize("rank", [1, 3, 8])
@pytest.mark.parametrize("shape", [(3072, 768), (768, 3072)])
def test_fused_kernel_tiles_fit_the_paper_ffn_shapes(shape, rank):
    """The 768 ↔ 3072 FFN weights and their biases take the fused kernels (`nearest_factors`:
    48·64 and 24·32); a mode padded to 128 still does not."""
    pytest.importorskip("triton")
    from camex.kernels import kronecker
    from camex.merging.curvature import nearest_factors

    out, inp = shape
    dims = (*nearest_factors(out), *nearest_factors(inp))
    factors = [torch.zeros(rank, 2, d, d) for d in dims]
    assert kronecker.fits(torch.zeros(2, out, inp), factors)
    assert kronecker.fits(torch.zeros(2, out), factors[:2])
    wide = [torch.zeros(rank, 2, d, d) for d in (24, 100)]  # o2 = 100 pads to 128
    assert not kronecker.fits(torch.zeros(2, 2400), wide)
    many = torch.zeros(()).expand(2**31 // (out * inp * rank) + 1, out, inp)  # offsets beyond 32 bits
    assert not kronecker.fits(many, [f[:, :1].expand(rank, many.shape[0], -1, -1) for f in factors])


def test_fused_kernel_is_chosen_on_cuda_only_where_its_tiles_fit(monkeypatch):
    pytest.importorskip("triton")
    from camex.kernels import kronecker
    from camex.merging import curvature

    small = [torch.zeros(1, 2, d, d) for d in (3, 5, 3, 7)]
    assert kronecker.fits(torch.zeros(2, 15, 21), small)

    x = torch.zeros(2, 3, 5)
    factors = [torch.zeros(1, 2, 3, 3), torch.zeros(1, 2, 5, 5)]
    assert not curvature.fused_kernel(x, factors)
    if torch.cuda.is_available():
        cuda = [t.cuda() for t in (x, *factors)]
        assert curvature.fused_kernel(cuda[0], cuda[1:]) == curvature.kernels.available()
        monkeypatch.setattr(curvature, "FUSED", False)
        assert not curvature.fused_kernel(cuda[0], cuda[1:])


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_fused_curvature_matches_pytorch_on_cuda():
    """Compiled kernels: small odd shapes, a 512 × 1024 layer, and the paper's 768 ↔ 3072 FFN
    weights and biases (r ∈ {1, 3})."""
    torch.backends.cuda.matmul.allow_tf32 = False
    scope: dict = {}
    exec(CHECK, scope)
    paper = [((48, 64, 24, 32), 4), ((24, 32, 48, 64), 4), ((48, 64), 4), ((24, 32), 4)]
    scope["run"]("cuda", eval(SMALL) + [((16, 32, 32, 32), 7), ((16, 32), 7)] + paper, eval(PADDED))
