"""The fused Triton curvature kernels pinned to the PyTorch passes: forward, `∂τ` and every
factor gradient, r ∈ {1, 3}, odd (padded, masked) mode sizes, several row and column tiles.

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
    import torch
    from camex.kernels import kronecker as k
    from camex.merging.curvature import _KroneckerSum

    def check(r, dims, n, device):
        g = torch.Generator().manual_seed(r * 10 + len(dims))
        x = torch.randn(n, *dims, generator=g).to(device).requires_grad_()
        fs = [(torch.eye(d) + 0.3 * torch.randn(r, n, d, d, generator=g)).to(device).requires_grad_() for d in dims]
        got = k.kronecker_triton(x, fs, scale=0.7)
        want = _KroneckerSum.apply(x, None, 0.7, False, *fs)
        w = torch.randn(want.shape, generator=g).to(device)
        g_got = torch.autograd.grad((got * w).sum(), [x, *fs])
        g_want = torch.autograd.grad((want * w).sum(), [x, *fs])
        names = ["out", "tau"] + [f"factor{i}" for i in range(len(dims))]
        for name, a, b in zip(names, (got, *g_got), (want, *g_want)):
            torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4, msg=lambda m: f"{r} {dims} {name}: {m}")

    def run(device, shapes):
        for r in (1, 3):
            for dims, n in shapes:
                check(r, dims, n, device)
        k._ROW_ELEMS = 512  # tiles of two rows: row-side factor gradients added over eight tiles
        check(3, (3, 5, 3, 7), 2, device)
    """
)
# a weight with odd modes over two column tiles (I = 21), a bias, unit modes
SMALL = "[((3, 5, 3, 7), 3), ((3, 5), 2), ((1, 5, 2, 1), 2)]"


def test_fused_curvature_matches_pytorch_under_the_triton_interpreter():
    pytest.importorskip("triton")
    code = CHECK + f"\nrun('cpu', {SMALL})\nprint('ok')\n"
    env = {**os.environ, "TRITON_INTERPRET": "1", "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0 and proc.stdout.strip() == "ok", proc.stderr[-3000:]


def test_fused_kernel_is_chosen_on_cuda_only_where_its_tiles_fit(monkeypatch):
    pytest.importorskip("triton")
    from camex.kernels import kronecker
    from camex.merging import curvature

    small = [torch.zeros(1, 2, d, d) for d in (3, 5, 3, 7)]
    t5 = [torch.zeros(1, 2, d, d) for d in (48, 64, 24, 32)]  # 3072 x 768: o2 = 64 does not fit yet
    assert kronecker.fits(torch.zeros(2, 15, 21), small)
    assert not kronecker.fits(torch.zeros(2, 3072, 768), t5)

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
    """Compiled kernels, small odd shapes and the largest FFN-like shape whose tiles fit
    (512 × 1024 = 16·32 × 32·32)."""
    torch.backends.cuda.matmul.allow_tf32 = False
    scope: dict = {}
    exec(CHECK, scope)
    scope["run"]("cuda", eval(SMALL) + [((16, 32, 32, 32), 7), ((16, 32), 7)])
