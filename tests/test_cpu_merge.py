"""The compiled CPU merge and reductions of the merged linear (`camex/kernels/cpu_merge.c`) against
PyTorch's ops (`merge.CPU_KERNELS = False`): the kernels directly on odd shapes (column counts off the
32- and 8-wide vector blocks, odd unit and expert counts, every output optional, the expert gradient
written over the experts), then the whole merged linear, forward and every gradient."""

from __future__ import annotations

import pytest
import torch

from camex.kernels import cpu_merge
from camex.merging import merge, merged_linear

_WHY_NOT = cpu_merge.why_unavailable()
pytestmark = pytest.mark.skipif(
    _WHY_NOT is not None and not _WHY_NOT.startswith("build"), reason=f"CPU kernels: {_WHY_NOT}"
)


def _rand(*shape, seed):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed))


def test_the_merge_kernel_builds_here():
    assert _WHY_NOT is None, _WHY_NOT


# (units, experts, output rows in the tile, of rows in all, columns): the tile starts past row 0
SHAPES = [(16, 7, 5, 9, 768), (3, 1, 2, 4, 37), (5, 4, 3, 3, 8), (1, 9, 7, 11, 41), (2, 3, 40, 45, 300)]


@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
def test_the_merge_matches_pytorch(shape, threads):
    units, n, rows, total, width = shape
    deltas, base = _rand(n, total, width, seed=1), _rand(total, width, seed=2)
    a, c = _rand(units, n, seed=3), _rand(units, seed=4)
    r = slice(total - rows, total)
    out = torch.full((units, rows, width), float("nan"))
    cpu_merge.merge_into(base[r], deltas[:, r], a, c, out, threads=threads)
    want = c[:, None, None] * base[r] + torch.einsum("ui,irc->urc", a, deltas[:, r])
    torch.testing.assert_close(out, want, rtol=1e-5, atol=1e-5 * n)


@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize("outputs", ["all", "all-over-deltas", "deltas-only", "dots-without-base", "base-only"])
def test_the_reductions_match_pytorch(shape, outputs, threads):
    units, n, rows, total, width = shape
    deltas, base = _rand(n, total, width, seed=1), _rand(total, width, seed=2)
    grad, at, c = _rand(units, rows, width, seed=3), _rand(n, units, seed=4), _rand(units, seed=5)
    r = slice(total - rows, total)
    want_deltas = torch.einsum("iu,urc->irc", at, grad)
    want_base = torch.einsum("u,urc->rc", c, grad)
    want_dots = torch.cat(
        [torch.einsum("irc,urc->iu", deltas[:, r], grad), torch.einsum("rc,urc->u", base[r], grad)[None]]
    )
    start = _rand(n + 1, units, seed=6)  # the dot products accumulate
    with_base = outputs in ("all", "all-over-deltas")
    dots = None if outputs in ("deltas-only", "base-only") else start[: n + with_base].clone()
    grad_base = torch.full((total, width), float("nan")) if outputs in ("all", "all-over-deltas", "base-only") else None
    over = outputs == "all-over-deltas"
    grad_deltas = (
        None
        if outputs in ("dots-without-base", "base-only")
        else (deltas.clone() if over else torch.full_like(deltas, float("nan")))
    )
    source = grad_deltas if over else deltas  # the expert gradient written over the experts it reads
    cpu_merge.merge_grad(
        grad, source[:, r], at=at, c=c, base=base[r] if with_base else None,
        grad_base=None if grad_base is None else grad_base[r],
        grad_deltas=None if grad_deltas is None else grad_deltas[:, r], dots=dots, threads=threads,
    )  # fmt: skip
    tol = {"rtol": 1e-4, "atol": 1e-4 * (rows * width) ** 0.5}
    if grad_deltas is not None:
        torch.testing.assert_close(grad_deltas[:, r], want_deltas, **tol)
        torch.testing.assert_close(
            grad_deltas[:, : total - rows],
            deltas[:, : total - rows] if over else torch.full_like(deltas[:, : total - rows], float("nan")),
            equal_nan=True,
        )
    if grad_base is not None:
        torch.testing.assert_close(grad_base[r], want_base, **tol)
    if dots is not None:
        torch.testing.assert_close(dots, start[: n + with_base] + want_dots[: n + with_base], **tol)


@pytest.mark.parametrize("around", [False, True], ids=["deltas", "around-base"])
@pytest.mark.parametrize("bias", [False, True], ids=["no-bias", "bias"])
@pytest.mark.parametrize("reuse", [False, True], ids=["new-grad", "grad-over-deltas"])
@pytest.mark.parametrize("tile_bytes", [None, 4096], ids=["one-tile", "tiles"])
def test_the_merged_linear_matches_the_pytorch_path(around, bias, reuse, tile_bytes, threads, monkeypatch):
    """Forward, ∂x, ∂base, ∂experts, ∂scores and the biases' gradients, kernels against PyTorch's ops,
    with one tile and with several (`merge.CPU_BLOCK_BYTES`), where the weights are rebuilt in the
    backward pass (`CPU_KEEP_BYTES` 0) and where they are kept."""
    units, n, out_f, in_f = 5, 3, 24, 20
    if tile_bytes is not None:
        monkeypatch.setattr(merge, "CPU_BLOCK_BYTES", tile_bytes)
        monkeypatch.setattr(merge, "CPU_KEEP_BYTES", 0)
    x = _rand(units, 6, in_f, seed=1).requires_grad_()
    base, experts = _rand(out_f, in_f, seed=2).requires_grad_(), _rand(n, out_f, in_f, seed=3)
    scores = torch.softmax(_rand(units, n, seed=4), -1).requires_grad_()
    bias_pair = (
        (_rand(out_f, seed=5).requires_grad_(), _rand(n, out_f, seed=6).requires_grad_()) if bias else (None, None)
    )
    weight = _rand(units, 6, out_f, seed=7)

    def run():
        deltas = experts.clone().requires_grad_()  # a temporary where the gradient may overwrite it
        leaves = [x, base, deltas, scores] + ([*bias_pair] if bias else [])
        y = merged_linear(x, base, deltas * 1.0 if reuse else deltas, scores, 0.8, *bias_pair, around=around,
                          reuse_deltas=reuse)  # fmt: skip
        return (y.detach(), *torch.autograd.grad((y * weight).sum(), leaves))

    calls = []
    real_merge, real_grad = cpu_merge.merge_into, cpu_merge.merge_grad
    monkeypatch.setattr(
        cpu_merge, "merge_into", lambda *a, **k: calls.append(("merge", k["threads"])) or real_merge(*a, **k)
    )
    monkeypatch.setattr(
        cpu_merge, "merge_grad", lambda *a, **k: calls.append(("grad", k["threads"])) or real_grad(*a, **k)
    )
    got = run()
    assert {c[0] for c in calls} == {"merge", "grad"} and {c[1] for c in calls} == {threads}
    monkeypatch.setattr(merge, "CPU_KERNELS", False)
    want = run()
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5 * b.abs().max().item())


def test_a_flop_counter_and_other_dtypes_see_the_pytorch_path(monkeypatch):
    from torch.utils.flop_counter import FlopCounterMode

    calls = []
    monkeypatch.setattr(cpu_merge, "merge_into", lambda *a, **k: calls.append(1))
    monkeypatch.setattr(cpu_merge, "merge_grad", lambda *a, **k: calls.append(1))
    x, base, experts = _rand(2, 3, 8, seed=1), _rand(4, 8, seed=2), _rand(3, 4, 8, seed=3).requires_grad_()
    scores = torch.rand(2, 3)
    with FlopCounterMode(display=False):
        merged_linear(x, base, experts, scores, around=True).sum().backward()
    merged_linear(x.double(), base.double(), experts.double(), scores.double(), around=True).sum().backward()
    assert not calls
