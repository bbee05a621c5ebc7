"""The compiled CPU mode products and contractions (`camex/kernels/cpu_kron.c`) against PyTorch's GEMMs.

Each comparison runs the same fp32 operands through the kernel and through `_mode_into`'s (or
`_contract_into`'s) PyTorch branch (`curvature.CPU_KERNELS = False`), on shapes that exercise every edge of the
kernel: rows not a multiple of its 6-row tile, columns not a multiple of 16 or 8, the last mode
(one column per row), transposed factors, accumulation and scaling, contraction chunks with
edges past the 8 x 8 transpose blocks.
"""

from __future__ import annotations

import functools
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from camex.kernels import cpu_kron
from camex.merging import curvature, kronecker_apply

# skipped only where the machine cannot build them; a build that fails here fails the tests
_WHY_NOT = cpu_kron.why_unavailable()
pytestmark = pytest.mark.skipif(
    _WHY_NOT is not None and not _WHY_NOT.startswith("build"), reason=f"CPU kernels: {_WHY_NOT}"
)


def test_the_kernels_build_here(tmp_path):
    """Built from the source into an empty cache (not only found in this machine's cache)."""
    assert _WHY_NOT is None, _WHY_NOT
    code = "from camex.kernels import cpu_kron; print(cpu_kron.why_unavailable())"
    env = {**os.environ, "XDG_CACHE_HOME": str(tmp_path)}
    done = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0 and done.stdout.strip() == "None", done.stderr
    assert [p.name for p in tmp_path.rglob("*") if p.is_file()] == [f"cpu_kron_{cpu_kron.LIBRARY.tag()}.so"]


@pytest.fixture
def one_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def _rand(*shape, seed):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed))


def _torch_path(monkeypatch, fn):
    monkeypatch.setattr(curvature, "CPU_KERNELS", False)
    try:
        return fn()
    finally:
        monkeypatch.setattr(curvature, "CPU_KERNELS", None)


# (40, 23, 29): the first mode's packed panels with a partial one (667 columns), the last mode's
# contraction over rows not a multiple of its step; (70, 9, 61): a first mode too large to pack;
# (7, 650, 9): the last mode's contraction over more rows than one work item takes; (32, 48, 16, 24):
# MiniLM-L6's FFN, 4-row tiles where 6 would compute dropped rows (16, 32) and 24-column tiles;
# (10, 22, 88), (7, 24): a 24-column last panel after a full one, 24-column tiles on 3 and 4 rows
SHAPES = [(5, 7, 9, 3), (6, 16, 8, 17), (1, 13, 1, 40), (3, 5, 2, 1), (12, 20), (24, 32), (48, 64, 24, 32),
          (40, 23, 29), (70, 9, 61), (7, 650, 9), (32, 48, 16, 24), (10, 22, 88), (7, 24)]  # fmt: skip


@pytest.mark.parametrize("dims", SHAPES, ids=lambda d: "x".join(map(str, d)))
@pytest.mark.parametrize("transposed", [False, True], ids=["f", "fT"])
def test_every_mode_product_matches_the_pytorch_path(dims, transposed, threads, monkeypatch):
    n = 3 if len(dims) == 2 or dims[0] < 48 else 2
    x = _rand(n, *dims, seed=1)
    calls = []
    monkeypatch.setattr(cpu_kron, "mode_into", lambda *a, **k: calls.append(1) or _real(*a, **k))
    for k, d in enumerate(dims):
        f = _rand(n, d, d, seed=2 + k)
        f = f.transpose(1, 2) if transposed else f
        outer = k in (0, len(dims) - 1)
        for alpha, accumulate in [(1.0, False)] + ([(-0.7, True), (2.5, False)] if outer else []):
            start = _rand(n, *dims, seed=9)
            product = functools.partial(curvature._mode_into, x, f, k, alpha=alpha, accumulate=accumulate)
            got = product(start.clone())
            want = _torch_path(monkeypatch, lambda product=product, start=start: product(start.clone()))
            torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5 * d)
    assert len(calls) == sum(3 if k in (0, len(dims) - 1) else 1 for k in range(len(dims)))


_real = cpu_kron.mode_into


@pytest.mark.parametrize("dims", SHAPES, ids=lambda d: "x".join(map(str, d)))
def test_every_factor_gradient_matches_the_pytorch_path(dims, threads, monkeypatch):
    """Contractions over every mode but one, the last mode's (only size-1 modes after it) included."""
    n = 3 if len(dims) == 2 or dims[0] < 48 else 2
    g, h = _rand(n, *dims, seed=1), _rand(n, *dims, seed=2)
    calls = []
    monkeypatch.setattr(cpu_kron, "contract_into", lambda *a, **k: calls.append(1) or _real_contract(*a, **k))
    for k, d in enumerate(dims):
        got = torch.full((n, d, d), float("nan"))
        curvature._contract_into(g, h, k, got, alpha=-0.6)
        want = torch.empty(n, d, d)
        _torch_path(monkeypatch, lambda k=k, want=want: curvature._contract_into(g, h, k, want, alpha=-0.6))
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5 * g[0].numel() ** 0.5)
    assert len(calls) == len(dims)


_real_contract = cpu_kron.contract_into


@pytest.mark.parametrize("rank", [1, 3])
@pytest.mark.parametrize(
    "dims", [(5, 7, 9, 3), (48, 64, 24, 32), (32, 48, 16, 24), (6, 10)], ids=["odd", "t5-ffn", "minilm-ffn", "bias"]
)
@pytest.mark.parametrize("with_base", [False, True], ids=["tau", "around-base"])
def test_kronecker_sum_forward_and_grads_match_the_pytorch_path(rank, dims, with_base, threads, monkeypatch):
    """The whole curvature pass (forward, ∂τ, ∂base, every factor's gradient) on the kernel."""
    n = 2 if dims[0] == 48 else 3
    shape = (n, dims[0] * dims[1]) if len(dims) == 2 else (n, dims[0] * dims[1], dims[2] * dims[3])
    base = _rand(*shape[1:], seed=11).requires_grad_() if with_base else None
    tau = _rand(*shape, seed=1).requires_grad_()
    factors = [(torch.eye(d) + 0.3 * _rand(rank, n, d, d, seed=2 + k)).requires_grad_() for k, d in enumerate(dims)]
    weight = _rand(*shape, seed=9)
    leaves = [tau, *factors] + ([base] if with_base else [])

    def run():
        out = kronecker_apply(tau, factors, scale=0.7, base=base)
        return (out.detach(), *torch.autograd.grad((out * weight).sum(), leaves))

    calls = []
    monkeypatch.setattr(cpu_kron, "mode_into", lambda *a, **k: calls.append(("mode", k["threads"])) or _real(*a, **k))
    monkeypatch.setattr(
        cpu_kron, "contract_into", lambda *a, **k: calls.append(("contract", k["threads"])) or _real_contract(*a, **k)
    )
    got = run()
    assert set(calls) == {("mode", threads), ("contract", threads)}, "the kernels did not run on every thread"
    want = _torch_path(monkeypatch, run)
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4 * b.abs().max().item())


def test_other_dtypes_keep_the_pytorch_path(one_thread, monkeypatch):
    calls = []
    monkeypatch.setattr(cpu_kron, "mode_into", lambda *a, **k: calls.append(1) or _real(*a, **k))
    monkeypatch.setattr(cpu_kron, "contract_into", lambda *a, **k: calls.append(1) or _real_contract(*a, **k))
    tau = _rand(2, 6, 6, seed=1).double().requires_grad_()
    factors = [torch.eye(d, dtype=torch.float64).expand(1, 2, d, d).clone().requires_grad_() for d in (2, 3, 3, 2)]
    kronecker_apply(tau, factors).sum().backward()
    assert not calls


def test_a_flop_counter_sees_the_pytorch_path(one_thread, monkeypatch):
    """Under a dispatch mode (FlopCounterMode: training logs FLOPs per token with it) the kernels
    step aside, so the counter sees every product; outside it they run."""
    from torch.utils.flop_counter import FlopCounterMode

    calls = []
    monkeypatch.setattr(cpu_kron, "mode_into", lambda *a, **k: calls.append(1) or _real(*a, **k))
    tau = _rand(2, 12, 6, seed=1).requires_grad_()
    factors = [torch.eye(d).expand(1, 2, d, d).clone().requires_grad_() for d in (3, 4, 2, 3)]
    with FlopCounterMode(display=False) as counter:
        kronecker_apply(tau, factors).sum().backward()
    assert not calls
    # each pass costs 2·numel·d: forward, the mode sizes 3+4+2+3 = 12; backward, the three recomputed
    # partials (modes 3, 2, 1: 3+2+4), four contractions (12) and four transposed products (12)
    assert counter.get_total_flops() == 2 * tau.numel() * (12 + 9 + 12 + 12)
    # the last mode larger than the first: it goes last, and modes 0, 1, 2 (2+4+3) are recomputed
    tau = _rand(2, 8, 15, seed=1).requires_grad_()
    factors = [torch.eye(d).expand(1, 2, d, d).clone().requires_grad_() for d in (2, 4, 3, 5)]
    with FlopCounterMode(display=False) as counter:
        kronecker_apply(tau, factors).sum().backward()
    assert counter.get_total_flops() == 2 * tau.numel() * (14 + 9 + 14 + 14)
    kronecker_apply(tau, factors)
    assert calls


@pytest.mark.parametrize("env", [{"CAMEX_CPU_KERNELS": "0"}, {"CC": "/bin/false"}], ids=["switched-off", "no-build"])
def test_without_the_kernel_the_pytorch_path_runs(env, tmp_path):
    """Switched off, or where the source cannot be compiled, `available()` is False and the
    curvature still computes (a fresh cache, so the compiler is really called)."""
    code = (
        "import torch; from camex.kernels import cpu_kron; from camex.merging import kronecker_apply;"
        "torch.set_num_threads(1); assert not cpu_kron.available();"
        "x = torch.randn(2, 6, 6); f = [torch.eye(d).expand(1, 2, d, d) for d in (2, 3, 3, 2)];"
        "torch.testing.assert_close(kronecker_apply(x, f), x); print('ok')"
    )
    env = {**os.environ, "XDG_CACHE_HOME": str(tmp_path), **env}
    done = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "ok"
    assert not [p for p in tmp_path.rglob("*") if p.is_file()]  # nothing built, nothing half-written left


def test_an_install_without_the_source_falls_back(monkeypatch, tmp_path):
    """A package installed without `cpu_kron.c` says so instead of failing at import or first use."""
    monkeypatch.setattr(cpu_kron.LIBRARY, "source", tmp_path / "missing.c")
    lib, why = cpu_kron.LIBRARY.load()
    assert lib is None and why.startswith("build failed") and "missing.c" in why


def test_an_edited_header_renames_the_build(tmp_path):
    """The kernels include a shared header (`cpu_parallel.h`): the build's name hashes it too, so
    a library built against an older header is not loaded from the cache."""
    from camex.kernels.cpu_build import CompiledLibrary

    kernels = Path(cpu_kron.__file__).parent
    assert '#include "cpu_parallel.h"' in (kernels / "cpu_kron.c").read_text()
    for name in ("cpu_kron.c", "cpu_parallel.h"):
        shutil.copy(kernels / name, tmp_path / name)
    library = CompiledLibrary("cpu_kron", cpu_kron._declare)
    library.source = tmp_path / "cpu_kron.c"
    before = library.tag()
    assert before == cpu_kron.LIBRARY.tag()
    with (tmp_path / "cpu_parallel.h").open("a") as header:
        header.write("\n/* edited */\n")
    assert library.tag() != before
