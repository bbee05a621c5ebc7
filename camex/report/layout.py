"""What the paper's tables look like: rows (SPEC §8), columns per task family, CA/Euclidean twins.

Layout only: which merge variant is which row, which task and metric is which column. Every
number in a table comes from the tracked runs or the reference file.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

# SPEC §8, in the paper's order: merge variant name -> row label.
ROWS: tuple[tuple[str, str], ...] = (
    ("dense", "Dense"),
    ("smoe", "SMoE"),
    ("domain", "Domain-specific"),
    ("camex", "Domain-specific-CA"),
    ("ties", "Ties"),
    ("camex_ties", "Ties-CA"),
    ("dare", "Dare"),
    ("camex_dare", "Dare-CA"),
    ("ep_camex", "EP-CAMEx"),
)
ROW_LABEL = dict(ROWS)
# Each curvature-aware row and the Euclidean merge it is tested against.
TWINS: dict[str, str] = {"camex": "domain", "camex_ties": "ties", "camex_dare": "dare"}
DENSE = "dense"  # every other row is also tested against this one
# The curvature diagnostic each run logs at every evaluation (camex/moe/diagnostics.py logs these
# keys; the report reads their last value): label, MLflow key.
DIAGNOSTIC: tuple[tuple[str, str], ...] = (
    ("‖M−M₀‖/‖M₀‖ median", "curvature_operator_change_median"),
    ("‖M−M₀‖/‖M₀‖ max", "curvature_operator_change_max"),
    ("‖τ‖/‖E_m‖ mean", "curvature_tau_ratio_mean"),
    ("‖Ê_CA−Ê_Eucl‖/‖Ê_Eucl‖ mean", "curvature_merged_change_mean"),
    ("‖Ê_CA−Ê_Eucl‖/‖Ê_Eucl‖ max", "curvature_merged_change_max"),
)


@dataclass(frozen=True)
class Column:
    """One table column: a task's final metric (`metric`; None = the task's primary metric), or
    any logged metric `key` with an optional per-run `transform` (efficiency columns)."""

    label: str
    task: str | None = None  # None: the task of the table (efficiency tables, one per task)
    metric: str | None = None
    key: str | None = None
    transform: Callable[[float], float] | None = None
    decimals: int = 4
    unit: str = ""


@dataclass(frozen=True)
class TableSpec:
    name: str
    title: str
    columns: tuple[Column, ...]
    reference: str | None = None  # name of a table in the reference file
    average: bool = False  # add the mean of the row's columns (only when every column has runs)
    significance: bool = True


GLUE = TableSpec(
    name="glue",
    title="GLUE dev (primary metric of each task; MRPC and QQP F1, STS-B Spearman, CoLA Matthews, MNLI matched)",
    columns=tuple(
        Column(label, f"glue/{task}", decimals=2)
        for task, label in (("cola", "CoLA"), ("sst2", "SST-2"), ("mrpc", "MRPC"), ("stsb", "STS-B"),
                            ("qqp", "QQP"), ("mnli", "MNLI"), ("qnli", "QNLI"), ("rte", "RTE"))
    ),  # fmt: skip
    reference="glue",
    average=True,
)
LM = TableSpec(
    name="lm",
    title="Language modelling (validation perplexity, lower is better)",
    columns=(
        Column("WikiText-2 ppl", "lm/wikitext2", "perplexity", decimals=2),
        Column("WikiText-103 ppl", "lm/wikitext103", "perplexity", decimals=2),
    ),
)
QA = TableSpec(
    name="qa",
    title="Question answering (SQuAD v1.1 EM/F1 ×100; WikiQA accuracy, MAP, MRR)",
    columns=(
        Column("SQuAD EM", "qa/squad", "exact_match", decimals=2),
        Column("SQuAD F1", "qa/squad", "f1", decimals=2),
        Column("WikiQA acc", "qa/wikiqa", "accuracy"),
        Column("WikiQA MAP", "qa/wikiqa", "map"),
        Column("WikiQA MRR", "qa/wikiqa", "mrr"),
    ),
)
VISION = TableSpec(
    name="vision",
    title="Image classification (ImageNet-1k top-1)",
    columns=(Column("ImageNet-1k top-1", "vision/imagenet1k", "top1"),),
)
PAPER_TABLES = (GLUE, LM, QA, VISION)
PAPER_TASKS = {c.task for spec in PAPER_TABLES for c in spec.columns}


def other_tasks_table(tasks: list[str]) -> TableSpec:
    """Tasks outside the paper's tables (offline/*, anything else): their primary metric each."""
    return TableSpec(
        name="other",
        title="Other tasks (primary metric of each task; offline CPU reproductions)",
        columns=tuple(Column(task, task) for task in sorted(tasks)),
    )


def _per_step_seconds(steps_per_second: float) -> float:
    return 1.0 / steps_per_second


EFFICIENCY = TableSpec(
    name="efficiency",
    title="Efficiency (from the tracked runs: parameters by layer type, peak memory, training step time)",
    columns=(
        Column("params total", key="final_params_total", decimals=0),
        Column("params experts", key="final_params_merged_experts", decimals=0),
        Column("params base", key="final_params_merged_base", decimals=0),
        Column("params SMoE experts", key="final_params_smoe_experts", decimals=0),
        Column("params router", key="final_params_router", decimals=0),
        Column("params curvature", key="final_params_curvature", decimals=0),
        Column("FLOPs/token", key="final_flops_per_token", decimals=0),
        Column("peak GPU MiB", key="peak_gpu_memory_mb", decimals=1),
        Column("peak RSS MiB", key="peak_rss_mb", decimals=1),
        Column("step time s", key="train_steps_per_second", transform=_per_step_seconds),
    ),
    significance=False,
)
