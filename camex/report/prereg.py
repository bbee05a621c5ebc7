"""The pre-registered analysis of experiment=prereg_lm (+ prereg_lm_control), as docs/prereg_cpu.md
fixes it before the runs.

H1, per row pair (Domain-specific vs -CA, Ties vs -CA): curvature-aware minus Euclidean eval NLL,
paired by seed; primary endpoint the last step's NLL (`final_nll`), secondary the mean of the eval
NLL over the evaluations (speed of convergence). Paired t-test and exact sign test, two-sided;
Holm over the two row pairs within each endpoint. H2: the same CA runs minus the Euclidean rows
at learning rate × 1.2 (the control shares seeds 0-2 with them, so it is paired by seed too).
H3 (experiment=prereg_ft, the fine-tuning arm): Domain-specific-CA minus Domain-specific eval
accuracy on BBC News, paired by seed; primary the last step's accuracy, secondary the mean over the
evaluations. Manipulation checks: how far the curvature operators moved by the last step.

    python -m camex.report.prereg --tracking-uri sqlite:///outputs/prereg_cpu/mlflow.db --out reports/prereg_cpu
"""

from __future__ import annotations

import argparse
import math
import subprocess
import sys
from collections.abc import Callable, Sequence
from pathlib import Path

from camex.report.aggregate import Stat
from camex.report.collect import CollectError, Run, client, collect_runs, metric_history, normalise_uri
from camex.report.power import PAIRS
from camex.report.significance import Comparison, holm_adjust, pair_by_seed, paired

ALPHA = 0.05
MAIN, CONTROL, FINETUNE = "prereg_lm", "prereg_lm_control", "prereg_ft"
MOVED = "curvature_operator_change_median"  # ‖M − M₀‖ / ‖M₀‖ at the last evaluation (camex.moe.diagnostics)
# per arm: the merge pairs compared, the endpoint metric, its unit, whether lower is better, and the
# operator movement below which the arm cannot answer its question (registered in docs/prereg_cpu.md)
FT_PAIRS = (("domain", "camex"),)
CHECKS = {MAIN: 0.01, FINETUNE: 0.05}
History = Callable[[str, str], list[tuple[int, float]]]  # (run id, metric) -> (step, value)


def _stat(runs: Sequence[Run], value: Callable[[Run], float | None], seeds: set[str] | None = None) -> Stat:
    kept = [(r, v) for r in runs if (seeds is None or r.seed in seeds) and (v := value(r)) is not None]
    kept = [(r, v) for r, v in kept if math.isfinite(v)]
    return Stat(tuple(v for _, v in kept), tuple(r.seed for r, _ in kept), tuple(r.run_id for r, _ in kept))


def _mean_eval(history: History, key: str = "eval_nll") -> Callable[[Run], float | None]:
    def value(run: Run) -> float | None:
        points = history(run.run_id, key)
        return math.fsum(v for _, v in points) / len(points) if points else None

    return value


def _final(run: Run) -> float | None:
    return run.metrics.get("final_nll")


def _test(a: Stat, b: Stat) -> Comparison:
    pairs = pair_by_seed(a, b)
    if pairs is None:  # the design pairs every row by seed: anything else is a broken experiment
        return Comparison("n/a", None, 0, a.n, b.n, reason=f"seeds do not pair: {sorted(a.seeds)} vs {sorted(b.seeds)}")
    return paired(pairs)


def decision(c: Comparison, alpha: float = ALPHA, *, unit: str = "nats", lower_is_better: bool = True) -> str:
    """The pre-registered reading of one comparison (CA − Euclidean: for NLL negative favours CA,
    for accuracy positive does)."""
    if c.kind == "identical":
        return "no effect: bit-identical on every seed"
    if c.p_holm is None or c.ci is None or c.difference is None:
        return f"not testable ({c.reason or 'too few pairs'})"
    lo, hi = c.ci
    if c.p_holm < alpha:
        better = (c.difference < 0) == lower_is_better
        word = "lower" if c.difference < 0 else "higher"
        return f"CA {word} ({'supports' if better else 'against'} the hypothesis)" + (
            f": Δ = {c.difference:+.5f} {unit}, 95 % CI [{lo:+.5f}, {hi:+.5f}]"
        )
    return f"no detectable effect: Δ = {c.difference:+.5f} {unit}, 95 % CI [{lo:+.5f}, {hi:+.5f}] bounds it"


def _by_merge(runs: Sequence[Run]) -> dict[str, list[Run]]:
    out: dict[str, list[Run]] = {}
    for run in runs:
        out.setdefault(run.merge, []).append(run)
    return out


def analyse_finetune(runs: Sequence[Run], history: History) -> list[dict]:
    """H3: one row per endpoint (a single pair: Holm leaves its p as it is)."""
    by_merge = _by_merge(runs)
    rows: list[dict] = []
    endpoints = (("primary: last-step accuracy", lambda r: r.metrics.get("final_accuracy")),
                 ("secondary: mean accuracy over evaluations", _mean_eval(history, "eval_accuracy")))  # fmt: skip
    for endpoint, value in endpoints:
        for euclid, ca in FT_PAIRS:
            (c,) = holm_adjust([_test(_stat(by_merge.get(ca, []), value), _stat(by_merge.get(euclid, []), value))])
            rows.append({"hypothesis": "H3", "endpoint": endpoint, "pair": f"{ca} − {euclid}", "comparison": c,
                         "decision": decision(c, unit="accuracy", lower_is_better=False)})  # fmt: skip
    return rows


def operator_movement(runs: Sequence[Run]) -> dict[str, tuple[float, int]]:
    """merge -> (mean over its runs of ‖M − M₀‖/‖M₀‖ at the last evaluation, runs that logged it)."""
    out: dict[str, tuple[float, int]] = {}
    for merge, group in _by_merge(runs).items():
        values = [v for r in group if (v := r.metrics.get(MOVED)) is not None and math.isfinite(v)]
        if values:
            out[merge] = (math.fsum(values) / len(values), len(values))
    return out


def manipulation_check(arm: str, runs: Sequence[Run]) -> str:
    """The registered sentence on whether the curvature operators moved enough for the arm to answer."""
    threshold = CHECKS[arm]
    moved = operator_movement(runs)
    if not moved:
        return f"{arm}: no curvature-aware run logged {MOVED}: the arm cannot say whether curvature acted."
    parts = [f"{m} {v:.2%} (mean of {n} runs)" for m, (v, n) in sorted(moved.items())]
    low = [m for m, (v, _) in moved.items() if v < threshold]
    verdict = (f"below the registered {threshold:.0%} for {', '.join(sorted(low))}: there the curvature-aware and "
               "Euclidean runs are nearly the same model, and a null result says nothing about the paper's claim"
               if low else f"above the registered {threshold:.0%}: curvature acted")  # fmt: skip
    return f"{arm}: curvature operators moved by the last step: {'; '.join(parts)}; {verdict}."


def analyse(main: Sequence[Run], control: Sequence[Run], history: History) -> list[dict]:
    """One row per (hypothesis, endpoint, pair): the comparison and its pre-registered decision."""
    by_merge: dict[str, list[Run]] = {}
    for run in main:
        by_merge.setdefault(run.merge, []).append(run)
    ctrl: dict[str, list[Run]] = {}
    for run in control:
        ctrl.setdefault(run.merge, []).append(run)
    rows: list[dict] = []
    endpoints = (("primary: last-step NLL", _final),
                 ("secondary: mean NLL over evaluations", _mean_eval(history, "eval_nll")))  # fmt: skip
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


_NAMES = {"domain": "Domain-specific", "camex": "Domain-specific-CA", "ties": "Ties", "camex_ties": "Ties-CA"}


def _supported(row: dict) -> bool:
    return row["decision"].startswith("CA") and "supports" in row["decision"]


def _pair_words(pair: str) -> str:
    ca, rest = pair.split(" − ", 1)
    euclid, _, lr = rest.partition(" ")
    return f"{_NAMES.get(ca, ca)} vs {_NAMES.get(euclid, euclid)}{' ' + lr if lr else ''}"


def findings(rows: Sequence[dict], checks: Sequence[str] = ()) -> list[str]:
    """One sentence per registered question, read by the decision rules of docs/prereg_cpu.md:
    H2 is interpreted only where H1 is supported for the same pair; a t-test rejection the sign
    test does not share is said to be the t-test's alone; the manipulation checks come last."""
    primary = {(r["hypothesis"], r["pair"]): r for r in rows if r["endpoint"].startswith("primary")}
    secondary = {(r["hypothesis"], r["pair"]): r for r in rows if r["endpoint"].startswith("secondary")}
    out: list[str] = []
    for (hypothesis, pair), row in primary.items():
        c: Comparison = row["comparison"]
        what = f"**{hypothesis}, {_pair_words(pair)}** ({row['endpoint'].split(': ', 1)[1]}, {c.n} pairs)"
        if hypothesis == "H2":
            h1 = primary.get(("H1", pair.split(" (", 1)[0]))
            if h1 is None or not _supported(h1):
                out.append(f"{what}: not interpreted, as registered (H1 is not supported for this pair); "
                           f"the table reports it: {row['decision']}.")  # fmt: skip
                continue
            if not row["decision"].startswith("CA"):  # neither supported nor against: the registered wording
                ci = "" if c.ci is None else f", 95 % CI [{c.ci[0]:+.5f}, {c.ci[1]:+.5f}]"
                out.append(f"{what}: not distinguishable from a larger step at n = {c.n}{ci}.")
                continue
        sentence = f"{what}: {row['decision']}"
        if c.p_holm is not None and c.p_holm < ALPHA and (c.p_sign is None or c.p_sign >= ALPHA):
            word = "supported" if _supported(row) else "significant"
            sentence += f"; {word} by the t-test, not by the sign test (p = {_p(c.p_sign)})"
        elif c.p_sign is not None:
            sentence += f"; sign test p = {_p(c.p_sign)} ({c.losses} of {c.n} pairs lower for CA, {c.wins} higher)"
        more = secondary.get((hypothesis, pair))
        if more is not None:
            sentence += f". Secondary endpoint (supporting): {more['decision']}"
        out.append(sentence + ".")
    return out + list(checks)


def _p(p: float | None) -> str:
    return "–" if p is None else f"{p:.3g}"


# A run's logged points (start, every logging step, every evaluation, end) further apart than this
# are a stop and a resume (a pause), not work: the budget leaves such gaps out.
PAUSE_S = 300.0
_CLOCK_KEYS = ("learning_rate", "eval_loss", "final_loss")


def active_intervals(times: Sequence[float], pause_s: float = PAUSE_S) -> list[tuple[float, float]]:
    """The spans of one run's sorted activity times (seconds) with no gap above `pause_s`."""
    spans: list[tuple[float, float]] = []
    for t in sorted(times):
        if spans and t - spans[-1][1] <= pause_s:
            spans[-1] = (spans[-1][0], t)
        else:
            spans.append((t, t))
    return spans


def union_seconds(spans: Sequence[tuple[float, float]]) -> float:
    """The length of the union of `spans`: wall-clock during which at least one run was working."""
    total, end = 0.0, -math.inf
    for lo, hi in sorted(spans):
        if hi > end:
            total += hi - max(lo, end)
            end = hi
    return total


def measured_budget(per_run: dict[str, Sequence[tuple[float, float]]]) -> dict[str, dict[str, float]]:
    """Per arm (`arm -> every run's active spans`): the wall-clock with at least one run working
    (`wall_s`) and the run-seconds summed over runs (`run_s`); `total` over every arm's spans."""

    def summary(spans: Sequence[tuple[float, float]]) -> dict[str, float]:
        return {"wall_s": union_seconds(spans), "run_s": sum(hi - lo for lo, hi in spans)}

    everything = [span for spans in per_run.values() for span in spans]
    return {**{arm: summary(spans) for arm, spans in per_run.items()}, "total": summary(everything)}


def _run_spans(mlflow_client, run_id: str) -> list[tuple[float, float]]:
    info = mlflow_client.get_run(run_id).info
    times = [t / 1000 for t in (info.start_time, info.end_time) if t]
    for key in _CLOCK_KEYS:
        times += [m.timestamp / 1000 for m in mlflow_client.get_metric_history(run_id, key)]
    return active_intervals(times)


def render_budget(budget: dict[str, dict[str, float]], runs: dict[str, int]) -> list[str]:
    lines = ["| arm | runs | wall-clock, min (≥ 1 run working) | run-minutes |", "|---|---|---|---|"]
    for arm, b in budget.items():
        count = sum(runs.values()) if arm == "total" else runs.get(arm, 0)
        lines.append(f"| {arm} | {count} | {b['wall_s'] / 60:.1f} | {b['run_s'] / 60:.1f} |")
    return lines


REGISTRATION = "docs/prereg_cpu.md"


def registration_commits(repo: Path | None = None) -> list[str]:
    """`<hash> <date> <subject>` of every commit that registered or amended the design (message
    starting "Pre-registration:", touching docs/prereg_cpu.md), oldest first; empty without git history."""
    root = repo or Path(__file__).resolve().parents[2]
    cmd = ["git", "log", "--reverse", "--format=%h %ad %s", "--date=format:%Y-%m-%d %H:%M", "--grep=^Pre-registration:",
           "--", REGISTRATION]  # fmt: skip
    try:
        out = subprocess.run(cmd, cwd=root, capture_output=True, text=True, timeout=30)
    except (OSError, subprocess.TimeoutExpired):
        return []
    return out.stdout.splitlines() if out.returncode == 0 else []


def render(
    rows: list[dict], checks: Sequence[str] = (), registered: Sequence[str] = (), budget: Sequence[str] = ()
) -> str:
    """Findings first (one sentence per registered question), then the tests behind them."""
    quoted = [f"- `{line.split(' ', 1)[0]}` {line.split(' ', 1)[1]}" for line in registered]
    lines = ["# Pre-registered analysis (docs/prereg_cpu.md)", "",
             "Registered before any run, in these commits (design, hypotheses, tests, decision rules):", "",
             *(quoted or ["- (no git history here: see docs/prereg_cpu.md)"]), "",
             "Δ = curvature-aware − Euclidean, per seed pair: eval NLL in nats (H1, H2; negative favours CA), "
             "eval accuracy (H3; positive favours CA). "
             "Paired t-test (Holm over the two row pairs per hypothesis and endpoint) and exact sign test, "
             "two-sided."]  # fmt: skip
    if rows:
        lines += ["", "## Findings (the registered questions, read by the registered rules)", "",
                  *(f"- {f}" for f in findings(rows, checks))]  # fmt: skip
    lines += ["", "## Tests", "", "| hypothesis | endpoint | pair | n | Δ mean | 95 % CI | p (t) | p (Holm) | p (sign) "
              "| CA lower/higher | decision |", "|---|---|---|---|---|---|---|---|---|---|---|"]  # fmt: skip
    for r in rows:
        c: Comparison = r["comparison"]
        ci = "–" if c.ci is None else f"[{c.ci[0]:+.5f}, {c.ci[1]:+.5f}]"
        diff = "–" if c.difference is None else f"{c.difference:+.5f}"
        lines.append(f"| {r['hypothesis']} | {r['endpoint']} | {r['pair']} | {c.n} | {diff} | {ci} | {_p(c.p)} | "
                     f"{_p(c.p_holm)} | {_p(c.p_sign)} | {c.losses}/{c.wins} | {r['decision']} |")  # fmt: skip
    lines += ["", "CA lower/higher: seed pairs where the curvature-aware run's value is lower / higher."]
    if checks:
        lines += ["", "## Manipulation checks", "", *(f"- {c}" for c in checks)]
    if budget:
        lines += ["", "## Budget, measured from the store", "",
                  f"From the runs' own logged times (start, every logging step and evaluation, end); gaps over "
                  f"{PAUSE_S / 60:.0f} min between a run's points are stops and resumes and are left out "
                  "(with them the start-up of a resumed run). Two runs train at a time.", "", *budget]  # fmt: skip
    return "\n".join(lines) + "\n"


def write(uri: str, out: Path) -> Path:
    """Collect both arms from the MLflow store at `uri` and write `out`/prereg.md."""
    uri = normalise_uri(uri)
    mlflow_client = client(uri)
    runs = collect_runs(uri, [MAIN, CONTROL, FINETUNE])
    arm = {name: [r for r in runs if r.experiment == name] for name in (MAIN, CONTROL, FINETUNE)}

    def history(run_id: str, key: str) -> list[tuple[int, float]]:
        return metric_history(mlflow_client, run_id, key)

    rows = analyse(arm[MAIN], arm[CONTROL], history) + analyse_finetune(arm[FINETUNE], history)
    checks = [manipulation_check(name, arm[name]) for name in (MAIN, FINETUNE)]
    spans = {name: [s for r in arm[name] for s in _run_spans(mlflow_client, r.run_id)] for name in arm}
    budget = render_budget(measured_budget(spans), {name: len(arm[name]) for name in arm})
    out.mkdir(parents=True, exist_ok=True)
    path = out / "prereg.md"
    path.write_text(render(rows, checks, registration_commits(), budget))
    return path


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--tracking-uri", required=True, help="the MLflow store holding the three arms' experiments")
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
