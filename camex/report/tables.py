"""Build a table from runs (cells over seeds, published values, twin tests) and render it as
Markdown, LaTeX and CSV."""

from __future__ import annotations

import csv
import io
import math
import re
from dataclasses import dataclass, field

from camex.report.aggregate import Stat, differing_settings, summarise, summarise_key
from camex.report.collect import Run
from camex.report.layout import ROWS, TWINS, Column, TableSpec
from camex.report.reference import PublishedTable
from camex.report.significance import Welch, welch

NOT_RECOVERABLE = "n/r"  # the paper's value is not published in recoverable form (SPEC §10)
MIXED = "‡"


@dataclass
class Cell:
    stat: Stat | None  # scaled to the table's scale
    published: float | None = None
    test: Welch | None = None
    twin: str | None = None
    mixed: dict[str, list[str]] = field(default_factory=dict)
    metric_keys: tuple[str, ...] = ()  # the logged metric(s) the cell's runs report

    @property
    def difference(self) -> float | None:
        if self.stat is None or self.published is None:
            return None
        return self.stat.mean - self.published


@dataclass
class Table:
    spec: TableSpec
    model: str  # the model (tag) of every run in the table; a task too for efficiency tables
    rows: list[tuple[str, str]]
    cells: dict[tuple[str, str], Cell]  # (merge, column label) -> cell
    scale: float = 1.0
    reference: PublishedTable | None = None
    average: dict[str, float | None] = field(default_factory=dict)

    @property
    def key(self) -> str:
        return re.sub(r"[^A-Za-z0-9_.-]+", "_", f"{self.spec.name}__{self.model}")

    @property
    def missing(self) -> int:
        return sum(cell.stat is None for cell in self.cells.values())

    @property
    def total(self) -> int:
        return len(self.cells)


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
            cells[(merge, column.label)] = cell
    if spec.significance:
        for ca, twin in TWINS.items():
            for column in spec.columns:
                a, b = cells[(ca, column.label)], cells[(twin, column.label)]
                a.twin = twin
                if a.stat is not None and b.stat is not None:
                    a.test = welch(a.stat, b.stat)
    table = Table(spec, model, rows, cells, scale, reference)
    if spec.average:
        for merge, _ in rows:
            stats = [cells[(merge, c.label)].stat for c in spec.columns]
            table.average[merge] = math.fsum(s.mean for s in stats) / len(stats) if all(stats) else None
    return table


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
    return text


def _average_text(table: Table, merge: str) -> str:
    value = table.average.get(merge)
    d = table.spec.columns[0].decimals
    text = "missing" if value is None else fmt(value, d)
    return text + (f" · paper {NOT_RECOVERABLE}" if table.reference is not None else "")


def header(table: Table) -> list[str]:
    return ["row"] + [c.label for c in table.spec.columns] + (["Average"] if table.spec.average else [])


def body(table: Table) -> list[list[str]]:
    out = []
    for merge, label in table.rows:
        row = [label] + [cell_text(table, merge, c) for c in table.spec.columns]
        if table.spec.average:
            row.append(_average_text(table, merge))
        out.append(row)
    return out


def caption(table: Table) -> str:
    scale = f"; values ×{table.scale:g} to match the paper" if table.scale != 1 else ""
    return f"{table.spec.title} — model: {table.model}{scale}"


def legend(table: Table) -> list[str]:
    lines = [f"Cells: mean ± sample std over seeds (n runs). {table.missing} of {table.total} cells missing "
             "(no finished run logged the metric)."]  # fmt: skip
    if table.spec.significance:
        lines.append("Curvature-aware rows vs their Euclidean twin (Domain-specific, Ties, Dare), Welch's t-test "
                     "over seeds: ** p < 0.01, * p < 0.05, ns not significant; no mark: fewer than 2 seeds "
                     "or no spread.")  # fmt: skip
    if table.reference is not None:
        ref = table.reference
        lines.append(f"paper: the published value ({ref.description}; {ref.provenance}) and Δ = reproduced − "
                     f"paper; {NOT_RECOVERABLE}: not published in recoverable form.")  # fmt: skip
    mixed = sorted({f"{k} ∈ {{{', '.join(v)}}}" for c in table.cells.values() for k, v in c.mixed.items()})
    if mixed:
        lines.append(f"{MIXED} the cell's runs differ in settings, not only in seed: " + "; ".join(mixed))
    return lines


def to_markdown(table: Table) -> str:
    head = header(table)
    lines = [f"### {caption(table)}", "", "| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    lines += ["| " + " | ".join(row) + " |" for row in body(table)]
    return "\n".join(lines + [""] + [f"- {x}" for x in legend(table)]) + "\n"


_LATEX_ESCAPES = {"\\": r"\textbackslash{}", "&": r"\&", "%": r"\%", "$": r"\$", "#": r"\#", "_": r"\_",
                  "{": r"\{", "}": r"\}", "~": r"\textasciitilde{}", "^": r"\textasciicircum{}",
                  "±": r"$\pm$", "Δ": r"$\Delta$", "—": "--", "·": r"$\cdot$", "‡": r"$\ddagger$",
                  "×": r"$\times$", "∈": r"$\in$", "−": "-", "`": ""}  # fmt: skip


def latex_escape(text: str) -> str:
    return "".join(_LATEX_ESCAPES.get(ch, ch) for ch in text)


def to_latex(table: Table) -> str:
    head = header(table)
    lines = [r"\begin{table}[t]", r"\centering", r"\scriptsize", r"\begin{tabular}{l" + "l" * (len(head) - 1) + "}",
             r"\hline", " & ".join(latex_escape(h) for h in head) + r" \\", r"\hline"]  # fmt: skip
    lines += [" & ".join(latex_escape(x) for x in row) + r" \\" for row in body(table)]
    lines += [r"\hline", r"\end{tabular}", r"\caption{" + latex_escape(caption(table)) + ". "
              + latex_escape(" ".join(legend(table))) + "}", r"\end{table}"]  # fmt: skip
    return "\n".join(lines) + "\n"


CSV_FIELDS = (
    "table", "model", "merge", "row", "column", "task", "metric", "scale", "mean", "std", "n", "seeds", "run_ids",
    "paper", "difference", "twin", "twin_difference", "t", "p_value", "mark", "mixed_settings",
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
                "twin": cell.twin or "", "twin_difference": t.difference if t else "",
                "t": "" if t is None or t.t is None else t.t, "p_value": "" if t is None or t.p is None else t.p,
                "mark": t.mark if t else "",
                "mixed_settings": "; ".join(f"{k}={'|'.join(v)}" for k, v in cell.mixed.items()),
            })  # fmt: skip
        if table.spec.average:
            value = table.average.get(merge)
            rows.append({**dict.fromkeys(CSV_FIELDS, ""), "table": table.spec.name, "model": table.model,
                         "merge": merge, "row": label, "column": "Average", "metric": "mean of the columns' means",
                         "scale": table.scale, "mean": "" if value is None else value,
                         "n": 0 if value is None else len(table.spec.columns)})  # fmt: skip
    return rows


def to_csv(table: Table) -> str:
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=CSV_FIELDS, lineterminator="\n")
    writer.writeheader()
    for row in csv_rows(table):
        writer.writerow({k: repr(v) if isinstance(v, float) else v for k, v in row.items()})
    return buffer.getvalue()
