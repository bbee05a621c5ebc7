"""Figures with matplotlib's Agg backend: convergence curves and the α / rank ablations.

Every plotted number is a tracked metric (per-step history or final value) or a published value
from the reference file; each figure also writes its numbers as CSV beside it.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402  (after choosing the backend)

from camex.report.layout import ROW_LABEL  # noqa: E402
from camex.report.significance import t_interval  # noqa: E402

Curve = list[tuple[int, float]]  # (step, value) of one run


@dataclass(frozen=True)
class Band:
    """Mean over seeds per step, with the sample std (0 where one seed logged that step)."""

    steps: tuple[int, ...]
    mean: tuple[float, ...]
    std: tuple[float, ...]
    n: tuple[int, ...]


def band(curves: Sequence[Curve]) -> Band:
    by_step: dict[int, list[float]] = {}
    for curve in curves:
        for step, value in curve:
            if math.isfinite(value):
                by_step.setdefault(step, []).append(value)
    steps = sorted(by_step)
    means, stds, ns = [], [], []
    for step in steps:
        vals = by_step[step]
        m = math.fsum(vals) / len(vals)
        means.append(m)
        stds.append(math.sqrt(math.fsum((v - m) ** 2 for v in vals) / (len(vals) - 1)) if len(vals) > 1 else 0.0)
        ns.append(len(vals))
    return Band(tuple(steps), tuple(means), tuple(stds), tuple(ns))


def save(fig, folder: Path, name: str) -> dict[str, Path]:
    folder.mkdir(parents=True, exist_ok=True)
    paths = {fmt: folder / f"{name}.{fmt}" for fmt in ("png", "svg")}
    for fmt, path in paths.items():
        fig.savefig(path, format=fmt, dpi=110 if fmt == "png" else None, bbox_inches="tight")
    plt.close(fig)
    return paths


@dataclass(frozen=True)
class DiffBand:
    """Mean over seed pairs of (CA − twin) per step, with the 95 % t interval (None: one pair)."""

    steps: tuple[int, ...]
    mean: tuple[float, ...]
    low: tuple[float | None, ...]
    high: tuple[float | None, ...]
    n: tuple[int, ...]


def paired_band(pairs: Sequence[tuple[Curve, Curve]]) -> DiffBand:
    """Per step, the differences `a − b` of each pair of curves (same seed) that logged that step."""
    by_step: dict[int, list[float]] = {}
    for a, b in pairs:
        other = dict(b)
        for step, value in a:
            if step in other and math.isfinite(value) and math.isfinite(other[step]):
                by_step.setdefault(step, []).append(value - other[step])
    steps = sorted(by_step)
    intervals = [t_interval(by_step[s]) for s in steps]
    return DiffBand(tuple(steps), tuple(math.fsum(by_step[s]) / len(by_step[s]) for s in steps),
                    tuple(i[0] if i else None for i in intervals), tuple(i[1] if i else None for i in intervals),
                    tuple(len(by_step[s]) for s in steps))  # fmt: skip


# twin first and hollow, drawn over the CA series: both stay visible where they coincide
_STYLES = (("twin", "tab:blue", "--", "s", "none"), ("ca", "tab:red", "-", "o", "tab:red"))
MIN_LINE_POINTS = 3  # fewer points: markers only, no line suggesting a trend


def _draw_band(ax, b: Band, label: str, colour: str, style: str, marker: str, face: str, z: int, dodge: float) -> None:
    """A mean curve with its ± 1 std band; a short series as markers with error bars, moved
    sideways by `dodge` of the step spacing so two series at the same steps stay apart."""
    line = style if len(b.steps) >= MIN_LINE_POINTS else "none"
    steps = list(b.steps)
    if len(steps) < MIN_LINE_POINTS:
        gap = min((y - x for x, y in zip(steps, steps[1:])), default=1)
        steps = [s + dodge * gap for s in steps]
        ax.set_xticks(b.steps)
        ax.set_xlim(b.steps[0] - 0.5 * gap, b.steps[-1] + 0.5 * gap)
    ax.plot(steps, b.mean, linestyle=line, color=colour, marker=marker, markerfacecolor=face,
            markersize=6 if len(steps) < 12 else 4,
            label=label, zorder=z)  # fmt: skip
    lo = [m - s for m, s in zip(b.mean, b.std)]
    hi = [m + s for m, s in zip(b.mean, b.std)]
    if len(b.steps) >= MIN_LINE_POINTS:
        ax.fill_between(b.steps, lo, hi, color=colour, alpha=0.15, linewidth=0)
    else:
        ax.errorbar(steps, b.mean, yerr=[[m - x for m, x in zip(b.mean, lo)], [x - m for m, x in zip(b.mean, hi)]],
                    fmt="none", ecolor=colour, capsize=4, zorder=z)  # fmt: skip


def _draw_diff(ax, d: DiffBand) -> None:
    ax.axhline(0.0, color="#666", linewidth=0.8)
    if not d.steps:
        ax.text(0.5, 0.5, "no seed pairs", transform=ax.transAxes, ha="center")
        return
    line = "-" if len(d.steps) >= MIN_LINE_POINTS else "none"
    if len(d.steps) < MIN_LINE_POINTS:
        gap = min((y - x for x, y in zip(d.steps, d.steps[1:])), default=1)
        ax.set_xticks(d.steps)
        ax.set_xlim(d.steps[0] - 0.5 * gap, d.steps[-1] + 0.5 * gap)
    ax.plot(d.steps, d.mean, linestyle=line, marker="D", markersize=6 if len(d.steps) < 12 else 3, color="tab:purple",
            label=f"mean (pairs={max(d.n)})")  # fmt: skip
    banded = [(s, lo, hi) for s, lo, hi in zip(d.steps, d.low, d.high) if lo is not None]
    if banded and len(d.steps) >= MIN_LINE_POINTS:
        ax.fill_between([x[0] for x in banded], [x[1] for x in banded], [x[2] for x in banded], color="tab:purple",
                        alpha=0.2, linewidth=0, label="95 % t interval")  # fmt: skip
    elif banded:
        mean = dict(zip(d.steps, d.mean))
        ax.errorbar([x[0] for x in banded], [mean[x[0]] for x in banded],
                    yerr=[[mean[s] - lo for s, lo, _ in banded], [hi - mean[s] for s, _, hi in banded]],
                    fmt="none", ecolor="tab:purple", capsize=4, label="95 % t interval")  # fmt: skip


def convergence_figure(
    title: str,
    pairs: Mapping[tuple[str, str], Mapping[str, Mapping[str, Band]]],
    diffs: Mapping[tuple[str, str], Mapping[str, DiffBand]],
    metric: str,
):
    """One row per (CA, twin) pair; columns: training loss, its paired difference (CA − twin),
    the eval metric, its paired difference. `pairs[(ca, twin)][panel][merge]` is the band of one
    merge variant in one panel (`train_loss` or `eval`); `diffs[(ca, twin)][panel]` the paired one.
    """
    fig, axes = plt.subplots(len(pairs), 4, figsize=(17, 3.3 * len(pairs)), squeeze=False)
    for row, ((ca, twin), panels) in enumerate(pairs.items()):
        for col, (panel, ylabel) in enumerate((("train_loss", "training loss"), ("eval", f"eval {metric}"))):
            ax = axes[row][2 * col]
            for (who, colour, style, marker, face), z, dodge in zip(_STYLES, (3, 2), (-0.06, 0.06)):
                merge = twin if who == "twin" else ca
                b = panels[panel].get(merge)
                if b is not None and b.steps:
                    label = f"{ROW_LABEL.get(merge, merge)} (n={max(b.n)})"
                    _draw_band(ax, b, label, colour, style, marker, face, z, dodge)
            ax.set_ylabel(ylabel)
            dax = axes[row][2 * col + 1]
            _draw_diff(dax, diffs[(ca, twin)][panel])
            dax.set_ylabel(f"Δ {ylabel} (CA − Euclidean)")
            dax.set_title(f"{ROW_LABEL.get(ca, ca)} − {ROW_LABEL.get(twin, twin)}, per seed pair", fontsize=9)
            for a in (ax, dax):
                a.set_xlabel("step")
                a.grid(alpha=0.3)
                if a.get_legend_handles_labels()[0]:
                    a.legend(fontsize=7)
    fig.suptitle(f"{title}: mean over seeds (band ± 1 std); differences paired by seed (band: 95 % t interval); "
                 f"series of < {MIN_LINE_POINTS} points drawn as markers only")  # fmt: skip
    fig.tight_layout()
    return fig


def ablation_figure(
    title: str,
    param: str,
    series: Mapping[str, Mapping[str, list[tuple[float, float, float, int]]]],
    published: Mapping[str, Mapping[str, tuple[float, float]]],
    ylabels: Mapping[str, str],
):
    """One panel per task: the final metric against `param`, one line per merge variant.

    `series[task][merge]` = [(param value, mean, std, n)]; `published[task][merge]` = (param
    value, paper value), drawn as stars.
    """
    tasks = list(series)
    fig, axes = plt.subplots(1, len(tasks), figsize=(4.2 * len(tasks), 3.4), squeeze=False)
    for ax, task in zip(axes[0], tasks):
        for merge, points in series[task].items():
            xs = [p[0] for p in points]
            line = ax.errorbar(xs, [p[1] for p in points], yerr=[p[2] for p in points], marker="o", capsize=3,
                               label=ROW_LABEL.get(merge, merge))  # fmt: skip
            if merge in published.get(task, {}):
                x, y = published[task][merge]
                ax.plot([x], [y], marker="*", markersize=12, color=line[0].get_color(), linestyle="none",
                        label=f"{ROW_LABEL.get(merge, merge)} paper")  # fmt: skip
        ax.set_title(task)
        ax.set_xlabel(param)
        ax.set_ylabel(ylabels.get(task, "final metric"))
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    fig.suptitle(f"{title}: mean ± std over seeds")
    fig.tight_layout()
    return fig
