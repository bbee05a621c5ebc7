"""The pre-registered CPU experiment (docs/prereg_cpu.md) in one command: two sweeps, the report, the
pre-registered tests.

    python scripts/prereg_cpu.py                                    # 40 runs -> reports/prereg_cpu/
    python scripts/prereg_cpu.py --reduced --outputs /tmp/o --out /tmp/r   # the pipeline, a few minutes
    python scripts/prereg_cpu.py --compare reports/prereg_cpu --out /tmp/r # regenerate, then compare

Builds the fine-tuning arm's three experts (scripts/prereg_experts.py, into `--outputs`/experts),
then runs `python run.py -m experiment=prereg_lm` (24 runs: Domain-specific, -CA, Ties, Ties-CA x 6
seeds), `experiment=prereg_lm_control` (6 runs: Domain-specific and Ties at learning rate x 1.2,
seeds 0-2) and `experiment=prereg_ft` (10 runs: the MoE composed from the experts fine-tuned on BBC
News, Domain-specific vs -CA x 5 seeds), each a persistent grid study whose parallel launcher trains
two runs at a time, into one MLflow store (`--outputs`/mlflow.db); then `python -m camex.report` on
the main and fine-tuning arms and `python -m camex.report.prereg` (H1, H2, H3 and the manipulation
checks: `--out`/prereg.md). Stopped, it resumes where it stopped when the same command is run
again. `--reduced`: 2 steps on a few examples, Domain-specific vs -CA, 2 seeds, experts of 1 step
(a check of the pipeline, not a result). `--compare DIR`: every (task, model,
merge) mean of the main arm must agree with DIR's within seed noise. The pipeline itself is
scripts/reproduce_cpu_mini.py's `reproduce`.
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))  # the sibling driver, also when loaded by path
import prereg_experts  # noqa: E402
import reproduce_cpu_mini as pipeline  # noqa: E402

from camex.report import prereg  # noqa: E402  (reproduce_cpu_mini puts the repository on sys.path)

PRESETS = {"main": "prereg_lm", "control": "prereg_lm_control", "finetune": "prereg_ft"}
# --reduced: every stage on a few blocks, 2 seeds; Domain-specific vs -CA (the control: Domain-specific)
REDUCED = {
    "common": ["trainer.max_steps=2", "trainer.max_train_samples=16", "trainer.max_eval_samples=2",
               "trainer.eval_steps=1", "trainer.logging_steps=1", "trainer.warmup_steps=0", "seed=0,1"],  # fmt: skip
    "main": ["merge=domain,camex"],
    "control": ["merge=domain"],
    "finetune": ["merge=domain,camex", "task.max_length=16"],
}


def _prereg(outputs: Path, out: Path) -> None:
    path = prereg.write(f"sqlite:///{outputs}/mlflow.db", out)
    print(f"pre-registered tests: {path}")


def _experts(outputs: Path, reduced: bool) -> None:
    prereg_experts.build(outputs / "experts", reduced=reduced)


def main(argv: list[str] | None = None) -> int:
    return pipeline.reproduce(argv, script="scripts/prereg_cpu.py", description=__doc__.splitlines()[0],
                              presets=PRESETS, reduced=REDUCED, experiments=[prereg.MAIN, prereg.FINETUNE],
                              outputs="outputs/prereg_cpu", out="reports/prereg_cpu", after_report=_prereg,
                              before_sweeps=_experts)  # fmt: skip


if __name__ == "__main__":
    sys.exit(main())
