"""Mask strategies injected into a merged-expert layer (maths in `camex.merging.masks`).

A strategy may zero entries of the domain vectors (`entries`) and/or rescale routing scores
(`scores`); both are identity where the strategy does not act.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch

from camex.merging import dare_element_mask, dare_expert_mask, ties_mask


@dataclass(frozen=True)
class NoMask:
    def entries(self, taus: torch.Tensor, training: bool) -> torch.Tensor | None:
        return None

    def scores(self, scores: torch.Tensor, training: bool) -> torch.Tensor:
        return scores


@dataclass(frozen=True)
class TiesMask(NoMask):
    trim: float | None = None  # None: the released rule (no trimming)

    def entries(self, taus: torch.Tensor, training: bool) -> torch.Tensor | None:
        return ties_mask(taus, self.trim)


@dataclass(frozen=True)
class DareMask(NoMask):
    p: float = 0.1
    granularity: Literal["expert", "element"] = "expert"

    def entries(self, taus: torch.Tensor, training: bool) -> torch.Tensor | None:
        if training and self.granularity == "element" and self.p > 0:
            return dare_element_mask(taus, self.p)
        return None

    def scores(self, scores: torch.Tensor, training: bool) -> torch.Tensor:
        if training and self.granularity == "expert" and self.p > 0:
            units, n = scores.shape
            return scores * dare_expert_mask(units, n, self.p, device=scores.device, dtype=scores.dtype)
        return scores


def build_mask(kind: str, *, ties_trim: float | None, dare_p: float, dare_granularity: str) -> NoMask:
    if kind == "none":
        return NoMask()
    if kind == "ties":
        return TiesMask(ties_trim)
    if kind == "dare":
        return DareMask(dare_p, dare_granularity)
    raise ValueError(f"unknown mask {kind!r}; allowed: ['none', 'ties', 'dare']")
