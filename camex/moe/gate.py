"""Noisy top-k gate with the load-balancing loss (Shazeer et al. 2017; SPEC §5)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


def cv_squared(v: torch.Tensor) -> torch.Tensor:
    """Squared coefficient of variation `Var(v) / (mean(v)² + 1e-10)` (0 for a single entry)."""
    if v.numel() < 2:
        return v.new_zeros(())
    return v.float().var() / (v.float().mean() ** 2 + 1e-10)


def _normal_cdf(z: torch.Tensor) -> torch.Tensor:
    """Standard normal CDF (what `torch.distributions.Normal(0, 1).cdf` computes, without building
    a distribution object on every call, which `torch.compile` cannot trace)."""
    return 0.5 * (1.0 + torch.erf(z * 0.5**0.5))


class NoisyTopKGate(nn.Module):
    """Scores `[units, n]` for pooled unit inputs `[units, d]`; rows sum to one.

    Training adds `ε · (softplus(u W_noise) + 0.01)` to the logits `u W_g`; the top-k logits are
    softmaxed and the rest are zero. Each call adds its load-balancing loss to `pending_aux`,
    which the model-level hook collects once per forward pass.
    """

    def __init__(
        self, *, in_features: int, num_experts: int, top_k: int, noisy: bool = True, aux_coef: float = 0.01
    ) -> None:
        super().__init__()
        if not 1 <= top_k <= num_experts:
            raise ValueError(f"top_k must lie in [1, {num_experts}], got {top_k}")
        self.num_experts, self.top_k, self.noisy, self.aux_coef = num_experts, top_k, noisy, aux_coef
        self.w_gate = nn.Parameter(torch.randn(in_features, num_experts) * 0.02)
        self.w_noise = nn.Parameter(torch.randn(in_features, num_experts) * 0.02)
        self.pending_aux: torch.Tensor | None = None

    def forward(self, u: torch.Tensor) -> torch.Tensor:
        # Routing runs in at least fp32 whatever the input's dtype or autocast: top-k choices and
        # the softmax are sensitive to rounding, the gate is tiny, and the scores feed the merge,
        # which accumulates in the parameters' dtype.
        dtype = torch.promote_types(self.w_gate.dtype, torch.float32)
        with torch.autocast(u.device.type, enabled=False):
            return self._route(u.to(dtype))

    def _route(self, u: torch.Tensor) -> torch.Tensor:
        clean = u @ self.w_gate.to(u.dtype)
        noisy = self.training and self.noisy
        if noisy:
            std = F.softplus(u @ self.w_noise.to(u.dtype)) + 0.01
            logits = clean + torch.randn_like(clean) * std
        else:
            logits = clean
        k, n = self.top_k, self.num_experts
        top_val, top_idx = logits.topk(min(k + 1, n), dim=-1)
        weights = torch.softmax(top_val[:, :k], dim=-1)
        scores = torch.zeros_like(logits).scatter(-1, top_idx[:, :k], weights)

        if k < n and noisy:
            load = self._prob_in_top_k(clean, logits, std, top_val).sum(0)
        else:
            load = (scores > 0).sum(0).to(scores.dtype)
        aux = self.aux_coef * (cv_squared(scores.sum(0)) + cv_squared(load))
        self.pending_aux = aux if self.pending_aux is None else self.pending_aux + aux
        return scores

    def _prob_in_top_k(self, clean, noisy, std, top_val) -> torch.Tensor:
        """Smooth load: probability, under fresh noise, that each expert lands in the top k."""
        k = self.top_k
        threshold_in = top_val[:, k : k + 1]  # the competitor an expert inside the top k must beat
        threshold_out = top_val[:, k - 1 : k]  # the k-th value an expert outside must beat
        is_in = noisy > threshold_in
        p_in = _normal_cdf((clean - threshold_in) / std)
        p_out = _normal_cdf((clean - threshold_out) / std)
        return torch.where(is_in, p_in, p_out)

    def pop_aux(self) -> torch.Tensor | None:
        aux, self.pending_aux = self.pending_aux, None
        return aux
