"""Welch's t-test of a curvature-aware row against its Euclidean twin, over seeds."""

from __future__ import annotations

import math
from dataclasses import dataclass

from scipy import stats

from camex.report.aggregate import Stat

LEVELS = ((0.01, "**"), (0.05, "*"))  # marks in the tables: p < 0.01, p < 0.05


@dataclass(frozen=True)
class Welch:
    """CA minus twin over seeds: the difference of means, Welch's t and its two-sided p-value."""

    difference: float
    t: float | None
    p: float | None
    n_ca: int
    n_twin: int
    reason: str = ""  # why no p-value (too few seeds, no spread)

    @property
    def mark(self) -> str:
        if self.p is None:
            return ""
        for level, mark in LEVELS:
            if self.p < level:
                return mark
        return "ns"


def welch(ca: Stat, twin: Stat) -> Welch:
    difference = ca.mean - twin.mean
    if ca.n < 2 or twin.n < 2:
        return Welch(difference, None, None, ca.n, twin.n, "needs >= 2 seeds on both sides")
    if ca.std == 0 and twin.std == 0:
        return Welch(difference, None, None, ca.n, twin.n, "no spread over seeds on either side")
    result = stats.ttest_ind(ca.values, twin.values, equal_var=False)
    t, p = float(result.statistic), float(result.pvalue)
    if not (math.isfinite(t) and math.isfinite(p)):
        return Welch(difference, None, None, ca.n, twin.n, "test undefined for these values")
    return Welch(difference, t, p, ca.n, twin.n)
