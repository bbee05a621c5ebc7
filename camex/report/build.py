"""Turn a list of tracked runs into the report: tables, figures, Markdown and one HTML page.

Layout of `out/`: `tables/<table>__<model>.{md,tex,csv}` (and `__tests.csv`, `__twin_tests.md`,
`__dense_tests.md`: the paired comparisons), `tables/verdicts.*` (one verdict per published cell),
`figures/<name>.{png,svg,csv}`, `runs.csv` (every run used, with its final metrics), `findings.csv`
(each sentence of the findings and the test it comes from), `report.md`, `report.html`.
The page puts results first: provenance, findings, the tables with runs and their comparisons,
the verdicts, efficiency, figures; paper tables without any run collapse to one line.
"""

from __future__ import annotations

import csv
import functools
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from camex.report import figures
from camex.report.aggregate import group_runs, summarise
from camex.report.collect import Run
from camex.report.findings import Finding, diagnostic_finding, findings
from camex.report.html import Block, render_markdown, render_page
from camex.report.layout import EFFICIENCY, PAPER_TABLES, PAPER_TASKS, ROW_LABEL, TWINS, TableSpec, other_tasks_table
from camex.report.reference import Reference
from camex.report.tables import (
    TEST_FIELDS,
    Grid,
    Table,
    build_table,
    comparison_grid,
    dicts_to_csv,
    efficiency_grid,
    fmt,
    table_grid,
    test_rows,
    to_csv,
    to_latex,
    to_markdown,
)
from camex.report.verdicts import PaperVerdict, paper_verdicts, verdict_grid, verdict_summary

History = Callable[[str, str], list[tuple[int, float]]]  # (run_id, metric key) -> [(step, value)]
ABLATION_PARAMS = (("merge.alpha", "alpha"), ("merge.rank", "rank"))


@dataclass
class Report:
    out: Path
    tables: list[Table] = field(default_factory=list)
    figures: dict[str, dict[str, Path]] = field(default_factory=dict)  # name -> {png, svg, csv}
    findings: list[Finding] = field(default_factory=list)
    blocks: list[Block] = field(default_factory=list)  # the page, in order

    @property
    def missing(self) -> int:
        return sum(t.missing for t in self.tables if t.spec.name != EFFICIENCY.name)


def _paper_tables(runs: list[Run], reference: Reference) -> list[Table]:
    tables = []
    for spec in PAPER_TABLES:
        tasks = {c.task for c in spec.columns}
        mine = [r for r in runs if r.task in tasks]
        ref = reference.table(spec.reference) if spec.reference else None
        for model in sorted({r.model for r in mine}) or ["no runs"]:
            tables.append(build_table(spec, [r for r in mine if r.model == model], model, ref))
    return tables


def _other_tables(runs: list[Run]) -> list[Table]:
    mine = [r for r in runs if r.task not in PAPER_TASKS]
    return [
        build_table(other_tasks_table(sorted({r.task for r in mine if r.model == model})),
                    [r for r in mine if r.model == model], model)
        for model in sorted({r.model for r in mine})
    ]  # fmt: skip


def _efficiency_tables(runs: list[Run]) -> list[Table]:
    tables = []
    for (task, model), group in sorted(group_runs(runs, lambda r: (r.task, r.model)).items()):
        spec = TableSpec(EFFICIENCY.name, f"{EFFICIENCY.title}; task {task}", EFFICIENCY.columns, significance=False)
        tables.append(build_table(spec, group, f"{model} on {task}"))
    return tables


def _glue_scale(task: str, reference: Reference) -> float:
    ref = reference.table("glue")
    return ref.scale if ref and task.startswith("glue/") else 1.0


def _write_csv(path: Path, rows: list[dict], fields: list[str]) -> None:
    with path.open("w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=fields, lineterminator="\n")
        writer.writeheader()
        for row in rows:
            writer.writerow({k: repr(v) if isinstance(v, float) else v for k, v in row.items()})


def _ablations(runs: list[Run], reference: Reference, folder: Path) -> dict[str, dict[str, Path]]:
    """Figures for every (task, model, merge) whose runs take >= 2 values of merge.alpha / merge.rank."""
    out: dict[str, dict[str, Path]] = {}
    for param, short in ABLATION_PARAMS:
        by_model: dict[str, dict[str, dict[str, list]]] = {}
        for (model, task, merge), group in sorted(group_runs(runs, lambda r: (r.model, r.task, r.merge)).items()):
            values = group_runs([r for r in group if param in r.params], lambda r, p=param: float(r.params[p]))
            if len(values) < 2:
                continue
            points = []
            for x, seeds in sorted(values.items()):
                stat = summarise(seeds, None)
                if stat is not None:
                    stat = stat.scaled(_glue_scale(task, reference))
                    points.append((x, stat.mean, stat.std or 0.0, stat.n))
            by_model.setdefault(model, {}).setdefault(task, {})[merge] = points
        for model, series in by_model.items():
            published: dict[str, dict[str, tuple[float, float]]] = {}
            ref = reference.table("glue")
            if ref and param == "merge.alpha" and "alpha" in ref.notes:
                for task, merges in series.items():
                    for merge in merges:
                        if ref.value(merge, task) is not None:
                            published.setdefault(task, {})[merge] = (float(ref.notes["alpha"]), ref.value(merge, task))
            name = f"ablation_{short}__{model}"
            ylabels = {t: "primary metric" + (" ×100" if _glue_scale(t, reference) != 1 else "") for t in series}
            fig = figures.ablation_figure(f"{param} ablation, {model}", param, series, published, ylabels)
            paths = figures.save(fig, folder, name)
            rows = [{"task": t, "merge": m, param: x, "mean": mean, "std": std, "n": n}
                    for t, merges in series.items() for m, pts in merges.items()
                    for x, mean, std, n in pts]  # fmt: skip
            rows += [{"task": t, "merge": m, param: x, "mean": "", "std": "", "n": "", "paper": y}
                     for t, merges in published.items() for m, (x, y) in merges.items()]  # fmt: skip
            paths["csv"] = folder / f"{name}.csv"
            _write_csv(paths["csv"], rows, ["task", "merge", param, "mean", "std", "n", "paper"])
            out[name] = paths
    return out


def _convergence(runs: list[Run], history: History, folder: Path) -> dict[str, dict[str, Path]]:
    """Per (task, model): each CA variant against its Euclidean twin, loss and eval metric vs step."""
    out: dict[str, dict[str, Path]] = {}
    for (task, model), group in sorted(group_runs(runs, lambda r: (r.task, r.model)).items()):
        merges = group_runs(group, lambda r: r.merge)
        pairs = {(ca, twin): {} for ca, twin in TWINS.items() if ca in merges and twin in merges}
        if not pairs:
            continue
        primary = group[0].primary_key() or "final_loss"
        eval_key = "eval_" + primary.removeprefix("final_")
        rows, diffs = [], {}
        for (ca, twin), panels in pairs.items():
            by_seed = {m: {r.seed: r for r in merges[m]} for m in (ca, twin)}
            pairable = all(len(by_seed[m]) == len(merges[m]) for m in (ca, twin))  # no repeated seed
            seeds = sorted(set(by_seed[ca]) & set(by_seed[twin])) if pairable else []
            diffs[(ca, twin)] = {}
            for panel, key in (("train_loss", "train_loss"), ("eval", eval_key)):
                panels[panel] = {m: figures.band([history(r.run_id, key) for r in merges[m]]) for m in (twin, ca)}
                for merge, b in panels[panel].items():
                    rows += [{"pair": f"{ca} vs {twin}", "panel": key, "merge": merge, "step": s, "mean": m,
                              "std": sd, "n": n} for s, m, sd, n in zip(b.steps, b.mean, b.std, b.n)]  # fmt: skip
                d = figures.paired_band([(history(by_seed[ca][s].run_id, key), history(by_seed[twin][s].run_id, key))
                                         for s in seeds])  # fmt: skip
                diffs[(ca, twin)][panel] = d
                rows += [{"pair": f"{ca} vs {twin}", "panel": f"{key} paired difference", "merge": ca, "step": s,
                          "mean": m, "ci_low": "" if lo is None else lo, "ci_high": "" if hi is None else hi, "n": n}
                         for s, m, lo, hi, n in zip(d.steps, d.mean, d.low, d.high, d.n)]  # fmt: skip
        if not rows:  # no run logged a curve
            continue
        name = f"convergence__{task}__{model}".replace("/", "_")
        fig = figures.convergence_figure(f"{task}, {model}", pairs, diffs, eval_key.removeprefix("eval_"))
        paths = figures.save(fig, folder, name)
        paths["csv"] = folder / f"{name}.csv"
        _write_csv(paths["csv"], rows, ["pair", "panel", "merge", "step", "mean", "std", "ci_low", "ci_high", "n"])
        out[name] = paths
    return out


def _runs_csv(runs: list[Run], path: Path) -> None:
    keys = sorted({k for r in runs for k in r.metrics if k.startswith("final_")})
    rows = [{"run_id": r.run_id, "experiment": r.experiment, "task": r.task, "model": r.model, "merge": r.merge,
             "seed": r.seed, **{k: r.metrics.get(k, "") for k in keys}} for r in runs]  # fmt: skip
    _write_csv(path, rows, ["run_id", "experiment", "task", "model", "merge", "seed", *keys])


def _write_grid(folder: Path, name: str, grid: Grid, csv_text: str) -> None:
    for ext, text in (("md", to_markdown(grid)), ("tex", to_latex(grid)), ("csv", csv_text)):
        (folder / f"{name}.{ext}").write_text(text)


def _empty_line(tables: list[Table]) -> str:
    names = "; ".join(t.spec.title.split(" (")[0] for t in tables)
    return f"Paper tables without any run (not shown; their files are in tables/): {names}."


def _verdict_line(verdicts: list[PaperVerdict]) -> str:
    cells = ", ".join(f"{ROW_LABEL.get(v.merge, v.merge)} {v.column} {fmt(v.published, v.decimals)}" for v in verdicts)
    return f"Published cells, none with runs, so each reads “not enough seeds”: {cells}."


def build_report(runs: list[Run], reference: Reference, out: Path, history: History, selection: list[str]) -> Report:
    """Write every table and figure for `runs` under `out` and return what was written."""
    history = functools.lru_cache(maxsize=None)(history)  # the paired panels read each curve again
    out.mkdir(parents=True, exist_ok=True)
    tables_dir, figures_dir = out / "tables", out / "figures"
    tables_dir.mkdir(exist_ok=True)
    report = Report(out)
    paper, other, efficiency = _paper_tables(runs, reference), _other_tables(runs), _efficiency_tables(runs)
    report.tables = paper + other + efficiency
    results = [t for t in paper + other if t.has_runs]
    blocks: dict[str, list[Block]] = {"results": [], "efficiency": []}
    for table in paper + other:
        _write_grid(tables_dir, table.key, table_grid(table), to_csv(table))
        if table.tests:
            (tables_dir / f"{table.key}__tests.csv").write_text(dicts_to_csv(test_rows(table), TEST_FIELDS))
        if table.has_runs:
            blocks["results"].append(("grid", table_grid(table)))
        for family in ("twin", "dense"):
            grid = comparison_grid(table, family)
            if grid is not None:
                (tables_dir / f"{table.key}__{family}_tests.md").write_text(to_markdown(grid))
                blocks["results"].append(("grid", grid))
    for table in efficiency:
        grid = efficiency_grid(table)
        _write_grid(tables_dir, table.key, grid, to_csv(table))
        if len(grid.header) > 1:  # else no run logged any efficiency metric
            blocks["efficiency"].append(("grid", grid))
    verdicts = paper_verdicts(paper)
    _write_grid(tables_dir, "verdicts", verdict_grid(verdicts), _verdicts_csv(verdicts))
    report.findings = findings(results)
    _write_csv(out / "findings.csv", [f.__dict__ for f in report.findings],
               ["text", "table", "family", "row", "vs", "column"])  # fmt: skip
    ablation = _ablations(runs, reference, figures_dir)
    convergence = _convergence(runs, history, figures_dir)
    report.figures = {**ablation, **convergence}
    _runs_csv(runs, out / "runs.csv")

    paper_blocks: list[Block] = []
    if any(v.stat is not None for v in verdicts):
        paper_blocks.append(("grid", verdict_grid(verdicts)))
    elif verdicts:
        paper_blocks.append(("p", _verdict_line(verdicts)))
    empty = [t for t in paper if not t.has_runs]
    if empty:
        paper_blocks.append(("p", _empty_line(empty)))
    twin = [f.text for f in report.findings if f.family == "twin"]
    dense = [f.text for f in report.findings if f.family == "dense"]
    summary = f"Paper: {verdict_summary(verdicts)}. " if verdicts else ""
    report.blocks = [
        ("h2", "Findings"),
        ("p", f"{summary}{len(runs)} finished runs. Generated from the comparison tables below; every test pairs "
              "runs by seed where it can (Holm-adjusted within each table)."),
        ("h3", "Curvature-aware vs Euclidean twin (same seeds)"),
        ("ul", twin or ["No curvature-aware row has a twin with runs."]),
        ("p", diagnostic_finding(results)),
        ("h3", "Each row vs Dense (same seeds)"),
        ("ul", dense or ["No Dense runs to compare against."]),
        ("h2", "Results"),
        *(blocks["results"] or [("p", "No runs.")]),
        ("h2", "Paper tables: verdict per published cell"),
        *paper_blocks,
        ("h2", "Efficiency"),
        *(blocks["efficiency"] or [("p", "No runs.")]),
        ("h2", "Ablations (α, rank)"),
        *([("figure", (n, p["png"])) for n, p in ablation.items()] or [("p", "No runs for this section.")]),
        ("h2", "Convergence: curvature-aware vs Euclidean"),
        *([("figure", (n, p["png"])) for n, p in convergence.items()] or [("p", "No runs for this section.")]),
    ]
    intro = [*selection, f"{len(runs)} finished runs; {report.missing} table cells missing across the paper and "
             f"other-task tables.", f"Published values: {reference.path.name} ({reference.source})"]  # fmt: skip
    (out / "report.md").write_text(render_markdown("CAMEx reproduction report", intro, report.blocks))
    (out / "report.html").write_text(render_page("CAMEx reproduction report", intro, report.blocks))
    return report


def _verdicts_csv(verdicts: list[PaperVerdict]) -> str:
    rows = [{"table": v.table, "model": v.model, "merge": v.merge, "column": v.column, "paper": v.published,
             "mean": "" if v.stat is None else v.stat.mean, "n": 0 if v.stat is None else v.stat.n,
             "ci_low": v.ci[0] if v.ci else "", "ci_high": v.ci[1] if v.ci else "", "verdict": v.verdict}
            for v in verdicts]  # fmt: skip
    return dicts_to_csv(rows, ("table", "model", "merge", "column", "paper", "mean", "n", "ci_low", "ci_high",
                               "verdict"))  # fmt: skip
