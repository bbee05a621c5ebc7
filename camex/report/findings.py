"""The findings section: one sentence per comparison, every number taken from a comparison table.

Each `Finding` names the test (table, family, row, against, column) it was written from, so the
numbers of the sentence can be checked against that table row (`tests/test_report_statistics.py`).
"""

from __future__ import annotations

from dataclasses import dataclass

from camex.report.layout import ROW_LABEL
from camex.report.significance import LEVELS
from camex.report.tables import NOT_LOGGED, Table, Test, diagnostic_texts, fmt_p, metric_name, sig

_ALPHA = LEVELS[-1][0]


@dataclass(frozen=True)
class Finding:
    text: str
    table: str  # Table.key
    family: str
    row: str
    vs: str
    column: str


def _task(table: Table, test: Test) -> str:
    return f"{test.column.task or test.column.label} ({table.model})"


def _p(label: str, p: float | None) -> str:
    text = fmt_p(p)
    return f"{label} p {text}" if text.startswith("<") else f"{label} p = {text}"


def sentence(table: Table, test: Test) -> str:
    """One sentence for one test, in the words and roundings of its comparison table."""
    c = test.result
    row, vs = ROW_LABEL.get(test.row, test.row), ROW_LABEL.get(test.against, test.against)
    metric, where = metric_name(table, test), _task(table, test)
    if c.kind == "identical":
        return f"{row} and {vs} gave bit-identical {metric} on all {c.n} seeds on {where}."
    if c.kind == "n/a" or c.difference is None:
        return f"{row} vs {vs} on {where}: {c.n} seed(s) on a side, no test."
    verb = "raises" if c.difference > 0 else "lowers"
    size = sig(abs(c.difference))
    parts = []
    if c.ci is not None:
        parts.append(f"95 % CI of the difference {sig(c.ci[0])} to {sig(c.ci[1])}")
    if c.kind == "paired":
        direction = "higher" if c.difference > 0 else "lower"
        parts.append(f"{direction} on {c.wins if c.difference > 0 else c.losses}/{c.n} seeds")
        parts.append(_p("paired t", c.p) if c.p is not None else "paired t undefined (" + c.reason + ")")
        if c.p_holm is not None:
            parts.append(_p("Holm", c.p_holm))
        if c.p_sign is not None:
            parts.append(_p("sign test", c.p_sign))
    else:
        parts.append(f"{_p('Welch', c.p)}, {_p('Holm', c.p_holm)} (seeds cannot be paired)")
    verdict = ""
    if c.p_holm is not None:
        verdict = " — significant after Holm" if c.p_holm < _ALPHA else " — not significant after Holm"
    return f"{row} {verb} {metric} by {size} against {vs} on {where} ({'; '.join(parts)}){verdict}."


def findings(tables: list[Table]) -> list[Finding]:
    """Twin comparisons first, then comparisons against Dense, in table order."""
    out = []
    for family in ("twin", "dense"):
        for table in tables:
            for test in table.tests.get(family, []):
                out.append(Finding(sentence(table, test), table.key, family, test.row, test.against,
                                   test.column.label))  # fmt: skip
    return out


def diagnostic_finding(tables: list[Table]) -> str:
    """One sentence on the curvature diagnostic of the curvature-aware rows."""
    logged, total = [], 0
    for table in tables:
        for test in table.tests.get("twin", []):
            total += 1
            texts = diagnostic_texts(table.cells[(test.row, test.column.label)])
            if NOT_LOGGED not in texts:
                row = ROW_LABEL.get(test.row, test.row)
                logged.append(f"{row} on {_task(table, test)}: operator change median {texts[0]}, max "
                              f"{texts[1]}; ‖τ‖/‖E_m‖ {texts[2]}; merged-weight change mean {texts[3]}, max "
                              f"{texts[4]}")  # fmt: skip
    if not total:
        return "Curvature diagnostic: no curvature-aware row has runs."
    if not logged:
        return f"Curvature diagnostic: not logged by the runs of any of the {total} curvature-aware cells (the runs " \
               "predate it)."  # fmt: skip
    return "Curvature diagnostic (mean over seeds, last evaluation): " + "; ".join(logged) + "."
