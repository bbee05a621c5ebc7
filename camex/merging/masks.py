"""Masks applied to domain vectors (SPEC §3).

Two families, each in its released-code form and its reference form:

* TIES. Released: keep `τ_i` where its sign equals the sign of `Σ_j τ_j` (election by mass), no
  trimming, no disjoint mean. Reference (Yadav et al. 2023): trim each `τ_i` to its largest
  magnitudes, elect the sign by mass with zero sums going to the majority sign, keep entries that
  agree strictly, and average the kept entries disjointly (`ties_merge`).
* DARE. Released: drop a whole expert per routed unit (dropout over the expert axis of the
  scores). Reference (Yu et al. 2024): element-wise Bernoulli drop of `τ_i`.

Every mask is a constant: no gradient flows through the choice of entries.
"""

from __future__ import annotations

import math

import torch


def _trim(taus: torch.Tensor, trim: float) -> torch.Tensor:
    """Zero the `trim` fraction of smallest-magnitude entries of each `τ_i` (ties broken by order)."""
    if not 0.0 <= trim < 1.0:
        raise ValueError(f"ties trim fraction must lie in [0, 1), got {trim}")
    flat = taus.reshape(taus.shape[0], -1)
    keep = flat.shape[1] - math.floor(trim * flat.shape[1] + 1e-9)  # 0.29 * 100 is 28.999...
    if keep == flat.shape[1]:
        return taus
    top = flat.abs().topk(keep, dim=1).indices
    kept = torch.zeros_like(flat, dtype=torch.bool).scatter_(1, top, True)
    return (flat * kept).view_as(taus)


def ties_elect_sign(taus: torch.Tensor, *, resolve_zero: bool) -> torch.Tensor:
    """Elected sign per entry: `sign(Σ_i τ_i)`.

    With `resolve_zero` (reference TIES) an entry whose mass sums to zero takes the majority sign,
    the sign of the sum of all elected signs (positive when that is zero too).
    """
    elected = torch.sign(taus.sum(dim=0))
    if resolve_zero:
        majority = 1.0 if elected.sum() >= 0 else -1.0
        elected = torch.where(elected == 0, torch.full_like(elected, majority), elected)
    return elected


@torch.no_grad()
def ties_mask(taus: torch.Tensor, trim: float | None = None) -> torch.Tensor:
    """0/1 mask of the TIES entries of `taus` `[n, *shape]` to keep.

    `trim=None` is the released rule `1[sign(τ_i) == sign(Σ_j τ_j)]`. A float is the reference
    rule: trim that fraction of each `τ_i`, elect signs on the trimmed vectors (zero sums go to
    the majority sign) and keep the surviving entries whose sign agrees strictly.
    """
    if trim is None:
        return (torch.sign(taus) == torch.sign(taus.sum(dim=0))).to(taus.dtype)
    trimmed = _trim(taus, trim)
    elected = ties_elect_sign(trimmed, resolve_zero=True)
    agree = torch.sign(trimmed) * elected > 0
    return agree.to(taus.dtype)


def ties_merge(taus: torch.Tensor, trim: float | None = 0.8) -> torch.Tensor:
    """Reference TIES-Merging of `taus` `[n, *shape]` into one vector: trim, elect, disjoint mean."""
    kept = taus * ties_mask(taus, trim)
    count = (kept != 0).sum(dim=0).clamp(min=1)
    return kept.sum(dim=0) / count


def _check_p(p: float) -> None:
    if not 0.0 <= p < 1.0:
        raise ValueError(f"DARE drop rate must lie in [0, 1), got {p}")


def dare_expert_mask(
    units: int, n: int, p: float, *, generator: torch.Generator | None = None, device=None, dtype=None
) -> torch.Tensor:
    """Released DARE: keep each expert of each routed unit with probability `1 − p`, rescaled.

    Returns `[units, n]`, to be multiplied into the routing scores; merging is linear in the
    scores, so this drops the expert's whole contribution for that unit.
    """
    _check_p(p)
    keep = torch.rand(units, n, generator=generator, device=device) >= p
    return keep.to(dtype or torch.get_default_dtype()) / (1.0 - p)


def dare_element_mask(like: torch.Tensor, p: float, *, generator: torch.Generator | None = None) -> torch.Tensor:
    """Reference DARE: element-wise keep with probability `1 − p`, rescaled by `1/(1 − p)`."""
    _check_p(p)
    keep = torch.rand(like.shape, generator=generator, device=like.device) >= p
    return keep.to(like.dtype) / (1.0 - p)
