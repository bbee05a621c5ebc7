"""The hand-written passes behind the fast layer: scaled Kronecker sum, fused merged linear, eval-cache switch.

References are plain autograd through explicit formulas (`torch.kron`, einsum), in float64.
"""

from __future__ import annotations

import pytest
import torch

from camex.merging import curvature, domain_vectors, kronecker_apply, merge, merge_flat, merged_linear
from camex.moe import KroneckerCurvature, MergedExpertLinear, NoisyTopKGate, UnitRouter

F64 = torch.float64


@pytest.fixture(params=["one-block", "blocks-of-one", "rows-of-one-kept", "inner-batched"])
def blocks(request, monkeypatch):
    """Run each test with the whole tensor as one block; with one expert per curvature block and
    one output row per merged-linear tile, the weights rebuilt in the backward pass; with
    rows of one whose weights are kept for the backward pass; and with every inner-mode product
    and contraction run as one GEMM over all experts."""
    if request.param == "inner-batched":
        monkeypatch.setattr(curvature, "INNER_COPY_RATIO", 0)
    elif request.param != "one-block":
        monkeypatch.setattr(curvature, "CPU_BLOCK_BYTES", 1)
        monkeypatch.setattr(merge, "CPU_BLOCK_BYTES", 1)
    if request.param == "blocks-of-one":
        monkeypatch.setattr(merge, "CPU_KEEP_BYTES", 0)
    return request.param


def test_curvature_blocks_fit_the_cache_where_an_expert_does_on_one_thread(threads, monkeypatch):
    """On one thread, experts whose block buffers fit in the last-level cache together walk
    cache-sized blocks (MiniLM-L6's FFN: one expert of 2.25 MiB); larger ones, and all on several
    threads (fewer parallel regions), the byte budget (T5-base: two of 9 MiB)."""
    minilm, t5 = torch.empty(7, 1536, 384), torch.empty(7, 3072, 768)  # never touched: no pages faulted
    assert curvature.expert_block(minilm) == curvature.expert_block(torch.empty(7, 384, 1536)) == (
        1 if threads == 1 else 7
    )
    assert curvature.expert_block(t5) == 2
    assert curvature.expert_block(torch.empty(7, 64, 256)) == 7
    assert curvature.expert_block(torch.empty(7, 1536)) == 7  # a bias
    monkeypatch.setattr(curvature, "CPU_BLOCK_BYTES", 1)  # a budget below both: blocks of one
    assert curvature.expert_block(torch.empty(7, 64, 256)) == 1
    assert curvature.expert_block(t5) == 1


def _rand(*shape, seed=0, grad=False):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed), dtype=F64).requires_grad_(grad)


def _explicit(tau, factors, scale):
    if len(factors) == 2:
        a, b = factors
        return scale * torch.stack(
            [sum(torch.kron(a[r, i], b[r, i]) @ tau[i] for r in range(a.shape[0])) for i in range(tau.shape[0])]
        )
    a, b, c, d = factors
    return scale * torch.stack(
        [
            sum(torch.kron(a[r, i], b[r, i]) @ tau[i] @ torch.kron(c[r, i], d[r, i]).T for r in range(a.shape[0]))
            for i in range(tau.shape[0])
        ]
    )


@pytest.mark.parametrize("rank", [1, 2, 4])
@pytest.mark.parametrize(
    "dims",
    [(2, 3, 3, 2), (3, 2), (1, 5, 2, 1), (2, 3, 3, 4), (2, 3)],
    ids=["weight", "bias", "unit-modes", "weight-last-mode-larger", "bias-last-mode-larger"],
)
def test_scaled_kronecker_sum_forward_and_grads_match_explicit(rank, dims, blocks):
    n = 3
    shape = (n, dims[0] * dims[1]) if len(dims) == 2 else (n, dims[0] * dims[1], dims[2] * dims[3])
    tau = _rand(*shape, seed=1, grad=True)
    factors = [_rand(rank, n, d, d, seed=2 + k, grad=True) for k, d in enumerate(dims)]
    weight = _rand(*shape, seed=9)

    got = kronecker_apply(tau, factors, scale=0.7)
    want = _explicit(tau, factors, 0.7)
    torch.testing.assert_close(got, want, rtol=0, atol=1e-10)
    g_got = torch.autograd.grad((got * weight).sum(), [tau, *factors])
    g_want = torch.autograd.grad((want * weight).sum(), [tau, *factors])
    for a, b in zip(g_got, g_want):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-10)


def test_scaled_kronecker_sum_gradcheck(blocks):
    n, dims = 2, (2, 2, 3, 2)
    tau = _rand(n, 4, 6, seed=3, grad=True)
    factors = [_rand(3, n, d, d, seed=4 + k, grad=True) for k, d in enumerate(dims)]
    assert torch.autograd.gradcheck(lambda x, *f: kronecker_apply(x, list(f), scale=-1.3), (tau, *factors))


@pytest.mark.parametrize("needed", [(True, False, False, False, False), (False, False, True, False, False)])
def test_kronecker_sum_partial_needs(needed, blocks):
    """Only the factor of one middle mode (or only τ) needs a gradient: the pass stops early."""
    n, dims = 2, (2, 3, 2, 2)
    tau = _rand(n, 6, 4, seed=5, grad=needed[0])
    factors = [_rand(2, n, d, d, seed=6 + k, grad=q) for k, (d, q) in enumerate(zip(dims, needed[1:]))]
    weight = _rand(n, 6, 4, seed=7)
    inputs = [t for t in (tau, *factors) if t.requires_grad]
    got = torch.autograd.grad((kronecker_apply(tau, factors, scale=0.5) * weight).sum(), inputs)
    want = torch.autograd.grad((_explicit(tau, factors, 0.5) * weight).sum(), inputs)
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-10)


def _explicit_merged_linear(x, base, deltas, scores, alpha, base_bias, delta_bias):
    weight = base + alpha * torch.einsum("un,noi->uoi", scores, deltas)
    y = torch.einsum("uti,uoi->uto", x, weight)
    if base_bias is not None:
        y = y + (base_bias + alpha * scores @ delta_bias).unsqueeze(1)
    return y


@pytest.mark.parametrize("bias", [False, True])
@pytest.mark.parametrize("alpha", [1.0, 0.6])
def test_merged_linear_matches_merge_then_bmm(bias, alpha, blocks):
    units, t, n, o, i = 3, 4, 5, 6, 7
    args = [
        _rand(units, t, i, seed=1, grad=True),
        _rand(o, i, seed=2, grad=True),
        _rand(n, o, i, seed=3, grad=True),
        torch.softmax(_rand(units, n, seed=4), -1).requires_grad_(True),
    ]
    biases = [_rand(o, seed=5, grad=True), _rand(n, o, seed=6, grad=True)] if bias else [None, None]
    upstream = _rand(units, t, o, seed=8)
    got = merged_linear(*args, alpha, *biases)
    want = _explicit_merged_linear(*args, alpha, *biases)
    torch.testing.assert_close(got, want, rtol=0, atol=1e-10)
    inputs = [a for a in (*args, *biases) if a is not None]
    for a, b in zip(torch.autograd.grad(got, inputs, upstream), torch.autograd.grad(want, inputs, upstream)):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-10)


def test_merged_linear_gradcheck_and_retained_graph(blocks):
    units, t, n, o, i = 2, 3, 3, 4, 5
    inputs = (
        _rand(units, t, i, seed=1, grad=True),
        _rand(o, i, seed=2, grad=True),
        _rand(n, o, i, seed=3, grad=True),
        _rand(units, n, seed=4, grad=True),
    )
    bias = (_rand(o, seed=5, grad=True), _rand(n, o, seed=6, grad=True))
    assert torch.autograd.gradcheck(lambda *a: merged_linear(*a[:4], 0.8, *a[4:]), (*inputs, *bias))
    # the backward pass reuses the merged weight's buffer only when the graph is not kept
    y = merged_linear(*inputs, 0.8, *bias)
    first = torch.autograd.grad(y.sum(), inputs, retain_graph=True)
    second = torch.autograd.grad(y.sum(), inputs)
    for a, b in zip(first, second):
        torch.testing.assert_close(a, b, rtol=0, atol=0)


def test_merged_linear_other_input_dtype_takes_the_plain_path():
    base, deltas = torch.randn(6, 5, dtype=F64), torch.randn(3, 6, 5, dtype=F64)
    scores = torch.softmax(torch.randn(2, 3), -1)
    x = torch.randn(2, 4, 5)  # float32 activations, float64 parameters
    y = merged_linear(x, base, deltas, scores, 0.5)
    assert y.dtype == torch.float32
    want = torch.einsum("uti,uoi->uto", x, merge_flat(base, deltas, scores, 0.5).float())
    torch.testing.assert_close(y, want)


def test_domain_vectors_gradient_reaches_the_base():
    experts, base = _rand(3, 4, 5, seed=1, grad=True), _rand(4, 5, seed=2, grad=True)
    w = _rand(3, 4, 5, seed=3)
    (domain_vectors(experts, base) * w).sum().backward()
    torch.testing.assert_close(experts.grad, w, rtol=0, atol=0)
    torch.testing.assert_close(base.grad, -w.sum(0), rtol=0, atol=1e-12)


def test_eval_cache_switch():
    n, inp, out = 3, 6, 4
    gate = NoisyTopKGate(in_features=inp, num_experts=n, top_k=n)
    layer = MergedExpertLinear(
        in_features=inp, out_features=out, num_experts=n, bias=True, router=UnitRouter(gate=gate, unit="sequence"),
        curvature=KroneckerCurvature(num_experts=n, rank=2, out_features=out, in_features=inp, bias=True),
    )  # fmt: skip
    layer.load_dense(torch.randn(out, inp), torch.randn(out))
    layer.eval()
    calls = []
    original = layer._operands
    layer._operands = lambda: calls.append(1) or original()
    x = torch.randn(2, 3, inp)
    with torch.no_grad():
        first = layer(x)
        layer(x)
        assert len(calls) == 1
        layer.eval_cache = False
        torch.testing.assert_close(layer(x), first, rtol=0, atol=0)
        layer(x)
        assert len(calls) == 3


@pytest.mark.parametrize("needs", ["all", "base-only", "factors-only"])
@pytest.mark.parametrize("dims", [(2, 3, 3, 2), (3, 2), (2, 3, 3, 4)], ids=["weight", "bias", "last-mode-larger"])
def test_kronecker_sum_around_a_base_matches_it_on_domain_vectors(dims, needs, blocks):
    """`kronecker_apply(E, f, base=E_m)` takes `τ = E − E_m` inside its passes: the same values and
    gradients (experts, base, factors) as on `domain_vectors(E, E_m)`, for any subset needed."""
    n, rank = 3, 2
    shape = (n, dims[0] * dims[1]) if len(dims) == 2 else (n, dims[0] * dims[1], dims[2] * dims[3])
    experts = _rand(*shape, seed=1, grad=needs == "all")
    base = _rand(*shape[1:], seed=2, grad=needs != "factors-only")
    factors = [_rand(rank, n, d, d, seed=3 + k, grad=needs != "base-only") for k, d in enumerate(dims)]
    weight = _rand(*shape, seed=9)
    leaves = [t for t in (experts, base, *factors) if t.requires_grad]

    got = kronecker_apply(experts, factors, scale=0.7, base=base)
    want = kronecker_apply(domain_vectors(experts, base), factors, scale=0.7)
    torch.testing.assert_close(got, want, rtol=0, atol=1e-12)
    for a, b in zip(
        torch.autograd.grad((got * weight).sum(), leaves), torch.autograd.grad((want * weight).sum(), leaves)
    ):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-12)


@pytest.mark.parametrize("bias", [False, True])
@pytest.mark.parametrize("alpha", [1.0, 0.6])
def test_merged_linear_around_the_base_matches_it_on_domain_vectors(bias, alpha, blocks):
    """`around=True` takes experts and forms `τ = E − base` inside the tiles: the same output and
    gradients (tokens, base, experts, scores, biases) as the merge of explicit domain vectors."""
    units, t, n, o, i = 3, 4, 5, 6, 7
    x, base = _rand(units, t, i, seed=1, grad=True), _rand(o, i, seed=2, grad=True)
    experts = _rand(n, o, i, seed=3, grad=True)
    scores = torch.softmax(_rand(units, n, seed=4), -1).requires_grad_(True)
    biases = [_rand(o, seed=5, grad=True), _rand(n, o, seed=6, grad=True)] if bias else [None, None]
    upstream = _rand(units, t, o, seed=8)
    got = merged_linear(x, base, experts, scores, alpha, *biases, around=True)
    delta_bias = None if not bias else domain_vectors(biases[1], biases[0])
    want = _explicit_merged_linear(x, base, domain_vectors(experts, base), scores, alpha, biases[0], delta_bias)
    torch.testing.assert_close(got, want, rtol=0, atol=1e-10)
    inputs = [a for a in (x, base, experts, scores, *biases) if a is not None]
    for a, b in zip(torch.autograd.grad(got, inputs, upstream), torch.autograd.grad(want, inputs, upstream)):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-10)
    assert torch.autograd.gradcheck(lambda *a: merged_linear(*a[:4], 0.8, *a[4:], around=True), tuple(inputs))


@pytest.mark.parametrize("rank", [1, 2])
def test_curvature_then_merge_reuse_one_allocation_for_three_tensors(rank, blocks):
    """`reuse_deltas` and `reuse_grad` chain as in a CAMEx layer: the merged linear writes `∂γ̃`
    over `γ̃`, the curvature writes `∂E` over `∂γ̃` (the expert gradient lives in `γ̃`'s memory),
    with the same values and gradients as without reuse; with the graph kept for a second
    backward pass nothing is overwritten and both passes agree."""
    units, t, n, o, i, dims = 3, 4, 3, 6, 4, (2, 3, 2, 2)
    x, base = _rand(units, t, i, seed=1, grad=True), _rand(o, i, seed=2, grad=True)
    experts = _rand(n, o, i, seed=3, grad=True)
    scores = torch.softmax(_rand(units, n, seed=4), -1).requires_grad_(True)
    factors = [_rand(rank, n, d, d, seed=5 + k, grad=True) for k, d in enumerate(dims)]
    upstream = _rand(units, t, o, seed=9)
    leaves = [x, base, experts, scores, *factors]

    def run(reuse: bool):
        curved = kronecker_apply(experts, factors, base=base, reuse_grad=reuse)
        return curved, merged_linear(x, base, curved, scores, 0.8, reuse_deltas=reuse)

    _, want = run(False)
    g_want = torch.autograd.grad(want, leaves, upstream)
    curved, got = run(True)
    torch.testing.assert_close(got, want, rtol=0, atol=0)
    g_got = torch.autograd.grad(got, leaves, upstream)
    for a, b in zip(g_got, g_want):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-12)
    assert g_got[2].data_ptr() == curved.data_ptr()  # ∂E written over γ̃
    curved, kept = run(True)
    first = torch.autograd.grad(kept, leaves, upstream, retain_graph=True)
    second = torch.autograd.grad(kept, leaves, upstream)
    assert first[2].data_ptr() != curved.data_ptr()
    for a, b, c in zip(first, second, g_want):
        torch.testing.assert_close(a, c, rtol=0, atol=1e-12)
        torch.testing.assert_close(b, c, rtol=0, atol=1e-12)
