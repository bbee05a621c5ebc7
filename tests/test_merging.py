"""Pure merging maths (SPEC §2-4): TIES and DARE masks, the Kronecker curvature operator, the merge rule.

Every golden value below is worked out by hand in the comments (or built from an explicit, independent
formula such as `torch.kron`), never copied from the function under test.
"""

from __future__ import annotations

import pytest
import torch

from camex.merging import (
    dare_element_mask,
    dare_expert_mask,
    domain_vectors,
    kronecker_apply,
    merge_flat,
    nearest_factors,
    ties_elect_sign,
    ties_mask,
    ties_merge,
)
from camex.merging.curvature import identity_factors

F64 = torch.float64


def t(x) -> torch.Tensor:
    return torch.tensor(x, dtype=F64)


# ---------------------------------------------------------------------------------------------
# TIES, released rule: m = 1[sign(τ_i) == sign(Σ_j τ_j)], no trim, no zero-sum resolution
# ---------------------------------------------------------------------------------------------

# [3, 2, 3]; per-entry sums (hand):
#   (0,0):  1 - 1 + 0 =  0  -> sign 0 (sign tie with non-zero entries)
#   (0,1):  2 + 1 - 4 = -1  -> -
#   (0,2):  0 + 0 + 0 =  0  -> sign 0 (all-zero column)
#   (1,0):  3 - 4 + 2 =  1  -> +
#   (1,1): -1 - 2 + 5 =  2  -> +
#   (1,2): .5 + .5 - 2 = -1 -> -
RELEASED_TAUS = [
    [[1.0, 2.0, 0.0], [3.0, -1.0, 0.5]],
    [[-1.0, 1.0, 0.0], [-4.0, -2.0, 0.5]],
    [[0.0, -4.0, 0.0], [2.0, 5.0, -2.0]],
]
# sign(τ_i) == elected sign, entry by entry; where the sum is 0 only zero entries match (sign 0 == 0).
RELEASED_MASK = [
    [[0.0, 0.0, 1.0], [1.0, 0.0, 0.0]],
    [[0.0, 0.0, 1.0], [0.0, 0.0, 0.0]],
    [[1.0, 1.0, 1.0], [1.0, 1.0, 1.0]],
]


def test_ties_mask_released_hand_example():
    taus = t(RELEASED_TAUS)
    mask = ties_mask(taus)
    assert mask.shape == taus.shape and mask.dtype == taus.dtype
    torch.testing.assert_close(mask, t(RELEASED_MASK), rtol=0, atol=0)
    # The explicit default and `trim=None` are the same rule.
    torch.testing.assert_close(ties_mask(taus, trim=None), t(RELEASED_MASK), rtol=0, atol=0)
    # Consequence: a sign tie and an all-zero column contribute nothing once masked.
    kept = (taus * mask).sum(dim=0)
    torch.testing.assert_close(kept, t([[0.0, -4.0, 0.0], [5.0, 5.0, -2.0]]), rtol=0, atol=0)


def test_ties_mask_released_float32_and_1d():
    # Same rule on a flat float32 vector: sums [2, -1, 0] -> signs [+, -, 0].
    taus = torch.tensor([[1.0, 1.0, 2.0], [1.0, -2.0, -2.0]])
    torch.testing.assert_close(ties_mask(taus), torch.tensor([[1.0, 0.0, 0.0], [1.0, 1.0, 0.0]]), rtol=0, atol=0)
    assert ties_mask(taus).dtype == torch.float32


# ---------------------------------------------------------------------------------------------
# TIES, reference rule: trim, elect by mass (zero sums -> majority sign), strict agreement, disjoint mean
# ---------------------------------------------------------------------------------------------

# [3, 2, 3]: 6 entries per expert, distinct magnitudes within each expert.
REF_TAUS = [
    [[5.0, -0.1, 0.0], [-3.0, 0.2, -4.0]],
    [[-5.0, -2.0, 0.0], [-6.0, 0.3, -1.0]],
    [[0.5, 7.0, 0.0], [1.0, -8.0, 0.4]],
]
# trim = 0.5 zeroes int(0.5 * 6) = 3 smallest magnitudes per expert, keeping its top 3:
#   e0 keeps |5|, |-4|, |-3|  -> [[ 5,  0, 0], [-3,  0, -4]]
#   e1 keeps |-6|, |-5|, |-2| -> [[-5, -2, 0], [-6,  0,  0]]
#   e2 keeps |-8|, |7|, |1|   -> [[ 0,  7, 0], [ 1, -8,  0]]
# Trimmed sums: (0,0) 5-5+0 = 0 (tie), (0,1) 5 (+), (0,2) 0 (all-zero column), (1,0) -8 (-), (1,1) -8 (-),
#   (1,2) -4 (-). Non-zero elected signs sum to +1 -1 -1 -1 = -2, so the majority sign is -, and both
#   zero sums are elected -. (Untrimmed, (0,0) would sum to +0.5: trimming changes the election.)
# Strict agreement with [[-, +, -], [-, -, -]] on the trimmed values:
REF_MASK_TRIM = [
    [[0.0, 0.0, 0.0], [1.0, 0.0, 1.0]],
    [[1.0, 0.0, 0.0], [1.0, 0.0, 0.0]],
    [[0.0, 1.0, 0.0], [0.0, 1.0, 0.0]],
]
# Disjoint mean over kept non-zeros: (0,0) -5/1, (0,1) 7/1, (0,2) none -> 0, (1,0) (-3-6)/2, (1,1) -8/1,
#   (1,2) -4/1.
REF_MERGED_TRIM = [[-5.0, 7.0, 0.0], [-4.5, -8.0, -4.0]]

# trim = 0.0 keeps all entries. Sums: (0,0) +0.5, (0,1) +4.9, (0,2) 0, (1,0) -8, (1,1) -7.5, (1,2) -4.6.
#   Non-zero elected signs: + + - - - -> -1, majority -, so the all-zero column is elected - (keeps nothing).
REF_MASK_NOTRIM = [
    [[1.0, 0.0, 0.0], [1.0, 0.0, 1.0]],
    [[0.0, 0.0, 0.0], [1.0, 0.0, 1.0]],
    [[1.0, 1.0, 0.0], [0.0, 1.0, 0.0]],
]
# (0,0) (5 + 0.5)/2, (0,1) 7, (0,2) 0, (1,0) (-3-6)/2, (1,1) -8, (1,2) (-4-1)/2.
REF_MERGED_NOTRIM = [[2.75, 7.0, 0.0], [-4.5, -8.0, -2.5]]


def test_ties_reference_with_trim_hand_example():
    taus = t(REF_TAUS)
    torch.testing.assert_close(ties_mask(taus, trim=0.5), t(REF_MASK_TRIM), rtol=0, atol=0)
    torch.testing.assert_close(ties_merge(taus, trim=0.5), t(REF_MERGED_TRIM), rtol=0, atol=1e-12)


def test_ties_reference_trim_zero_keeps_everything_before_election():
    taus = t(REF_TAUS)
    torch.testing.assert_close(ties_mask(taus, trim=0.0), t(REF_MASK_NOTRIM), rtol=0, atol=0)
    torch.testing.assert_close(ties_merge(taus, trim=0.0), t(REF_MERGED_NOTRIM), rtol=0, atol=1e-12)


def test_ties_reference_zero_sum_goes_to_positive_when_majority_is_zero():
    # Sums [0, 3, -2] -> signs [0, +, -]; the elected signs sum to 0, so the tie is elected +.
    taus = t([[1.0, 2.0, -3.0], [-1.0, 1.0, 1.0]])
    torch.testing.assert_close(ties_elect_sign(taus, resolve_zero=True), t([1.0, 1.0, -1.0]), rtol=0, atol=0)
    torch.testing.assert_close(ties_elect_sign(taus, resolve_zero=False), t([0.0, 1.0, -1.0]), rtol=0, atol=0)
    torch.testing.assert_close(ties_mask(taus, trim=0.0), t([[1.0, 1.0, 1.0], [0.0, 1.0, 0.0]]), rtol=0, atol=0)
    # (0) 1/1, (1) (2 + 1)/2, (2) -3/1.
    torch.testing.assert_close(ties_merge(taus, trim=0.0), t([1.0, 1.5, -3.0]), rtol=0, atol=1e-12)


def test_ties_elect_sign_majority_negative():
    # Sums [0, -1, -2, 1] -> signs [0, -, -, +]; elected signs sum to -1, so the tie is elected -.
    taus = t([[1.0, -1.0, -1.0, 1.0], [-1.0, 0.0, -1.0, 0.0]])
    torch.testing.assert_close(ties_elect_sign(taus, resolve_zero=True), t([-1.0, -1.0, -1.0, 1.0]), rtol=0, atol=0)


@pytest.mark.parametrize(("trim", "zeroed"), [(0.25, 25), (0.5, 50), (0.29, 29), (0.57, 57)])
def test_ties_trim_zeroes_the_requested_fraction(trim, zeroed):
    # One expert, entries 1..100 (all positive, so every untrimmed entry agrees with the elected +):
    # trimming a fraction `trim` of 100 entries must zero exactly the `trim * 100` smallest ones.
    # 0.29 * 100 and 0.57 * 100 are 28.999... and 56.999... in binary floating point.
    taus = torch.arange(1.0, 101.0, dtype=F64).unsqueeze(0)
    want = (torch.arange(1, 101) > zeroed).to(F64).unsqueeze(0)
    torch.testing.assert_close(ties_mask(taus, trim=trim), want, rtol=0, atol=0)


@pytest.mark.parametrize("trim", [1.0, -0.1, 1.5])
def test_ties_invalid_trim_raises(trim):
    taus = t(REF_TAUS)
    with pytest.raises(ValueError):
        ties_mask(taus, trim=trim)
    with pytest.raises(ValueError):
        ties_merge(taus, trim=trim)


@pytest.mark.parametrize("trim", [None, 0.0, 0.5])
def test_ties_mask_has_no_gradient(trim):
    g = torch.Generator().manual_seed(1)
    taus = torch.randn(3, 4, 5, generator=g, dtype=F64).requires_grad_(True)
    mask = ties_mask(taus, trim=trim)
    assert not mask.requires_grad
    loss = (taus * mask).sum()
    loss.backward()
    torch.testing.assert_close(taus.grad, mask.detach(), rtol=0, atol=0)


# ---------------------------------------------------------------------------------------------
# DARE
# ---------------------------------------------------------------------------------------------

DRAWS = 2000


def _mean_over_seeds(draw) -> tuple[torch.Tensor, torch.Tensor]:
    """Mean of `draw(generator)` over DRAWS distinct seeds, and the mean fraction of zeros."""
    total, zeros = None, 0.0
    for seed in range(DRAWS):
        m = draw(torch.Generator().manual_seed(seed))
        total = m.clone() if total is None else total + m
        zeros += (m == 0).double().mean().item()
    return total / DRAWS, zeros / DRAWS


@pytest.mark.parametrize("p", [0.1, 0.3])
def test_dare_element_mask_unbiased(p):
    g = torch.Generator().manual_seed(123)
    tau = torch.randn(16, 32, generator=g, dtype=F64)
    scale = 1.0 / (1.0 - p)

    first = dare_element_mask(tau, p, generator=torch.Generator().manual_seed(0))
    assert first.shape == tau.shape and first.dtype == tau.dtype
    assert bool(((first == 0) | torch.isclose(first, torch.full_like(first, scale))).all())
    # Same seed, same draw.
    torch.testing.assert_close(dare_element_mask(tau, p, generator=torch.Generator().manual_seed(0)), first)

    mean_mask, dropped = _mean_over_seeds(lambda gen: dare_element_mask(tau, p, generator=gen))
    assert abs(dropped - p) < 0.01
    assert abs(mean_mask.mean().item() - 1.0) < 0.01
    # E[mask * τ] ≈ τ: on the total (1 %) and element-wise (a looser bound: 2000 draws per entry).
    est = mean_mask * tau
    assert abs((est.abs().sum() / tau.abs().sum()).item() - 1.0) < 0.01
    assert abs((est.sum() - tau.sum()).item()) / tau.abs().sum().item() < 0.01
    big = tau.abs() > 0.1
    rel = ((est - tau).abs() / tau.abs())[big]
    assert rel.max().item() < 0.1


@pytest.mark.parametrize("p", [0.1, 0.3])
def test_dare_expert_mask_unbiased(p):
    units, n = 32, 7
    scale = 1.0 / (1.0 - p)
    first = dare_expert_mask(units, n, p, generator=torch.Generator().manual_seed(0), dtype=F64)
    assert first.shape == (units, n) and first.dtype == F64
    assert bool(((first == 0) | torch.isclose(first, torch.full_like(first, scale))).all())
    assert dare_expert_mask(units, n, p).dtype == torch.get_default_dtype()

    mean_mask, dropped = _mean_over_seeds(lambda gen: dare_expert_mask(units, n, p, generator=gen, dtype=F64))
    assert abs(dropped - p) < 0.01
    assert abs(mean_mask.mean().item() - 1.0) < 0.01

    # The mask multiplies the scores; merging is linear in them, so the expected merge is unchanged.
    g = torch.Generator().manual_seed(5)
    base, deltas = torch.randn(3, 4, generator=g, dtype=F64), torch.randn(n, 3, 4, generator=g, dtype=F64)
    scores = torch.softmax(torch.randn(units, n, generator=g, dtype=F64), dim=-1)
    want = merge_flat(base, deltas, scores) - base
    got = merge_flat(base, deltas, scores * mean_mask) - base
    # Averaged over units (units x 2000 draws per expert) within 1 %; per unit (2000 draws) within 5 %.
    assert ((got.mean(0) - want.mean(0)).abs().sum() / want.mean(0).abs().sum()).item() < 0.01
    assert ((got - want).abs().sum() / want.abs().sum()).item() < 0.05


def test_dare_p_zero_keeps_everything():
    like = torch.randn(4, 5)
    torch.testing.assert_close(dare_element_mask(like, 0.0), torch.ones(4, 5), rtol=0, atol=0)
    torch.testing.assert_close(dare_expert_mask(3, 7, 0.0), torch.ones(3, 7), rtol=0, atol=0)


# ---------------------------------------------------------------------------------------------
# Curvature operator
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("d", "expected"),
    [
        (768, (24, 32)),
        (3072, (48, 64)),
        (1024, (32, 32)),
        (512, (16, 32)),
        (13, (1, 13)),
        (769, (1, 769)),
        (1, (1, 1)),
        (2, (1, 2)),
        (6, (2, 3)),
        (8, (2, 4)),
        (36, (6, 6)),
    ],
)
def test_nearest_factors_table(d, expected):
    assert nearest_factors(d) == expected


@pytest.mark.parametrize("d", [0, -4])
def test_nearest_factors_rejects_non_positive(d):
    with pytest.raises(ValueError):
        nearest_factors(d)


def _factors(r: int, n: int, dims, seed: int, requires_grad: bool = False) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(r, n, d, d, generator=g, dtype=F64).requires_grad_(requires_grad) for d in dims]


def _explicit_weight(tau, A, B, C, D):
    """Σ_ρ kron(A, B) @ τ_i @ kron(C, D)ᵀ for every expert i, written with torch.kron."""
    r, n = A.shape[:2]
    out = []
    for i in range(n):
        acc = torch.zeros_like(tau[i])
        for rho in range(r):
            acc = acc + torch.kron(A[rho, i], B[rho, i]) @ tau[i] @ torch.kron(C[rho, i], D[rho, i]).T
        out.append(acc)
    return torch.stack(out)


def _explicit_bias(tau_b, A, B):
    r, n = A.shape[:2]
    out = []
    for i in range(n):
        acc = torch.zeros_like(tau_b[i])
        for rho in range(r):
            acc = acc + torch.kron(A[rho, i], B[rho, i]) @ tau_b[i]
        out.append(acc)
    return torch.stack(out)


@pytest.mark.parametrize("r", [1, 3])
def test_kronecker_apply_matches_explicit_kron(r):
    n, dims = 2, (2, 3, 2, 4)  # O = 6 = 2x3, I = 8 = 2x4
    tau = torch.randn(n, 6, 8, generator=torch.Generator().manual_seed(7), dtype=F64)
    A, B, C, D = _factors(r, n, dims, seed=11 + r)
    got = kronecker_apply(tau, [A, B, C, D])
    assert got.shape == tau.shape
    torch.testing.assert_close(got, _explicit_weight(tau, A, B, C, D), rtol=0, atol=1e-10)


@pytest.mark.parametrize("r", [1, 3])
def test_kronecker_apply_bias_matches_explicit_kron(r):
    n, dims = 2, (2, 3)
    tau_b = torch.randn(n, 6, generator=torch.Generator().manual_seed(8), dtype=F64)
    A, B = _factors(r, n, dims, seed=21 + r)
    got = kronecker_apply(tau_b, [A, B])
    assert got.shape == tau_b.shape
    torch.testing.assert_close(got, _explicit_bias(tau_b, A, B), rtol=0, atol=1e-10)


def test_kronecker_apply_row_major_index_pairing():
    # One-hot check of SPEC §4's pairing: with only A ≠ Id (a swap of the two o1 rows) and C ≠ Id (swap of
    # the two i1 columns), output row (a, b) = a·o2 + b takes row (1-a, b) and column (c, e) = c·i2 + e
    # takes column (1-c, e).
    n, r = 1, 1
    tau = torch.arange(6 * 8, dtype=F64).view(1, 6, 8)
    swap = t([[0.0, 1.0], [1.0, 0.0]])
    A = swap.expand(r, n, 2, 2).clone()
    B = torch.eye(3, dtype=F64).expand(r, n, 3, 3).clone()
    C = swap.expand(r, n, 2, 2).clone()
    D = torch.eye(4, dtype=F64).expand(r, n, 4, 4).clone()
    got = kronecker_apply(tau, [A, B, C, D])[0]
    rows = [3, 4, 5, 0, 1, 2]
    cols = [4, 5, 6, 7, 0, 1, 2, 3]
    torch.testing.assert_close(got, tau[0][rows][:, cols], rtol=0, atol=0)


def test_kronecker_apply_rejects_mismatched_factors():
    tau = torch.zeros(2, 6, 8, dtype=F64)
    with pytest.raises(ValueError):
        kronecker_apply(tau, _factors(1, 2, (2, 3, 2, 3), seed=0))


def test_kronecker_apply_gradcheck_weight_rank3():
    n, dims = 2, (2, 2, 2, 3)  # O = 4, I = 6
    tau = torch.randn(n, 4, 6, generator=torch.Generator().manual_seed(3), dtype=F64).requires_grad_(True)
    factors = _factors(3, n, dims, seed=4, requires_grad=True)
    assert torch.autograd.gradcheck(lambda x, *f: kronecker_apply(x, list(f)), (tau, *factors))


def test_kronecker_apply_gradcheck_bias_rank3():
    n, dims = 2, (2, 3)
    tau_b = torch.randn(n, 6, generator=torch.Generator().manual_seed(5), dtype=F64).requires_grad_(True)
    factors = _factors(3, n, dims, seed=6, requires_grad=True)
    assert torch.autograd.gradcheck(lambda x, *f: kronecker_apply(x, list(f)), (tau_b, *factors))


@pytest.mark.parametrize("which", ["tau_only", "factors_only", "some_factors"])
def test_kronecker_apply_partial_grads_match_explicit(which):
    # Exercise the backward when only some inputs need a gradient (ctx.needs_input_grad paths);
    # reference gradients come from autograd through the explicit torch.kron form.
    n, r, dims = 2, 3, (2, 3, 2, 4)
    g = torch.Generator().manual_seed(9)
    tau0 = torch.randn(n, 6, 8, generator=g, dtype=F64)
    f0 = _factors(r, n, dims, seed=10)
    weight = torch.randn(n, 6, 8, generator=g, dtype=F64)
    need = {
        "tau_only": (True, [False] * 4),
        "factors_only": (False, [True] * 4),
        "some_factors": (False, [False, True, True, False]),
    }[which]

    def grads(fn):
        tau = tau0.clone().requires_grad_(need[0])
        fs = [f.clone().requires_grad_(q) for f, q in zip(f0, need[1])]
        (fn(tau, fs) * weight).sum().backward()
        return [x.grad for x in (tau, *fs)]

    got = grads(lambda tau, fs: kronecker_apply(tau, fs))
    want = grads(lambda tau, fs: _explicit_weight(tau, *fs))
    for a, b in zip(got, want):
        if b is None:
            assert a is None
        else:
            torch.testing.assert_close(a, b, rtol=0, atol=1e-10)


@pytest.mark.parametrize("r", [1, 3])
def test_identity_factors_give_r_times_identity(r):
    n, dims = 3, [2, 3, 2, 4]
    factors = identity_factors(r, n, dims)
    assert [tuple(f.shape) for f in factors] == [(r, n, d, d) for d in dims]
    for f, d in zip(factors, dims):
        torch.testing.assert_close(f, torch.eye(d).expand(r, n, d, d), rtol=0, atol=0)
    tau = torch.randn(n, 6, 8, generator=torch.Generator().manual_seed(1))
    torch.testing.assert_close(kronecker_apply(tau, factors), r * tau)
    tau_b = torch.randn(n, 6, generator=torch.Generator().manual_seed(2))
    torch.testing.assert_close(kronecker_apply(tau_b, identity_factors(r, n, dims[:2])), r * tau_b)
    # Independent storage (not an expanded view), so the factors can be trained in place.
    factors[0][0, 0, 0, 0] = 5.0
    assert factors[0][0, 1, 0, 0].item() == 1.0


# ---------------------------------------------------------------------------------------------
# Domain vectors and the merge rule
# ---------------------------------------------------------------------------------------------


def test_domain_vectors():
    base = t([[1.0, 2.0], [3.0, 4.0]])
    experts = t([[[1.0, 2.0], [3.0, 4.0]], [[2.0, 0.0], [3.0, 5.5]], [[0.0, 2.0], [-3.0, 4.0]]])
    want = t([[[0.0, 0.0], [0.0, 0.0]], [[1.0, -2.0], [0.0, 1.5]], [[-1.0, 0.0], [-6.0, 0.0]]])
    torch.testing.assert_close(domain_vectors(experts, base), want, rtol=0, atol=0)
    # Bias shape: [n, O] around [O].
    bias_taus = domain_vectors(t([[1.0, 1.0], [0.0, 3.0]]), t([1.0, 2.0]))
    torch.testing.assert_close(bias_taus, t([[0.0, -1.0], [-1.0, 1.0]]), rtol=0, atol=0)


def _loop_merge(base, deltas, scores):
    out = []
    for u in range(scores.shape[0]):
        acc = base.clone()
        for i in range(deltas.shape[0]):
            acc = acc + scores[u, i] * deltas[i]
        out.append(acc)
    return torch.stack(out)


@pytest.mark.parametrize("shape", [(4, 6), (5,)], ids=["weight", "bias"])
def test_merge_flat_matches_loop(shape):
    g = torch.Generator().manual_seed(0)
    units, n = 5, 3
    base = torch.randn(*shape, generator=g, dtype=F64)
    deltas = torch.randn(n, *shape, generator=g, dtype=F64)
    scores = torch.softmax(torch.randn(units, n, generator=g, dtype=F64), dim=-1)
    got = merge_flat(base, deltas, scores)
    assert got.shape == (units, *shape)
    torch.testing.assert_close(got, _loop_merge(base, deltas, scores), rtol=0, atol=1e-12)
    # float32 scores are cast to the deltas' dtype.
    torch.testing.assert_close(merge_flat(base, deltas, scores.float()), _loop_merge(base, deltas, scores.float()))


def test_merge_flat_hand_example():
    base = t([1.0, -1.0])
    deltas = t([[2.0, 0.0], [0.0, 4.0]])
    scores = t([[0.25, 0.75], [1.0, 0.0]])
    # unit 0: [1 + 0.5, -1 + 3] ; unit 1: [1 + 2, -1]
    torch.testing.assert_close(merge_flat(base, deltas, scores), t([[1.5, 2.0], [3.0, -1.0]]), rtol=0, atol=0)


def test_merge_flat_gradients_match_loop():
    g = torch.Generator().manual_seed(3)
    units, n, shape = 4, 3, (2, 3)
    inputs = [
        torch.randn(*shape, generator=g, dtype=F64),
        torch.randn(n, *shape, generator=g, dtype=F64),
        torch.softmax(torch.randn(units, n, generator=g, dtype=F64), dim=-1),
    ]
    w = torch.randn(units, *shape, generator=g, dtype=F64)

    def grads(fn):
        xs = [x.clone().requires_grad_(True) for x in inputs]
        (fn(*xs) * w).sum().backward()
        return [x.grad for x in xs]

    for a, b in zip(grads(merge_flat), grads(_loop_merge)):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-12)
