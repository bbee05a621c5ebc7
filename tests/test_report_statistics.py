"""The report's statistics on hand-made runs (no training, no MLflow): paired tests by seed, Welch
only where unpairable, identical twins, Holm's correction, verdicts on published cells, the
findings' numbers against their tables, efficiency pruning and short figure series; and the
committed CPU-scale report's findings against its committed tables."""

from __future__ import annotations

import csv
import math
import re
from pathlib import Path

import numpy as np
import pytest
from scipy import stats

from camex.report.aggregate import Stat
from camex.report.build import build_report
from camex.report.collect import Run
from camex.report.layout import EFFICIENCY, TableSpec, other_tasks_table
from camex.report.reference import load_reference
from camex.report.significance import compare, holm, sign_test, t_interval, verdict
from camex.report.tables import build_table, efficiency_grid
from camex.report.verdicts import paper_verdicts, verdict_summary

ROOT = Path(__file__).resolve().parents[1]
COMMITTED = ROOT / "reports" / "cpu_mini"
TASK = "offline/topic"
SEEDS = [str(s) for s in range(6)]


def _run(merge: str, seed: str, value: float, task: str = TASK, metric: str = "accuracy", **metrics) -> Run:
    return Run(run_id=f"{merge}-{seed}-{task}", experiment="x",
               tags={"task": task, "model": "m", "merge": merge, "seed": seed},
               params={"task.primary_metric": metric, "task.greater_is_better": "True", "seed": seed},
               metrics={f"final_{metric}": value, **metrics})  # fmt: skip


def _paired_runs() -> tuple[list[Run], dict[str, np.ndarray]]:
    """Per-seed noise (sd 5) far larger than a constant shift (+0.5) of camex over domain; ties
    and camex_ties bit-identical; dare and camex_dare with an unrelated small difference."""
    rng = np.random.default_rng(7)
    base = 70 + rng.normal(0, 5, len(SEEDS))
    values = {"dense": base + rng.normal(0, 0.3, len(SEEDS)), "domain": base,
              "camex": base + 0.5 + rng.normal(0, 0.05, len(SEEDS)), "ties": base + 1.0, "camex_ties": base + 1.0,
              "dare": base - 1.0, "camex_dare": base - 1.0 + rng.normal(0, 0.3, len(SEEDS))}  # fmt: skip
    runs = [_run(m, s, float(v)) for m, vs in values.items() for s, v in zip(SEEDS, vs)]
    return runs, values


def _table(runs):
    return build_table(other_tasks_table([TASK]), runs, "m")


def test_paired_test_finds_a_shift_that_welch_misses_and_equals_scipy():
    runs, values = _paired_runs()
    table = _table(runs)
    tests = {(t.row, t.against): t.result for t in table.tests["twin"]}
    ca, twin = values["camex"], values["domain"]
    c = tests[("camex", "domain")]
    assert c.kind == "paired" and c.n == len(SEEDS) and c.seeds == tuple(SEEDS)
    diffs = ca - twin
    assert c.differences == pytest.approx(tuple(diffs), abs=1e-12)
    rel = stats.ttest_rel(ca, twin)
    assert c.p == pytest.approx(rel.pvalue, rel=1e-9) and c.t == pytest.approx(rel.statistic, rel=1e-9)
    assert c.p < 1e-4  # the paired test finds the shift ...
    welch = stats.ttest_ind(ca, twin, equal_var=False)
    assert welch.pvalue > 0.5  # ... Welch's unpaired test on the same numbers does not
    low, high = stats.t.interval(0.95, len(diffs) - 1, loc=diffs.mean(), scale=stats.sem(diffs))
    assert c.ci == pytest.approx((low, high), rel=1e-9) and low > 0
    assert c.p_sign == pytest.approx(stats.binomtest(int((diffs > 0).sum()), len(diffs)).pvalue, rel=1e-12)
    assert (c.wins, c.losses, c.ties) == (6, 0, 0)
    assert table.cells[("camex", TASK)].test is c and c.mark == "**ᵖ"

    same = tests[("camex_ties", "ties")]  # bit-identical twins: no test, "identical"
    assert same.kind == "identical" and same.mark == "identical" and same.p is None and same.ties == len(SEEDS)

    # Holm over the twin family: the identical pair is no test, so m = 2
    raw = {k: r.p for k, r in tests.items() if r.p is not None}
    assert len(raw) == 2
    (k1, p1), (k2, p2) = sorted(raw.items(), key=lambda kv: kv[1])
    assert tests[k1].p_holm == pytest.approx(min(1, 2 * p1)) and tests[k2].p_holm == pytest.approx(max(min(1, 2 * p1),
                                                                                                       min(1, p2)))
    # and over the Dense family (6 tests), separately
    dense = [t.result for t in table.tests["dense"]]
    assert len(dense) == 6 and all(r.kind == "paired" for r in dense)
    assert [r.p_holm for r in dense] == pytest.approx(holm([r.p for r in dense]))


def test_holm_step_down_by_hand():
    assert holm([0.01, 0.04, None, 0.03, 0.5]) == pytest.approx([0.04, 0.09, None, 0.09, 0.5])
    assert holm([0.9, 0.6]) == [1.0, 1.0]  # capped at 1, monotone
    assert holm([]) == [] and holm([None]) == [None]


def test_unpairable_runs_fall_back_to_welch_and_too_few_read_na():
    a = Stat((1.0, 2.0, 3.0), ("1", "1", "2"), ("a", "b", "c"))  # seed 1 twice: cannot pair
    b = Stat((0.5, 1.5, 2.0), ("1", "2", "3"), ("d", "e", "f"))
    c = compare(a, b)
    welch = stats.ttest_ind(a.values, b.values, equal_var=False)
    assert c.kind == "welch" and c.p == pytest.approx(welch.pvalue, rel=1e-12) and c.mark.endswith("ʷ")
    one = compare(Stat((1.0,), ("1",), ("a",)), Stat((2.0,), ("1",), ("b",)))
    assert one.kind == "n/a" and one.mark == "n/a" and one.p is None
    assert sign_test([0.0, 0.0]) is None and t_interval([1.0]) is None


def test_verdict_on_both_sides_of_the_interval_and_exactly_on_it():
    values = (88.0, 89.0, 90.5)
    stat = Stat(values, ("0", "1", "2"), ("a", "b", "c"))
    low, high = stats.t.interval(0.95, 2, loc=np.mean(values), scale=stats.sem(values))
    assert verdict(stat, float(np.mean(values)))[0] == "reproduced"
    ci = verdict(stat, 89.0)[1]
    assert ci == pytest.approx((low, high), rel=1e-12)
    assert verdict(stat, ci[0])[0] == "reproduced" and verdict(stat, ci[1])[0] == "reproduced"  # ends included
    assert verdict(stat, math.nextafter(ci[0], -math.inf))[0] == "above"  # paper just below: reproduction above
    assert verdict(stat, math.nextafter(ci[1], math.inf))[0] == "below"
    assert verdict(stat, low - 5)[0] == "above" and verdict(stat, high + 5)[0] == "below"
    assert verdict(Stat((89.0,), ("0",), ("a",)), 89.0)[0] == "not enough seeds"
    assert verdict(None, 89.0)[0] == "not enough seeds"


def test_verdict_per_published_cell_and_summary():
    from camex.report.layout import GLUE

    reference = load_reference().table("glue")
    # STS-B Spearman of Domain-specific-CA around the paper's 89.47 (×100), Ties-CA far below its 89.54
    runs = [_run("camex", s, v, task="glue/stsb", metric="spearman") for s, v in zip("012", (0.890, 0.895, 0.899))]
    runs += [_run("camex_ties", s, v, task="glue/stsb", metric="spearman") for s, v in zip("012", (0.5, 0.51, 0.52))]
    runs += [_run("camex_dare", "0", 0.9, task="glue/stsb", metric="spearman")]
    table = build_table(GLUE, runs, "m", reference)
    verdicts = {(v.merge, v.column): v.verdict for v in paper_verdicts([table])}
    assert len(verdicts) == 12
    assert verdicts[("camex", "STS-B")] == "reproduced" and verdicts[("camex_ties", "STS-B")] == "below"
    assert verdicts[("camex_dare", "STS-B")] == "not enough seeds"
    assert verdict_summary(paper_verdicts([table])) == (
        "1 of 12 published cells reproduced (0 above, 1 below, 10 not enough seeds)")


def _numbers(text: str) -> list[float]:
    return [abs(float(x)) for x in re.findall(r"-?\d+(?:\.\d+)?", text)]


def _md_rows(path: Path) -> list[list[str]]:
    return [[c.strip() for c in line.strip().strip("|").split("|")] for line in path.read_text().splitlines()
            if line.startswith("| ") and not line.startswith("| row |")]  # fmt: skip


def check_findings_against_tables(out: Path) -> int:
    """Every number of every finding is in the comparison-table row it names, and that row's
    rounded numbers are the unrounded ones of the tests CSV. Returns the number of findings."""
    with (out / "findings.csv").open() as fh:
        found = list(csv.DictReader(fh))
    from camex.report.layout import ROW_LABEL

    for f in found:
        row_label, vs_label = ROW_LABEL.get(f["row"], f["row"]), ROW_LABEL.get(f["vs"], f["vs"])
        rows = [r for r in _md_rows(out / "tables" / f"{f['table']}__{f['family']}_tests.md")
                if r[:3] == [row_label, vs_label, f["column"]]]  # fmt: skip
        assert len(rows) == 1, f
        row = rows[0]
        counts = [int(x) for x in row[8].split(" / ")] if row[8] != "—" else []
        allowed = set(_numbers(" ".join(row[3:13]))) | {float(sum(counts))}
        text = f["text"]
        for name in (row_label, vs_label, f["column"], re.sub(r"^\w+__", "", f["table"]), "95 %"):
            text = text.replace(name, " ")
        model = f["table"].split("__", 1)[1]
        text = text.replace(f"({model})", " ")
        numbers = _numbers(text)
        assert numbers, f["text"]
        for number in numbers:
            assert number in allowed, (number, f["text"], row)
        with (out / "tables" / f"{f['table']}__tests.csv").open() as fh:
            tests = [t for t in csv.DictReader(fh) if (t["family"], t["row"], t["vs"], t["column"]) ==
                     (f["family"], f["row"], f["vs"], f["column"])]  # fmt: skip
        assert len(tests) == 1
        t = tests[0]
        from camex.report.tables import fmt_p, sig

        if t["mean_difference"]:
            assert row[6] == sig(float(t["mean_difference"]))
        if t["p_value"]:
            assert row[9] == fmt_p(float(t["p_value"])) and row[10] == fmt_p(float(t["p_holm"]))
        if t["ci_low"]:
            assert row[7] == f"[{sig(float(t['ci_low']))}, {sig(float(t['ci_high']))}]"
    return len(found)


def test_findings_numbers_come_from_their_tables(tmp_path):
    runs, _ = _paired_runs()
    report = build_report(runs, load_reference(), tmp_path, lambda rid, key: [], ["selection"])
    assert check_findings_against_tables(tmp_path) == len(report.findings) == 3 + 6
    html = (tmp_path / "report.html").read_text()
    assert html.index("<h2>Findings</h2>") < html.index("<table")
    for table in re.findall(r"<table>.*?</table>", html, flags=re.S):  # no table of only missing cells
        cells = re.findall(r"<td[^>]*>(.*?)</td>", table)
        assert cells and not all(c.startswith("missing") for c in cells)
    assert "Paper tables without any run" in html
    lines = (tmp_path / "report.md").read_text()
    assert re.search(r"Domain-specific-CA raises accuracy by 0\.\d+ against Domain-specific on offline/topic \(m\) "
                     r"\(95 % CI of the difference 0\.\d+ to 0\.\d+; higher on 6/6 seeds; paired t p < 0\.001", lines)


def test_committed_report_findings_match_its_tables_and_come_first():
    if not (COMMITTED / "runs.csv").exists():
        pytest.skip("no committed CPU-scale report")
    assert check_findings_against_tables(COMMITTED) >= 9
    html = (COMMITTED / "report.html").read_text()
    assert html.index("<h2>Findings</h2>") < html.index("<table")
    for table in re.findall(r"<table>.*?</table>", html, flags=re.S):
        cells = re.findall(r"<td[^>]*>(.*?)</td>", table)
        assert cells and not all(c.startswith("missing") for c in cells)
    # the paired analysis of the committed runs, recomputed here from runs.csv with scipy
    with (COMMITTED / "runs.csv").open() as fh:
        rows = list(csv.DictReader(fh))
    per = {(r["merge"], r["seed"]): float(r["final_perplexity"]) for r in rows if r["task"] == "offline/wiki_lm"}
    ca, twin = ([per[(m, s)] for s in "012"] for m in ("camex_ties", "ties"))
    with (COMMITTED / "tables" / "other__small_gpt2__tests.csv").open() as fh:
        test = next(t for t in csv.DictReader(fh) if t["row"] == "camex_ties" and t["family"] == "twin")
    assert float(test["p_value"]) == pytest.approx(stats.ttest_rel(ca, twin).pvalue, rel=1e-9)
    assert test["test"] == "paired" and float(test["p_value"]) < 0.01
    assert "not logged" in (COMMITTED / "tables" / "other__small_gpt2__twin_tests.md").read_text()


def test_efficiency_table_drops_empty_columns_states_constants_once_and_adds_step_ratio():
    runs = []
    for merge, step_s in (("domain", 2.0), ("camex", 3.0)):
        for seed, rss in zip("01", (100.0, 110.0)):
            runs.append(_run(merge, seed, 0.5, final_params_total=10.0 if merge == "domain" else 12.0,
                             final_params_router=4.0, peak_rss_mb=rss, train_steps_per_second=1 / step_s))  # fmt: skip
    spec = TableSpec(EFFICIENCY.name, EFFICIENCY.title, EFFICIENCY.columns, significance=False)
    grid = efficiency_grid(build_table(spec, runs, "m"))
    assert grid.header == ["row", "params total", "peak RSS MiB", "step time s", "step time × Euclidean twin"]
    assert [r[0] for r in grid.body] == ["Domain-specific", "Domain-specific-CA"]  # rows without runs dropped
    assert grid.body[0][1] == "10" and "±" not in grid.body[0][1]  # no spread: the value alone
    assert grid.body[1][-1] == "1.50×" and grid.body[0][-1] == "—"
    assert any("params router = 4" in line for line in grid.legend)


def test_short_series_are_markers_only():
    from camex.report import figures

    two = figures.band([[(10, 1.0), (20, 2.0)], [(10, 1.5), (20, 2.5)]])
    many = figures.band([[(s, float(s)) for s in range(5)]])
    diff = figures.paired_band([([(10, 1.0), (20, 2.0)], [(10, 0.5), (20, 1.0)])])
    assert diff.mean == (0.5, 1.0) and diff.low == (None, None)
    panels = {"train_loss": {"domain": many, "camex": many}, "eval": {"domain": two, "camex": two}}
    pairs = {("camex", "domain"): panels}
    fig = figures.convergence_figure("t", pairs, {("camex", "domain"): {"train_loss": diff, "eval": diff}}, "acc")
    loss_ax, _, eval_ax, _ = fig.axes[:4]
    assert all(line.get_linestyle() == "None" for line in eval_ax.get_lines())
    styles = {line.get_label(): (line.get_linestyle(), line.get_marker()) for line in loss_ax.get_lines()}
    assert styles["Domain-specific (n=1)"] != styles["Domain-specific-CA (n=1)"]  # distinct style and marker
    figures.plt.close(fig)
