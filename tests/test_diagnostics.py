"""The curvature diagnostic (camex/moe/diagnostics.py) against dense, materialised computations."""

from __future__ import annotations

import torch

from camex.merging import domain_vectors, merge_flat
from camex.moe import KroneckerCurvature, MergedExpertLinear, NoisyTopKGate, TiesMask, UnitRouter
from camex.moe.diagnostics import KEYS, CurvatureProbe, merged_change_terms, operator_relative_change


def _dense_operator(curvature: KroneckerCurvature, n: int, out: int, inp: int) -> torch.Tensor:
    """`[n, OI, OI]`: each expert's operator applied to every basis matrix (the definition)."""
    basis = torch.eye(out * inp, dtype=torch.float64).view(out * inp, out, inp)
    cols = [curvature.weight(b.expand(n, out, inp).clone()).reshape(n, -1) for b in basis]
    return torch.stack(cols, dim=-1)


def test_operator_change_equals_the_dense_operator():
    n, out, inp, rank = 3, 4, 6, 2
    curvature = KroneckerCurvature(num_experts=n, rank=rank, out_features=out, in_features=inp, bias=False).double()
    initial = [f.detach().clone() for f in curvature.weight_factors]
    start = _dense_operator(curvature, n, out, inp)
    assert torch.allclose(start, rank * torch.eye(out * inp, dtype=torch.float64).expand(n, -1, -1))
    assert operator_relative_change(list(curvature.weight_factors), initial).abs().max() == 0
    g = torch.Generator().manual_seed(0)
    for scale in (0.3, 1e-6):  # a large change and one so small that naive ‖M‖² − 2⟨M, M₀⟩ + ‖M₀‖² would lose it
        with torch.no_grad():
            for f, f0 in zip(curvature.weight_factors, initial):
                f.copy_(f0 + scale * torch.randn(f.shape, generator=g, dtype=torch.float64))
        dense = _dense_operator(curvature, n, out, inp)
        want = (dense - start).flatten(1).norm(dim=1) / start.flatten(1).norm(dim=1)
        got = operator_relative_change(list(curvature.weight_factors), initial)
        assert torch.allclose(got, want, rtol=1e-9, atol=0), (scale, got, want)


def test_merged_change_terms_equal_materialised_weights():
    g = torch.Generator().manual_seed(1)
    n, units, out, inp, alpha = 4, 5, 3, 7, 0.7
    base, curved, euclid = (torch.randn(*s, generator=g, dtype=torch.float64)
                            for s in ((out, inp), (n, out, inp), (n, out, inp)))  # fmt: skip
    scores = torch.rand(units, n, generator=g, dtype=torch.float64)
    ca, eu = merge_flat(base, curved, scores, alpha), merge_flat(base, euclid, scores, alpha)
    num, den = merged_change_terms(base, curved, euclid, scores, alpha)
    assert abs(num - float((ca - eu).double().pow(2).sum())) < 1e-9 * max(num, 1)
    assert abs(den - float(eu.double().pow(2).sum())) < 1e-9 * den


class _Tiny(torch.nn.Module):
    def __init__(self, n=3, out=6, inp=8, rank=1):
        super().__init__()
        gate = NoisyTopKGate(in_features=inp, num_experts=n, top_k=2, noisy=False)
        self.layer = MergedExpertLinear(
            in_features=inp, out_features=out, num_experts=n, bias=True, mask=TiesMask(),
            router=UnitRouter(gate=gate, unit="sequence"),
            curvature=KroneckerCurvature(num_experts=n, rank=rank, out_features=out, in_features=inp, bias=True),
        )  # fmt: skip
        g = torch.Generator().manual_seed(2)
        self.layer.load_dense(torch.randn(out, inp, generator=g), torch.randn(out, generator=g))
        with torch.no_grad():
            self.layer.expert_weight.add_(0.1 * torch.randn(self.layer.expert_weight.shape, generator=g))

    def forward(self, x):
        return self.layer(x)


def test_probe_reads_zero_at_start_and_the_materialised_change_after():
    model = _Tiny().eval()
    probe = CurvatureProbe(model)
    x = torch.randn(4, 5, 8, generator=torch.Generator().manual_seed(3))
    start = probe.measure(lambda: model(x))
    assert set(start) == set(KEYS)
    assert start["curvature_operator_change_max"] == 0 and start["curvature_merged_change_max"] == 0  # rank 1: M = Id
    layer = model.layer
    taus = domain_vectors(layer.expert_weight, layer.base_weight).detach()
    want_tau = (taus.flatten(1).norm(dim=1) / layer.base_weight.detach().norm()).mean()
    assert abs(start["curvature_tau_ratio_mean"] - float(want_tau)) < 1e-6

    with torch.no_grad():
        for f in layer.curvature.weight_factors:
            f.add_(0.05 * torch.randn(f.shape, generator=torch.Generator().manual_seed(4)))
    after = probe.measure(lambda: model(x))
    assert after["curvature_operator_change_median"] > 0
    with torch.no_grad():  # the merged weights each sequence got, with and without the curvature
        scores = layer.router(x).scores
        mask = layer.mask.entries(taus, False)
        ca = merge_flat(layer.base_weight, layer.transform(taus), scores, layer.alpha)
        eu = merge_flat(layer.base_weight, taus * mask, scores, layer.alpha)
    want = float((ca - eu).norm() / eu.norm())
    assert after["curvature_merged_change_mean"] == after["curvature_merged_change_max"]  # one layer
    assert abs(after["curvature_merged_change_mean"] - want) < 1e-5 * want and want > 0


def test_report_reads_the_keys_the_training_logs():
    from camex.report.layout import DIAGNOSTIC

    assert [key for _, key in DIAGNOSTIC] == list(KEYS)
    assert not CurvatureProbe(torch.nn.Linear(2, 2))  # no curvature-aware layer: nothing to log
