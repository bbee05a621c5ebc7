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


def convergence_figure(title: str, pairs: Mapping[tuple[str, str], Mapping[str, Mapping[str, Band]]], metric: str):
    """One row per (CA, twin) pair; columns: training loss and the eval metric against step.

    `pairs[(ca, twin)][panel][merge]` is the band of one merge variant in one panel
    (`train_loss` or `eval`).
    """
    fig, axes = plt.subplots(len(pairs), 2, figsize=(10, 3.2 * len(pairs)), squeeze=False)
    for row, ((ca, twin), panels) in enumerate(pairs.items()):
        for col, (panel, ylabel) in enumerate((("train_loss", "training loss"), ("eval", f"eval {metric}"))):
            ax = axes[row][col]
            for merge, colour, style in ((twin, "tab:blue", "--"), (ca, "tab:red", "-")):
                b = panels[panel].get(merge)
                if b is None or not b.steps:
                    continue
                lo = [m - s for m, s in zip(b.mean, b.std)]
                hi = [m + s for m, s in zip(b.mean, b.std)]
                ax.plot(b.steps, b.mean, style, color=colour, marker="o" if len(b.steps) < 12 else None,
                        label=f"{ROW_LABEL.get(merge, merge)} (n={max(b.n)})")  # fmt: skip
                ax.fill_between(b.steps, lo, hi, color=colour, alpha=0.2, linewidth=0)
            ax.set_xlabel("step")
            ax.set_ylabel(ylabel)
            ax.grid(alpha=0.3)
            ax.legend(fontsize=8)
    fig.suptitle(f"{title}: mean over seeds, band ± 1 std")
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
