"""A verdict for every published paper cell (`reports/paper_reference.yaml`) against the runs."""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass

from camex.report.aggregate import Stat
from camex.report.layout import ROW_LABEL
from camex.report.significance import verdict
from camex.report.tables import Grid, Table, fmt, fmt_ci

ORDER = ("reproduced", "above", "below", "not enough seeds", "not comparable")


@dataclass(frozen=True)
class PaperVerdict:
    table: str
    model: str  # the runs' model
    merge: str
    column: str
    published: float
    stat: Stat | None
    ci: tuple[float, float] | None
    verdict: str  # one of ORDER; `not comparable`: the runs logged another metric than the paper's
    decimals: int = 2


def paper_verdicts(tables: list[Table]) -> list[PaperVerdict]:
    """One verdict per published cell of every table that has published values (per model)."""
    out = []
    for table in tables:
        ref = table.reference
        if ref is None:
            continue
        for column in table.spec.columns:
            if column.task is None or column.metric is not None:
                continue
            for merge, cells in ref.values.items():
                if column.task not in cells or (merge, column.label) not in table.cells:
                    continue
                cell, value = table.cells[(merge, column.label)], cells[column.task]
                if cell.published is None and cell.stat is not None:
                    out.append(PaperVerdict(table.spec.name, table.model, merge, column.label, value, cell.stat,
                                            None, "not comparable", column.decimals))  # fmt: skip
                    continue
                label, ci = verdict(cell.stat, value)
                out.append(PaperVerdict(table.spec.name, table.model, merge, column.label, value, cell.stat, ci,
                                        label, column.decimals))  # fmt: skip
    return out


def verdict_summary(verdicts: list[PaperVerdict]) -> str:
    """`k of N published cells reproduced (a above, b below, c not enough seeds)`."""
    counts = Counter(v.verdict for v in verdicts)
    rest = ", ".join(f"{counts[k]} {k}" for k in ORDER[1:] if counts[k] or k != "not comparable")
    return f"{counts['reproduced']} of {len(verdicts)} published cells reproduced ({rest})"


def verdict_grid(verdicts: list[PaperVerdict]) -> Grid:
    header = ["row", "column", "model (runs)", "paper", "reproduced mean (n)", "95 % CI", "verdict"]
    body = []
    for v in verdicts:
        mean = "no runs" if v.stat is None else f"{fmt(v.stat.mean, v.decimals)} (n={v.stat.n})"
        body.append([ROW_LABEL.get(v.merge, v.merge), v.column, v.model, fmt(v.published, v.decimals), mean,
                     fmt_ci(v.ci), v.verdict])  # fmt: skip
    legend = ["reproduced: the paper value lies inside the 95 % t interval of the seeds (ends included); above / "
              "below: the whole interval lies above / below the paper value; not enough seeds: fewer than 2 runs; "
              "not comparable: the runs logged another metric than the paper published."]  # fmt: skip
    return Grid(f"Verdict per published paper cell: {verdict_summary(verdicts)}", header, body, legend)
