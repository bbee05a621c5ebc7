"""Tests of one row against another over seeds: paired where the runs share seeds, Welch where not.

A curvature-aware run and its Euclidean twin (and any row and Dense) with the same seed share the
initialisation and the data order, so their difference is measured per seed: the mean of the
per-seed differences with a 95 % t interval, the paired t-test and the exact sign test. Welch's
unpaired test is used only where the runs cannot be paired (different or repeated seeds). Within
one family of tests (one table) the t-test p-values are Holm-adjusted (`holm`); the marks come
from the adjusted values. Reusable on their own: `compare(a, b)` on two `Stat`s, `holm(ps)`.
"""

from __future__ import annotations

import math
import statistics
from collections.abc import Sequence
from dataclasses import dataclass, replace
from typing import Literal

from scipy import stats

from camex.report.aggregate import Stat

LEVELS = ((0.01, "**"), (0.05, "*"))  # marks in the tables: Holm-adjusted p < 0.01, p < 0.05
CONFIDENCE = 0.95
Kind = Literal["paired", "welch", "identical", "n/a"]
KIND_MARK = {"paired": "ᵖ", "welch": "ʷ"}  # which test a mark comes from, after the mark


@dataclass(frozen=True)
class Comparison:
    """Row `a` minus row `b` over seeds.

    `kind`: `paired` (seeds matched one to one), `welch` (unpairable), `identical` (paired and
    bit-identical on every seed: no test), `n/a` (fewer than 2 runs/pairs on a side).
    `differences` are the per-seed `a − b` (paired only), `ci` the 95 % t interval of the mean
    difference, `p` the two-sided t-test p-value, `p_sign` the exact two-sided sign test
    (ties dropped; paired only), `p_holm` the Holm-adjusted `p` within its family (set by
    `holm_adjust`).
    """

    kind: Kind
    difference: float | None  # mean of a − b (paired: mean of the per-seed differences)
    n: int  # pairs (paired/identical) or min(n_a, n_b)
    n_a: int
    n_b: int
    differences: tuple[float, ...] = ()
    seeds: tuple[str, ...] = ()
    ci: tuple[float, float] | None = None
    t: float | None = None
    p: float | None = None
    p_sign: float | None = None
    p_holm: float | None = None
    reason: str = ""

    @property
    def wins(self) -> int:
        """Pairs with a > b."""
        return sum(d > 0 for d in self.differences)

    @property
    def losses(self) -> int:
        return sum(d < 0 for d in self.differences)

    @property
    def ties(self) -> int:
        return sum(d == 0 for d in self.differences)

    @property
    def mark(self) -> str:
        """`identical`, `n/a`, or `**`/`*`/`ns` (from the Holm-adjusted p where set) + the test's letter."""
        if self.kind in ("identical", "n/a"):
            return self.kind
        p = self.p_holm if self.p_holm is not None else self.p
        if p is None:
            return ""
        level = next((mark for cut, mark in LEVELS if p < cut), "ns")
        return level + KIND_MARK[self.kind]


def t_interval(values: Sequence[float], confidence: float = CONFIDENCE) -> tuple[float, float] | None:
    """The t confidence interval of the mean of `values` (None below 2 values)."""
    n = len(values)
    if n < 2:
        return None
    mean, sd = math.fsum(values) / n, statistics.stdev(values)
    half = float(stats.t.ppf(0.5 + confidence / 2, n - 1)) * sd / math.sqrt(n)
    return mean - half, mean + half


def sign_test(differences: Sequence[float]) -> float | None:
    """Exact two-sided sign test of the median difference being 0, ties dropped (None: all ties)."""
    wins, losses = sum(d > 0 for d in differences), sum(d < 0 for d in differences)
    if wins + losses == 0:
        return None
    return float(stats.binomtest(wins, wins + losses, 0.5).pvalue)


def pair_by_seed(a: Stat, b: Stat) -> list[tuple[str, float, float]] | None:
    """`(seed, a, b)` for the seeds both sides ran, or None when the runs cannot be paired:
    a seed repeated on a side, or seeds that differ between the sides."""
    if len(set(a.seeds)) != a.n or len(set(b.seeds)) != b.n or set(a.seeds) != set(b.seeds):
        return None
    other = dict(zip(b.seeds, b.values))
    return [(seed, value, other[seed]) for seed, value in zip(a.seeds, a.values)]


def paired(pairs: Sequence[tuple[str, float, float]]) -> Comparison:
    """Paired analysis of `(seed, a, b)` triples."""
    seeds = tuple(s for s, _, _ in pairs)
    diffs = tuple(x - y for _, x, y in pairs)
    n = len(diffs)
    mean = math.fsum(diffs) / n if n else None
    base = Comparison("paired", mean, n, n, n, diffs, seeds)
    if n and all(x == y for _, x, y in pairs):
        return replace(base, kind="identical", reason="bit-identical on every seed")
    if n < 2:
        return replace(base, kind="n/a", reason="needs >= 2 seeds on both sides")
    base = replace(base, ci=t_interval(diffs), p_sign=sign_test(diffs))
    if statistics.stdev(diffs) == 0:
        return replace(base, reason="the same difference on every seed: t undefined")
    result = stats.ttest_rel([x for _, x, _ in pairs], [y for _, _, y in pairs])
    return replace(base, t=float(result.statistic), p=float(result.pvalue))


def welch(a: Stat, b: Stat) -> Comparison:
    """Welch's unpaired t-test (for runs that cannot be paired)."""
    difference = a.mean - b.mean
    base = Comparison("welch", difference, min(a.n, b.n), a.n, b.n)
    if a.n < 2 or b.n < 2:
        return replace(base, kind="n/a", reason="needs >= 2 seeds on both sides")
    if a.std == 0 and b.std == 0:
        return replace(base, reason="no spread over seeds on either side")
    result = stats.ttest_ind(a.values, b.values, equal_var=False)
    t, p = float(result.statistic), float(result.pvalue)
    if not (math.isfinite(t) and math.isfinite(p)):
        return replace(base, reason="test undefined for these values")
    df = float(result.df)
    se = math.sqrt(a.std**2 / a.n + b.std**2 / b.n)
    half = float(stats.t.ppf(0.5 + CONFIDENCE / 2, df)) * se
    return replace(base, t=t, p=p, ci=(difference - half, difference + half))


def compare(a: Stat, b: Stat) -> Comparison:
    """`a − b`: paired by seed where possible, else Welch."""
    pairs = pair_by_seed(a, b)
    return paired(pairs) if pairs is not None else welch(a, b)


def holm(pvalues: Sequence[float | None]) -> list[float | None]:
    """Holm's step-down adjusted p-values (None entries are not tests and stay None)."""
    tested = sorted((p, i) for i, p in enumerate(pvalues) if p is not None)
    m = len(tested)
    out: list[float | None] = [None] * len(pvalues)
    running = 0.0
    for rank, (p, i) in enumerate(tested):
        running = max(running, min(1.0, (m - rank) * p))
        out[i] = running
    return out


def holm_adjust(comparisons: Sequence[Comparison]) -> list[Comparison]:
    """The same comparisons with `p_holm` set, Holm's correction taken over all of them."""
    adjusted = holm([c.p for c in comparisons])
    return [replace(c, p_holm=p) for c, p in zip(comparisons, adjusted)]


# --------------------------------------------------------------------- verdicts on published cells

Verdict = Literal["reproduced", "above", "below", "not enough seeds"]


def verdict(stat: Stat | None, published: float) -> tuple[Verdict, tuple[float, float] | None]:
    """Where the paper's value lies against the 95 % t interval of the reproduced seeds:
    inside it (ends included) `reproduced`; the reproduction `above` or `below` the paper;
    fewer than 2 seeds `not enough seeds`. Returns the verdict and the interval."""
    ci = t_interval(stat.values) if stat is not None else None
    if ci is None:
        return "not enough seeds", None
    low, high = ci
    if low <= published <= high:
        return "reproduced", ci
    return ("above" if low > published else "below"), ci
