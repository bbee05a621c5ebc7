"""Build a table from runs (cells over seeds, published values, paired tests against the twin and
against Dense, the curvature diagnostic) and lay it out as a `Grid` for Markdown, LaTeX, CSV, HTML."""

from __future__ import annotations

import csv
import io
import math
import re
from dataclasses import dataclass, field

from camex.report.aggregate import Stat, differing_settings, summarise, summarise_key
from camex.report.collect import Run
from camex.report.layout import DENSE, DIAGNOSTIC, ROW_LABEL, ROWS, TWINS, Column, TableSpec
from camex.report.reference import PublishedTable
from camex.report.significance import Comparison, compare, holm_adjust, verdict

NOT_RECOVERABLE = "n/r"  # the paper's value is not published in recoverable form (SPEC §10)
MIXED = "‡"
NOT_LOGGED = "not logged"


@dataclass
class Cell:
    stat: Stat | None  # scaled to the table's scale
    published: float | None = None
    test: Comparison | None = None  # against the twin (curvature-aware rows)
    twin: str | None = None
    mixed: dict[str, list[str]] = field(default_factory=dict)
    metric_keys: tuple[str, ...] = ()  # the logged metric(s) the cell's runs report
    diagnostic: dict[str, Stat | None] = field(default_factory=dict)  # curvature-aware rows: key -> last value

    @property
    def difference(self) -> float | None:
        if self.stat is None or self.published is None:
            return None
        return self.stat.mean - self.published


@dataclass(frozen=True)
class Test:
    """One comparison of a table: `row − against` in one column."""

    family: str  # "twin" or "dense"
    row: str
    against: str
    column: Column
    result: Comparison


@dataclass
class Table:
    spec: TableSpec
    model: str  # the model (tag) of every run in the table; a task too for efficiency tables
    rows: list[tuple[str, str]]
    cells: dict[tuple[str, str], Cell]  # (merge, column label) -> cell
    scale: float = 1.0
    reference: PublishedTable | None = None
    average: dict[str, float | None] = field(default_factory=dict)
    tests: dict[str, list[Test]] = field(default_factory=dict)  # family -> Holm-adjusted tests

    @property
    def key(self) -> str:
        return re.sub(r"[^A-Za-z0-9_.-]+", "_", f"{self.spec.name}__{self.model}")

    @property
    def missing(self) -> int:
        return sum(cell.stat is None for cell in self.cells.values())

    @property
    def total(self) -> int:
        return len(self.cells)

    @property
    def has_runs(self) -> bool:
        return self.missing < self.total

    def row_has_runs(self, merge: str) -> bool:
        return any(self.cells[(merge, c.label)].stat is not None for c in self.spec.columns)


def _runs_for(runs: list[Run], merge: str, column: Column) -> list[Run]:
    return [r for r in runs if r.merge == merge and (column.task is None or r.task == column.task)]


def _stat(runs: list[Run], column: Column, scale: float) -> Stat | None:
    stat = summarise_key(runs, column.key, column.transform) if column.key else summarise(runs, column.metric)
    return stat.scaled(scale) if stat is not None and scale != 1 else stat


def build_table(spec: TableSpec, runs: list[Run], model: str, reference: PublishedTable | None = None) -> Table:
    """One table for one model: every row of SPEC §8 (plus any other merge found), every column."""
    scale = reference.scale if reference else 1.0
    merges = [m for m, _ in ROWS] + sorted({r.merge for r in runs} - {m for m, _ in ROWS})
    rows = [(m, dict(ROWS).get(m, m)) for m in merges]
    cells: dict[tuple[str, str], Cell] = {}
    for merge, _ in rows:
        for column in spec.columns:
            group = _runs_for(runs, merge, column)
            keys = {column.key} if column.key else {r.metric_key(column.metric) for r in group} - {None}
            cell = Cell(_stat(group, column, scale), mixed=differing_settings(group), metric_keys=tuple(sorted(keys)))
            if reference and column.task and column.metric is None:
                cell.published = _published(reference, merge, column, group)
            if merge in TWINS and spec.significance and group:
                cell.diagnostic = {key: summarise_key(group, key) for _, key in DIAGNOSTIC}
            cells[(merge, column.label)] = cell
    table = Table(spec, model, rows, cells, scale, reference)
    if spec.significance:
        table.tests = _tests(spec, cells, merges)
        for test in table.tests["twin"]:
            cell = cells[(test.row, test.column.label)]
            cell.twin, cell.test = test.against, test.result
    if spec.average:
        for merge, _ in rows:
            stats = [cells[(merge, c.label)].stat for c in spec.columns]
            table.average[merge] = math.fsum(s.mean for s in stats) / len(stats) if all(stats) else None
    return table


def _tests(spec: TableSpec, cells: dict[tuple[str, str], Cell], merges: list[str]) -> dict[str, list[Test]]:
    """Two families, each Holm-adjusted on its own: curvature-aware row vs its Euclidean twin, and
    every row vs Dense."""
    pairs = {"twin": list(TWINS.items()), "dense": [(m, DENSE) for m in merges if m != DENSE]}
    out: dict[str, list[Test]] = {}
    for family, rows in pairs.items():
        found = []
        for row, against in rows:
            for column in spec.columns:
                a, b = cells[(row, column.label)].stat, cells[(against, column.label)].stat
                if a is not None and b is not None:
                    found.append((row, against, column, compare(a, b)))
        adjusted = holm_adjust([c for *_, c in found])
        out[family] = [Test(family, r, against, col, c) for (r, against, col, _), c in zip(found, adjusted)]
    return out


def _published(reference: PublishedTable, merge: str, column: Column, group: list[Run]) -> float | None:
    """The paper's value when the runs' primary metric is the metric the paper published."""
    value = reference.value(merge, column.task)
    if value is None:
        return None
    metrics = {r.params.get("task.primary_metric") for r in group} - {None}
    return value if not metrics or metrics == {reference.metrics[column.task]} else None


# ----------------------------------------------------------------------------------- formatting


def fmt(value: float | None, decimals: int) -> str:
    return "—" if value is None else f"{value:.{decimals}f}"


def _signed(value: float, decimals: int) -> str:
    return f"{value:+.{decimals}f}"


def sig(value: float, digits: int = 3) -> str:
    """`value` to `digits` significant digits, never in exponent form (0.00123, 1.89, 3460)."""
    if value == 0 or not math.isfinite(value):
        return f"{value:.{digits - 1}f}" if value == 0 else str(value)
    decimals = max(0, digits - 1 - math.floor(math.log10(abs(value))))
    return f"{value:.{decimals}f}"


def fmt_p(p: float | None) -> str:
    """A p-value as the report prints it: three decimals, `< 0.001` below that."""
    if p is None:
        return "—"
    return "< 0.001" if p < 0.001 else f"{p:.3f}"


def fmt_ci(ci: tuple[float, float] | None) -> str:
    return "—" if ci is None else f"[{sig(ci[0])}, {sig(ci[1])}]"


def cell_text(table: Table, merge: str, column: Column) -> str:
    """`mean ± std (n=k) mark · paper v (Δ d)`; `missing` where no run logged the metric."""
    cell = table.cells[(merge, column.label)]
    d = column.decimals
    if cell.stat is None:
        text = "missing"
    else:
        s = cell.stat
        text = fmt(s.mean, d) + (f" ± {fmt(s.std, d)}" if s.std is not None else "") + f" (n={s.n})"
        if cell.test is not None and cell.test.mark:
            text += f" {cell.test.mark}"
        if cell.mixed:
            text += f" {MIXED}"
    if table.reference is not None and column.task is not None:
        if cell.published is None:
            text += f" · paper {NOT_RECOVERABLE}"
        else:
            text += f" · paper {fmt(cell.published, d)}"
            if cell.difference is not None:
                text += f" (Δ {_signed(cell.difference, d)})"
            text += f" {verdict(cell.stat, cell.published)[0]}"
    return text


def _average_text(table: Table, merge: str) -> str:
    value = table.average.get(merge)
    d = table.spec.columns[0].decimals
    text = "missing" if value is None else fmt(value, d)
    return text + (f" · paper {NOT_RECOVERABLE}" if table.reference is not None else "")


@dataclass
class Grid:
    """A rendered table: caption, header, body rows (first cell the row label) and legend lines."""

    caption: str
    header: list[str]
    body: list[list[str]]
    legend: list[str]


def caption(table: Table) -> str:
    scale = f"; values ×{table.scale:g} to match the paper" if table.scale != 1 else ""
    return f"{table.spec.title} — model: {table.model}{scale}"


TEST_LEGEND = ("Marks: curvature-aware row vs its Euclidean twin with the same seeds, Holm-adjusted over the "
               "twin tests of this table: ** p < 0.01, * p < 0.05, ns not significant; the letter after the mark "
               "names the test (ᵖ paired t-test over seeds, ʷ Welch's unpaired t-test, used only where the seeds "
               "cannot be paired); identical: bit-identical results on every seed (no test); n/a: fewer than 2 "
               "seeds.")  # fmt: skip


def table_grid(table: Table) -> Grid:
    """The results table; in a table with runs, rows without any run are left out (named in the legend)."""
    shown = [(m, label) for m, label in table.rows if not table.has_runs or table.row_has_runs(m)]
    header = ["row"] + [c.label for c in table.spec.columns] + (["Average"] if table.spec.average else [])
    body = []
    for merge, label in shown:
        row = [label] + [cell_text(table, merge, c) for c in table.spec.columns]
        if table.spec.average:
            row.append(_average_text(table, merge))
        body.append(row)
    lines = [f"Cells: mean ± sample std over seeds (n runs). {table.missing} of {table.total} cells missing "
             "(no finished run logged the metric)."]  # fmt: skip
    dropped = [label for m, label in table.rows if (m, label) not in shown]
    if dropped:
        lines.append("Rows without runs (not shown): " + ", ".join(dropped) + ".")
    if table.spec.significance:
        lines.append(TEST_LEGEND)
    if table.reference is not None:
        ref = table.reference
        lines.append(f"paper: the published value ({ref.description}; {ref.provenance}) and Δ = reproduced − "
                     f"paper, then the verdict (reproduced: the paper value lies in the 95 % t interval of the "
                     f"seeds; above / below: the reproduction lies above / below it; not enough seeds: fewer than "
                     f"2); {NOT_RECOVERABLE}: not published in recoverable form.")  # fmt: skip
    mixed = sorted({f"{k} ∈ {{{', '.join(v)}}}" for c in table.cells.values() for k, v in c.mixed.items()})
    if mixed:
        lines.append(f"{MIXED} the cell's runs differ in settings, not only in seed: " + "; ".join(mixed))
    return Grid(caption(table), header, body, lines)


def metric_name(table: Table, test: Test) -> str:
    """The metric a test compares (`accuracy`, `perplexity`), from the cells' logged keys."""
    keys = table.cells[(test.row, test.column.label)].metric_keys
    return " ".join(k.removeprefix("final_") for k in keys) or test.column.label


def diagnostic_texts(cell: Cell) -> list[str]:
    """The curvature diagnostic of a curvature-aware cell: mean over seeds of each logged key."""
    out = []
    for _, key in DIAGNOSTIC:
        stat = cell.diagnostic.get(key)
        out.append(NOT_LOGGED if stat is None else f"{sig(stat.mean)} (n={stat.n})")
    return out


FAMILY_TITLE = {"twin": "curvature-aware vs Euclidean twin", "dense": "each row vs Dense"}


def comparison_grid(table: Table, family: str) -> Grid | None:
    """The paired differences of one test family of a table (None when it has no test)."""
    tests = table.tests.get(family) or []
    if not tests:
        return None
    header = ["row", "vs", "column", "metric", "test", "per-seed Δ (seed: Δ)", "mean Δ", "95 % CI",
              "higher / lower / tied", "p (t)", "p Holm", "p sign", "mark"]  # fmt: skip
    if family == "twin":
        header += [label for label, _ in DIAGNOSTIC]
    body = []
    for test in tests:
        c = test.result
        per_seed = ", ".join(f"{s}: {sig(d)}" for s, d in zip(c.seeds, c.differences)) or "unpaired"
        counts = f"{c.wins} / {c.losses} / {c.ties}" if c.kind in ("paired", "identical") else "—"
        row = [ROW_LABEL.get(test.row, test.row), ROW_LABEL.get(test.against, test.against), test.column.label,
               metric_name(table, test), c.kind, per_seed, "—" if c.difference is None else sig(c.difference),
               fmt_ci(c.ci), counts, fmt_p(c.p), fmt_p(c.p_holm), fmt_p(c.p_sign), c.mark or c.reason]  # fmt: skip
        if family == "twin":
            row += diagnostic_texts(table.cells[(test.row, test.column.label)])
        body.append(row)
    legend = [
        f"Δ = row − vs, per seed where both ran the same seed (paired), else the difference of the means "
        f"(Welch). 95 % CI: t interval of the mean Δ. p (t): two-sided paired t-test (Welch's where unpaired); "
        f"p Holm: Holm's correction over the {len(tests)} test{'s' * (len(tests) > 1)} of this table; p sign: "
        f"exact two-sided sign test (ties dropped; over n untied pairs it cannot go below 2^(1−n), 0.25 for 3). "
        f"Marks from p Holm: ** < 0.01, * < 0.05.",
    ]
    if family == "twin":
        legend.append("Curvature diagnostic (last evaluation, mean over seeds): relative change of the curvature "
                      "operators from their start, median and max over layers and experts; mean ‖τ_i‖/‖E_m‖; "
                      "relative change of the merged weights on one eval batch when the curvature is replaced by "
                      "the identity (mean and max over layers)." + (f" {NOT_LOGGED}: the runs predate the "
                      "diagnostic." if any(NOT_LOGGED in row for row in body) else ""))  # fmt: skip
    title = f"Paired differences, {FAMILY_TITLE[family]} — {table.spec.title.split(' (')[0]}, model: {table.model}"
    return Grid(title, header, body, legend)


# ------------------------------------------------------------------------------------ efficiency


def efficiency_grid(table: Table) -> Grid:
    """Rows with runs only; columns with no value dropped; a column with one value in every row
    (and no spread) stated once in the legend; a cell without spread over seeds shows the value
    alone; plus each curvature-aware row's step time relative to its Euclidean twin."""
    rows = [(m, label) for m, label in table.rows if table.row_has_runs(m)]
    columns, constants = [], []
    for column in table.spec.columns:
        stats = [table.cells[(m, column.label)].stat for m, _ in rows]
        present = [s for s in stats if s is not None]
        if not present:
            continue
        if len(present) == len(stats) and all(s.std in (None, 0) for s in present) and \
                len({s.mean for s in present}) == 1:  # fmt: skip
            constants.append(f"{column.label} = {fmt(present[0].mean, column.decimals)}")
            continue
        columns.append(column)
    step = next((c for c in columns if c.key == "train_steps_per_second"), None)
    header = ["row"] + [c.label for c in columns] + (["step time × Euclidean twin"] if step else [])
    body = []
    for merge, label in rows:
        row = [label]
        for column in columns:
            s = table.cells[(merge, column.label)].stat
            if s is None:
                row.append("missing")
            elif s.std in (None, 0):
                row.append(fmt(s.mean, column.decimals))
            else:
                row.append(f"{fmt(s.mean, column.decimals)} ± {fmt(s.std, column.decimals)}")
        if step:
            row.append(_step_ratio(table, merge, step))
        body.append(row)
    n = sorted({s.n for c in table.spec.columns for m, _ in rows if (s := table.cells[(m, c.label)].stat)})
    legend = [f"Cells: mean ± sample std over seeds (n = {', '.join(map(str, n))} runs per row); a value without "
              "± did not vary over seeds."]  # fmt: skip
    if constants:
        legend.append("The same in every row: " + "; ".join(constants) + ".")
    if step:
        legend.append("step time × Euclidean twin: mean step time of a curvature-aware row over that of its "
                      "Euclidean twin.")  # fmt: skip
    return Grid(caption(table), header, body, legend)


def _step_ratio(table: Table, merge: str, column: Column) -> str:
    twin = TWINS.get(merge)
    if twin is None:
        return "—"
    a, b = table.cells[(merge, column.label)].stat, table.cells[(twin, column.label)].stat
    return "—" if a is None or b is None else f"{a.mean / b.mean:.2f}×"


# ------------------------------------------------------------------------------------ renderers


def to_markdown(grid: Grid) -> str:
    lines = [f"### {grid.caption}", "", "| " + " | ".join(grid.header) + " |", "|" + "---|" * len(grid.header)]
    lines += ["| " + " | ".join(row) + " |" for row in grid.body]
    return "\n".join(lines + [""] + [f"- {x}" for x in grid.legend]) + "\n"


_LATEX_ESCAPES = {"\\": r"\textbackslash{}", "&": r"\&", "%": r"\%", "$": r"\$", "#": r"\#", "_": r"\_",
                  "{": r"\{", "}": r"\}", "~": r"\textasciitilde{}", "^": r"\textasciicircum{}",
                  "±": r"$\pm$", "Δ": r"$\Delta$", "—": "--", "·": r"$\cdot$", "‡": r"$\ddagger$",
                  "×": r"$\times$", "∈": r"$\in$", "−": "-", "`": "", "ᵖ": r"$^{p}$", "ʷ": r"$^{w}$",
                  "‖": r"$\|$", "τ": r"$\tau$", "Ê": r"$\hat{E}$", "₀": r"$_0$", "<": r"$<$"}  # fmt: skip


def latex_escape(text: str) -> str:
    return "".join(_LATEX_ESCAPES.get(ch, ch) for ch in text)


def to_latex(grid: Grid) -> str:
    head = grid.header
    lines = [r"\begin{table}[t]", r"\centering", r"\scriptsize", r"\begin{tabular}{l" + "l" * (len(head) - 1) + "}",
             r"\hline", " & ".join(latex_escape(h) for h in head) + r" \\", r"\hline"]  # fmt: skip
    lines += [" & ".join(latex_escape(x) for x in row) + r" \\" for row in grid.body]
    lines += [r"\hline", r"\end{tabular}", r"\caption{" + latex_escape(grid.caption) + ". "
              + latex_escape(" ".join(grid.legend)) + "}", r"\end{table}"]  # fmt: skip
    return "\n".join(lines) + "\n"


CSV_FIELDS = (
    "table", "model", "merge", "row", "column", "task", "metric", "scale", "mean", "std", "n", "seeds", "run_ids",
    "paper", "difference", "twin", "twin_difference", "test", "t", "p_value", "p_holm", "mark", "mixed_settings",
    *(key for _, key in DIAGNOSTIC),
)  # fmt: skip


def csv_rows(table: Table) -> list[dict[str, object]]:
    rows: list[dict[str, object]] = []
    for merge, label in table.rows:
        for column in table.spec.columns:
            cell = table.cells[(merge, column.label)]
            s, t = cell.stat, cell.test
            rows.append({
                "table": table.spec.name, "model": table.model, "merge": merge, "row": label,
                "column": column.label, "task": column.task or "", "metric": " ".join(cell.metric_keys),
                "scale": table.scale, "mean": s.mean if s else "", "std": s.std if s and s.std is not None else "",
                "n": s.n if s else 0, "seeds": " ".join(s.seeds) if s else "",
                "run_ids": " ".join(s.run_ids) if s else "",
                "paper": "" if cell.published is None else cell.published,
                "difference": "" if cell.difference is None else cell.difference,
                "twin": cell.twin or "", "twin_difference": "" if t is None or t.difference is None else t.difference,
                "test": t.kind if t else "", "t": "" if t is None or t.t is None else t.t,
                "p_value": "" if t is None or t.p is None else t.p,
                "p_holm": "" if t is None or t.p_holm is None else t.p_holm, "mark": t.mark if t else "",
                "mixed_settings": "; ".join(f"{k}={'|'.join(v)}" for k, v in cell.mixed.items()),
                **{key: (st.mean if (st := cell.diagnostic.get(key)) else "") for _, key in DIAGNOSTIC},
            })  # fmt: skip
        if table.spec.average:
            value = table.average.get(merge)
            rows.append({**dict.fromkeys(CSV_FIELDS, ""), "table": table.spec.name, "model": table.model,
                         "merge": merge, "row": label, "column": "Average", "metric": "mean of the columns' means",
                         "scale": table.scale, "mean": "" if value is None else value,
                         "n": 0 if value is None else len(table.spec.columns)})  # fmt: skip
    return rows


TEST_FIELDS = ("table", "model", "family", "row", "vs", "column", "metric", "test", "seeds", "differences",
               "mean_difference", "ci_low", "ci_high", "higher", "lower", "tied", "t", "p_value", "p_holm",
               "p_sign", "mark", "reason")  # fmt: skip


def test_rows(table: Table) -> list[dict[str, object]]:
    """Every test of the table, both families, with unrounded numbers."""
    out = []
    for family, tests in table.tests.items():
        for test in tests:
            c = test.result
            out.append({
                "table": table.spec.name, "model": table.model, "family": family, "row": test.row,
                "vs": test.against, "column": test.column.label, "metric": metric_name(table, test), "test": c.kind,
                "seeds": " ".join(c.seeds), "differences": " ".join(repr(d) for d in c.differences),
                "mean_difference": "" if c.difference is None else c.difference,
                "ci_low": c.ci[0] if c.ci else "", "ci_high": c.ci[1] if c.ci else "",
                "higher": c.wins, "lower": c.losses, "tied": c.ties, "t": "" if c.t is None else c.t,
                "p_value": "" if c.p is None else c.p, "p_holm": "" if c.p_holm is None else c.p_holm,
                "p_sign": "" if c.p_sign is None else c.p_sign, "mark": c.mark, "reason": c.reason,
            })  # fmt: skip
    return out


def dicts_to_csv(rows: list[dict[str, object]], fields: tuple[str, ...]) -> str:
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=fields, lineterminator="\n")
    writer.writeheader()
    for row in rows:
        writer.writerow({k: repr(v) if isinstance(v, float) else v for k, v in row.items()})
    return buffer.getvalue()


def to_csv(table: Table) -> str:
    return dicts_to_csv(csv_rows(table), CSV_FIELDS)
