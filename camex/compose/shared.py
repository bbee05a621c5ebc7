"""Merging the shared (non-FFN) weights of several fine-tunes of one base (MERGEME.md §2).

Task vectors are `τ_i = θ_i − θ_base`. Per tensor:

* `base`: `θ_base` (the experts' changes are dropped).
* `mean` (BTX): the unweighted mean of the experts, `θ_base + mean_i τ_i`.
* `task_arithmetic`: `θ_base + λ Σ_i τ_i`.
* `ties`: keep the top `keep` fraction of each `τ_i` by magnitude, elect each entry's sign by mass,
  keep the entries that agree (`camex.merging.ties_mask`, the reference rule); then the disjoint
  **sum** (MergeME) or the disjoint **mean** (reference TIES, `disjoint="mean"`), added with `λ`.
* `dare`: drop each entry of each `τ_i` with probability `1 − keep`, rescale survivors by
  `1/keep` (`camex.merging.dare_element_mask`), sum, add with `λ`.

MergeME's defaults: `λ = 1/3`, `keep = 0.8`.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Literal

import torch

from camex.merging import dare_element_mask, ties_merge
from camex.merging.masks import ties_mask

Method = Literal["base", "mean", "task_arithmetic", "ties", "dare"]
METHODS = ("base", "mean", "task_arithmetic", "ties", "dare")
DISJOINT = ("sum", "mean")


@dataclass(frozen=True)
class SharedMerge:
    method: Method = "mean"
    lam: float = 1.0 / 3.0  # λ: scale of the merged task vector (task_arithmetic, ties, dare)
    keep: float = 0.8  # p: fraction of each τ_i kept (ties: by magnitude; dare: at random)
    disjoint: Literal["sum", "mean"] = "sum"  # ties: MergeME's disjoint sum or the reference mean
    seed: int = 0  # dare's drop pattern

    def __post_init__(self) -> None:
        if self.method not in METHODS:
            raise ValueError(f"compose.shared.method={self.method!r} is not one of {list(METHODS)}")
        if self.disjoint not in DISJOINT:
            raise ValueError(f"compose.shared.disjoint={self.disjoint!r} is not one of {list(DISJOINT)}")
        if isinstance(self.keep, bool) or not isinstance(self.keep, (int, float)) or not 0.0 < self.keep <= 1.0:
            raise ValueError(f"compose.shared.keep={self.keep!r} is invalid; allowed: a number in (0, 1]")
        if isinstance(self.lam, bool) or not isinstance(self.lam, (int, float)):
            raise ValueError(f"compose.shared.lam={self.lam!r} is invalid; allowed: a number")

    def as_dict(self) -> dict:
        return asdict(self)


def merge_task_vectors(
    base: torch.Tensor, taus: torch.Tensor, spec: SharedMerge, *, generator: torch.Generator | None = None
) -> torch.Tensor:
    """The merged tensor from `base` `[*shape]` and the task vectors `taus` `[n, *shape]`."""
    if spec.method == "base":
        return base.clone()
    if spec.method == "mean":
        return base + taus.mean(dim=0)
    if spec.method == "task_arithmetic":
        return base + spec.lam * taus.sum(dim=0)
    if spec.method == "ties":
        trim = 1.0 - spec.keep
        if spec.disjoint == "mean":
            return base + spec.lam * ties_merge(taus, trim)
        return base + spec.lam * (taus * ties_mask(taus, trim)).sum(dim=0)
    kept = torch.stack([t * dare_element_mask(t, 1.0 - spec.keep, generator=generator) for t in taus])
    return base + spec.lam * kept.sum(dim=0)
