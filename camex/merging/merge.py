"""Domain vectors and the merge rule `Ê = E_m + α Σ_i s_i γ̃_i` (SPEC §2)."""

from __future__ import annotations

import torch


def domain_vectors(experts: torch.Tensor, base: torch.Tensor) -> torch.Tensor:
    """`τ_i = E_i − E_m` for experts `[n, *shape]` around a base `[*shape]`."""
    return experts - base.unsqueeze(0)


def merge_flat(base: torch.Tensor, deltas: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
    """One merged tensor per routed unit.

    `base` is `[*shape]`, `deltas` `[n, *shape]` (already masked, curved and scaled by α),
    `scores` `[units, n]`. Returns `[units, *shape]`. The rule is linear in the scores, so it is a
    single `[units, n] @ [n, prod(shape)]` product: no `[units, n, *shape]` tensor is formed.
    """
    shape = base.shape
    flat = torch.addmm(base.reshape(1, -1), scores.to(deltas.dtype), deltas.reshape(deltas.shape[0], -1))
    return flat.view(scores.shape[0], *shape)
