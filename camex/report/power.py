"""Power of the paired t-test: the smallest effect a pre-registered experiment can detect.

A paired two-sided t-test on n per-seed differences has n − 1 degrees of freedom; when the true
mean difference is d standard deviations of the differences, its statistic follows a noncentral
t with noncentrality d·√n. `power(d, n)` is the probability of rejecting at level α, and
`detectable_effect(n)` the d reached at the wanted power (80 %). `planning_sd` turns that into
metric units with the seed-to-seed SD of paired differences seen in an earlier run (a planning
estimate only).

    python -m camex.report.power --runs reports/cpu_mini/runs.csv --model small_gpt2 --n 6
"""

from __future__ import annotations

import argparse
import csv
import math
import statistics
import sys
from collections.abc import Sequence
from pathlib import Path

from scipy import optimize, stats

# (Euclidean, curvature-aware) row pairs compared per seed
PAIRS = (("domain", "camex"), ("ties", "camex_ties"))


def power(d: float, n: int, alpha: float = 0.05) -> float:
    """Probability that the two-sided paired t-test on n pairs rejects when the standardized mean
    difference (mean / SD of the differences) is d."""
    if n < 2:
        raise ValueError(f"n = {n}: a paired t-test needs at least 2 pairs")
    df, ncp = n - 1, d * math.sqrt(n)
    crit = stats.t.ppf(1 - alpha / 2, df)
    upper, lower = stats.nct.sf(crit, df, abs(ncp)), stats.nct.cdf(-crit, df, abs(ncp))
    # scipy's nct returns NaN for some far-tail values that underflow: there the tail is ~0
    return float((0.0 if math.isnan(upper) else upper) + (0.0 if math.isnan(lower) else lower))


def detectable_effect(n: int, alpha: float = 0.05, target: float = 0.8) -> float:
    """The standardized paired effect d at which the two-sided paired t-test has power `target`."""
    if not 0 < alpha < target < 1:
        raise ValueError(f"need 0 < alpha ({alpha}) < target power ({target}) < 1")
    hi = 1.0
    while power(hi, n, alpha) < target:  # bracket the root
        hi *= 2
    return float(optimize.brentq(lambda d: power(d, n, alpha) - target, 0.0, hi, xtol=1e-10))


def paired_differences(runs_csv: Path, model: str, metric: str = "final_nll") -> dict[str, list[float]]:
    """'<CA> − <Euclid>' -> per-seed differences of `metric` for the `model` rows of a report's runs.csv."""
    values: dict[tuple[str, str], float] = {}
    with runs_csv.open() as fh:
        for row in csv.DictReader(fh):
            if row["model"] == model and row.get(metric):
                values[(row["merge"], row["seed"])] = float(row[metric])
    out: dict[str, list[float]] = {}
    for euclid, ca in PAIRS:
        seeds = sorted({s for m, s in values if m == euclid} & {s for m, s in values if m == ca})
        if seeds:
            out[f"{ca} − {euclid}"] = [values[(ca, s)] - values[(euclid, s)] for s in seeds]
    return out


def planning_sd(differences: dict[str, Sequence[float]]) -> float:
    """Pooled SD of the paired differences over the row pairs (each pair around its own mean)."""
    groups = [list(v) for v in differences.values() if len(v) > 1]
    if not groups:
        raise ValueError("no row pair with 2 or more seeds: cannot estimate the SD of paired differences")
    ss = sum(statistics.variance(g) * (len(g) - 1) for g in groups)
    return math.sqrt(ss / sum(len(g) - 1 for g in groups))


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--n", type=int, default=6, help="pairs (seeds) per comparison")
    p.add_argument("--alpha", type=float, default=0.05)
    p.add_argument("--power", type=float, default=0.8)
    p.add_argument("--runs", type=Path, default=None, help="a report's runs.csv for the planning SD")
    p.add_argument("--model", default="small_gpt2")
    p.add_argument("--metric", default="final_nll")
    args = p.parse_args(argv)
    if args.n < 2:
        print(f"error: --n {args.n}: a paired t-test needs at least 2 pairs", file=sys.stderr)
        return 2
    if args.runs is not None and not args.runs.is_file():
        print(f"error: --runs {args.runs}: no such file (a report's runs.csv is expected)", file=sys.stderr)
        return 2
    d = detectable_effect(args.n, args.alpha, args.power)
    print(f"detectable standardized paired effect d = {d:.3f} (n = {args.n} pairs, two-sided "
          f"alpha = {args.alpha}, power = {args.power})")  # fmt: skip
    if args.runs is not None:
        diffs = paired_differences(args.runs, args.model, args.metric)
        for name, values in diffs.items():
            sd = statistics.stdev(values) if len(values) > 1 else float("nan")
            print(f"  {name}: n = {len(values)}, mean = {statistics.mean(values):+.6f}, SD = {sd:.6f}")
        sd = planning_sd(diffs)
        print(f"pooled SD of paired differences ({args.metric}, {args.model}) = {sd:.6f}: "
              f"detectable mean difference = {d * sd:.6f} nats")  # fmt: skip
    return 0


if __name__ == "__main__":
    sys.exit(main())
