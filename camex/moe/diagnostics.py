"""Curvature diagnostic: did the curvature operators of a curvature-aware model change anything?

For every merged-expert layer with a curvature operator, at one moment (an evaluation):

* `‖M_i − M_i(0)‖_F / ‖M_i(0)‖_F` per expert `i`: how far the weight operator moved from where it
  started (computed exactly from the Kronecker factors, never forming the `OI × OI` operator);
  median and max over layers and experts;
* `‖τ_i‖_F / ‖E_m‖_F`: the size of each domain vector against the base expert; mean over layers
  and experts;
* `‖Ê_CA − Ê_Euclid‖_F / ‖Ê_Euclid‖_F` on one batch: the merged weights each routed unit gets,
  against the same merge with the curvature replaced by the identity (same mask, scores and α);
  one ratio per layer over all its units, mean and max over layers.

Bias operators are left out (a bias is a small share of a layer). `CurvatureProbe` measures a
model; the maths are plain functions of tensors, reusable on their own.
"""

from __future__ import annotations

import statistics
from collections.abc import Callable, Sequence

import torch
from torch import nn

from camex.merging import domain_vectors
from camex.moe.merged import MergedExpertLinear
from camex.moe.units import Routing

# The MLflow keys (camex/report/layout.py reads the same names; tests/test_diagnostics.py checks it).
KEYS = (
    "curvature_operator_change_median",
    "curvature_operator_change_max",
    "curvature_tau_ratio_mean",
    "curvature_merged_change_mean",
    "curvature_merged_change_max",
)


def _gram(a: Sequence[torch.Tensor], b: Sequence[torch.Tensor]) -> torch.Tensor:
    """`[n, len(a), len(b)]`: Frobenius inner products of per-expert matrices `[n, d, d]`."""
    return torch.einsum("anij,bnij->nab", torch.stack(list(a)), torch.stack(list(b)))


def operator_relative_change(factors: Sequence[torch.Tensor], initial: Sequence[torch.Tensor]) -> torch.Tensor:
    """`‖M_i − M_i(0)‖_F / ‖M_i(0)‖_F` per expert, `[n]`, for Kronecker-factored operators.

    `factors` and `initial`: one `[r, n, d_k, d_k]` tensor per mode, `M_i = Σ_ρ ⊗_k F_ρik`. The
    Frobenius inner product of two Kronecker products is the product of the factors' inner
    products, so both norms are sums over pairs of terms. The difference is written as a sum of
    Kronecker products, `⊗_k F_k − ⊗_k F⁰_k = Σ_k F⁰_<k ⊗ (F_k − F⁰_k) ⊗ F_>k`, so a small change
    is not lost to cancellation; float64 throughout.
    """
    cur = [f.detach().double() for f in factors]
    ini = [f.detach().double() for f in initial]
    m, r = len(cur), cur[0].shape[0]
    # term (ρ, k) of the difference, per mode j: F⁰ before mode k, the change at k, F after it
    terms = [[ini[j][rho] if j < k else (cur[j][rho] - ini[j][rho]) if j == k else cur[j][rho] for j in range(m)]
             for rho in range(r) for k in range(m)]  # fmt: skip
    diff = torch.ones(cur[0].shape[1], len(terms), len(terms), dtype=torch.float64, device=cur[0].device)
    ref = torch.ones(cur[0].shape[1], r, r, dtype=torch.float64, device=cur[0].device)
    for j in range(m):
        by_term = [t[j] for t in terms]
        diff = diff * _gram(by_term, by_term)
        ref = ref * _gram(ini[j], ini[j])
    return (diff.sum((1, 2)).clamp(min=0) / ref.sum((1, 2))).sqrt()


def merged_change_terms(
    base: torch.Tensor, curved: torch.Tensor, euclid: torch.Tensor, scores: torch.Tensor, alpha: float
) -> tuple[float, float]:
    """`(Σ_u ‖Ê_CA,u − Ê_E,u‖², Σ_u ‖Ê_E,u‖²)` with `Ê_u = base + α Σ_i s_ui γ_i`, from `[n, n]`
    Gram matrices of the deltas: no `[units, O, I]` tensor is formed."""
    n = curved.shape[0]
    s = scores.detach().double()
    d = (curved - euclid).detach().reshape(n, -1).double()
    e = euclid.detach().reshape(n, -1).double()
    b = base.detach().reshape(-1).double()
    num = alpha**2 * ((s @ (d @ d.T)) * s).sum()
    den = s.shape[0] * (b @ b) + 2 * alpha * (s @ (e @ b)).sum() + alpha**2 * ((s @ (e @ e.T)) * s).sum()
    return float(num), float(den)


def _base(layer: MergedExpertLinear) -> torch.Tensor:
    return layer.chain.link(layer.chain_index).base_weight if layer.chain is not None else layer.base_weight


def _euclidean(layer: MergedExpertLinear, taus: torch.Tensor) -> torch.Tensor:
    """The layer's `γ̃_i` with the curvature replaced by the identity (the mask kept)."""
    mask = layer.mask.entries(taus, layer.training)
    return taus if mask is None else taus * mask


class CurvatureProbe:
    """The diagnostic of one model's curvature-aware layers. Create it before training: it keeps
    each operator's factors at that moment as `M_i(0)`."""

    def __init__(self, model: nn.Module) -> None:
        self.layers = [m for m in model.modules() if isinstance(m, MergedExpertLinear) and m.curvature is not None]
        self.initial = {id(m): [f.detach().clone() for f in m.curvature.weight_factors] for m in self.layers}

    def __bool__(self) -> bool:
        return bool(self.layers)

    @torch.no_grad()
    def measure(self, forward: Callable[[], object]) -> dict[str, float]:
        """All `KEYS`; `forward()` runs the model on one batch (in eval mode, for the merge)."""
        if not self.layers:
            return {}
        changes, ratios = [], []
        for layer in self.layers:
            changes += operator_relative_change(list(layer.curvature.weight_factors), self.initial[id(layer)]).tolist()
            base = _base(layer).double()
            taus = domain_vectors(layer.expert_weight, _base(layer)).double()
            ratios += (taus.flatten(1).norm(dim=1) / base.norm()).tolist()
        merged = self._merged_changes(forward)
        return {
            KEYS[0]: statistics.median(changes),
            KEYS[1]: max(changes),
            KEYS[2]: statistics.fmean(ratios),
            KEYS[3]: statistics.fmean(merged) if merged else float("nan"),
            KEYS[4]: max(merged) if merged else float("nan"),
        }

    def _merged_changes(self, forward: Callable[[], object]) -> list[float]:
        routed: dict[int, Routing] = {}  # the last routing each layer's own router produced
        sums: dict[int, list[float]] = {id(m): [0.0, 0.0] for m in self.layers}

        def keep_routing(router, args, output):
            routed[id(router)] = output

        def measure(layer, args, output):
            routing = routed.get(id(layer.router)) if layer.router is not None else layer.shared.routing
            if routing is None:
                return
            base = _base(layer)
            taus = domain_vectors(layer.expert_weight, base)
            scores = layer.mask.scores(routing.scores, layer.training)
            num, den = merged_change_terms(base, layer.transform(taus), _euclidean(layer, taus), scores, layer.alpha)
            sums[id(layer)][0] += num
            sums[id(layer)][1] += den

        handles = [m.router.register_forward_hook(keep_routing) for m in self.layers if m.router is not None]
        handles += [m.register_forward_hook(measure) for m in self.layers]
        try:
            forward()
        finally:
            for handle in handles:
                handle.remove()
        return [(num / den) ** 0.5 for num, den in sums.values() if den > 0]
