"""The pre-registered analysis of experiment=prereg_lm (+ prereg_lm_control), as docs/prereg_cpu.md
fixes it before the runs.

H1, per row pair (Domain-specific vs -CA, Ties vs -CA): curvature-aware minus Euclidean eval NLL,
paired by seed; primary endpoint the last step's NLL (`final_nll`), secondary the mean of the eval
NLL over the evaluations (speed of convergence). Paired t-test and exact sign test, two-sided;
Holm over the two row pairs within each endpoint. H2: the same CA runs minus the Euclidean rows
at learning rate × 1.2 (the control shares seeds 0-2 with them, so it is paired by seed too).

    python -m camex.report.prereg --tracking-uri sqlite:///outputs/prereg_cpu/mlflow.db --out reports/prereg_cpu
"""

from __future__ import annotations

import argparse
import math
import sys
from collections.abc import Callable, Sequence
from pathlib import Path

from camex.report.aggregate import Stat
from camex.report.collect import CollectError, Run, client, collect_runs, metric_history, normalise_uri
from camex.report.power import PAIRS
from camex.report.significance import Comparison, holm_adjust, pair_by_seed, paired

ALPHA = 0.05
MAIN, CONTROL = "prereg_lm", "prereg_lm_control"
History = Callable[[str], list[tuple[int, float]]]  # run id -> (step, eval NLL)


def _stat(runs: Sequence[Run], value: Callable[[Run], float | None], seeds: set[str] | None = None) -> Stat:
    kept = [(r, v) for r in runs if (seeds is None or r.seed in seeds) and (v := value(r)) is not None]
    kept = [(r, v) for r, v in kept if math.isfinite(v)]
    return Stat(tuple(v for _, v in kept), tuple(r.seed for r, _ in kept), tuple(r.run_id for r, _ in kept))


def _mean_eval(history: History) -> Callable[[Run], float | None]:
    def value(run: Run) -> float | None:
        points = history(run.run_id)
        return math.fsum(v for _, v in points) / len(points) if points else None

    return value


def _final(run: Run) -> float | None:
    return run.metrics.get("final_nll")


def _test(a: Stat, b: Stat) -> Comparison:
    pairs = pair_by_seed(a, b)
    if pairs is None:  # the design pairs every row by seed: anything else is a broken experiment
        return Comparison("n/a", None, 0, a.n, b.n, reason=f"seeds do not pair: {sorted(a.seeds)} vs {sorted(b.seeds)}")
    return paired(pairs)


def decision(c: Comparison, alpha: float = ALPHA) -> str:
    """The pre-registered reading of one comparison (CA − Euclidean NLL: negative favours CA)."""
    if c.kind == "identical":
        return "no effect: bit-identical on every seed"
    if c.p_holm is None or c.ci is None or c.difference is None:
        return f"not testable ({c.reason or 'too few pairs'})"
    lo, hi = c.ci
    if c.p_holm < alpha:
        return ("CA lower (supports the hypothesis)" if c.difference < 0 else "CA higher (against the hypothesis)") + (
            f": Δ = {c.difference:+.5f} nats, 95 % CI [{lo:+.5f}, {hi:+.5f}]"
        )
    return f"no detectable effect: Δ = {c.difference:+.5f} nats, 95 % CI [{lo:+.5f}, {hi:+.5f}] bounds it"


def analyse(main: Sequence[Run], control: Sequence[Run], history: History) -> list[dict]:
    """One row per (hypothesis, endpoint, pair): the comparison and its pre-registered decision."""
    by_merge: dict[str, list[Run]] = {}
    for run in main:
        by_merge.setdefault(run.merge, []).append(run)
    ctrl: dict[str, list[Run]] = {}
    for run in control:
        ctrl.setdefault(run.merge, []).append(run)
    rows: list[dict] = []
    endpoints = (("primary: last-step NLL", _final), ("secondary: mean NLL over evaluations", _mean_eval(history)))
    for endpoint, value in endpoints:
        for hypothesis in ("H1", "H2"):
            family = []
            for euclid, ca in PAIRS:
                if hypothesis == "H1":
                    b = _stat(by_merge.get(euclid, []), value)
                    a = _stat(by_merge.get(ca, []), value)
                    label = f"{ca} − {euclid}"
                else:
                    b = _stat(ctrl.get(euclid, []), value)
                    a = _stat(by_merge.get(ca, []), value, seeds=set(b.seeds))
                    label = f"{ca} − {euclid} (lr × 1.2)"
                family.append((label, _test(a, b)))
            adjusted = holm_adjust([c for _, c in family])
            for (label, _), c in zip(family, adjusted):
                rows.append({"hypothesis": hypothesis, "endpoint": endpoint, "pair": label, "comparison": c,
                             "decision": decision(c)})  # fmt: skip
    return rows


def _p(p: float | None) -> str:
    return "–" if p is None else f"{p:.3g}"


def render(rows: list[dict]) -> str:
    lines = ["# Pre-registered analysis (docs/prereg_cpu.md)", "",
             "Δ = curvature-aware − Euclidean eval NLL (nats), per seed pair; negative favours CA. "
             "Paired t-test (Holm over the two row pairs per hypothesis and endpoint) and exact sign test, two-sided.",
             "", "| hypothesis | endpoint | pair | n | Δ mean | 95 % CI | p (t) | p (Holm) | p (sign) "
             "| CA lower/higher | decision |",
             "|---|---|---|---|---|---|---|---|---|---|---|"]  # fmt: skip
    for r in rows:
        c: Comparison = r["comparison"]
        ci = "–" if c.ci is None else f"[{c.ci[0]:+.5f}, {c.ci[1]:+.5f}]"
        diff = "–" if c.difference is None else f"{c.difference:+.5f}"
        lines.append(f"| {r['hypothesis']} | {r['endpoint']} | {r['pair']} | {c.n} | {diff} | {ci} | {_p(c.p)} | "
                     f"{_p(c.p_holm)} | {_p(c.p_sign)} | {c.losses}/{c.wins} | {r['decision']} |")  # fmt: skip
    lines += ["", "CA lower/higher: seed pairs where the curvature-aware run's NLL is lower / higher."]
    return "\n".join(lines) + "\n"


def write(uri: str, out: Path) -> Path:
    """Collect both arms from the MLflow store at `uri` and write `out`/prereg.md."""
    uri = normalise_uri(uri)
    mlflow_client = client(uri)
    runs = collect_runs(uri, [MAIN, CONTROL])
    main_runs = [r for r in runs if r.experiment == MAIN]
    control_runs = [r for r in runs if r.experiment == CONTROL]
    rows = analyse(main_runs, control_runs, lambda run_id: metric_history(mlflow_client, run_id, "eval_nll"))
    out.mkdir(parents=True, exist_ok=True)
    path = out / "prereg.md"
    path.write_text(render(rows))
    return path


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--tracking-uri", required=True, help="the MLflow store holding prereg_lm and prereg_lm_control")
    p.add_argument("--out", type=Path, required=True, help="report folder: prereg.md is written there")
    args = p.parse_args(argv)
    try:
        path = write(args.tracking_uri, args.out)
    except CollectError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print(path.read_text())
    return 0


if __name__ == "__main__":
    sys.exit(main())
