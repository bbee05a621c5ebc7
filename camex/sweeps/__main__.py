"""`python -m camex.sweeps`: look into finished sweeps and rerun their best configurations.

    python -m camex.sweeps list                              # studies in the default storage
    python -m camex.sweeps best --study NAME                 # best trial per (task, model, merge)
    python -m camex.sweeps best-rerun --study NAME --seeds 3 # rerun each of them with seeds 0, 1, 2

`best-rerun` runs, per group, a grid sweep over the seeds with the best trial's overrides (its own
study `<NAME>-best-<group>`, so it resumes like any sweep, with its own MLflow parent run) and
prints mean ± std of the objective. Arguments after `--` go to every rerun command (e.g.
`-- hydra/launcher=parallel`).
"""

from __future__ import annotations

import argparse
import statistics
import subprocess
import sys
from pathlib import Path

import optuna
from optuna.trial import TrialState

from camex.sweeps.study import GROUP_KEYS, Best, best_per_group, default_storage, open_storage

RUN_PY = Path(__file__).resolve().parents[2] / "run.py"


class CliError(ValueError):
    pass


def load(storage: str, name: str) -> optuna.Study:
    names = optuna.get_all_study_names(open_storage(storage))
    if name not in names:
        raise CliError(f"--study {name!r} is not in {storage}; studies there: {names}")
    return optuna.load_study(study_name=name, storage=open_storage(storage))


def rerun_command(study_name: str, best: Best, seeds: list[int], extra: list[str]) -> list[str]:
    """The sweep that reruns `best` once per seed (a grid over `seed`, nothing else sampled)."""
    keep = [o for o in best.overrides if o.split("=", 1)[0].lstrip("+~") not in ("seed", "experiment_name")]
    return [
        sys.executable, str(RUN_PY), "-m", "hydra/sweeper=camex_optuna", *keep,
        f"seed={','.join(map(str, seeds))}",
        f"experiment_name={study_name}-best",
        "hydra.sweeper.sampler=grid", "hydra.sweeper.n_trials=null",
        f"hydra.sweeper.study_name={study_name}-best-{best.slug}",
        *extra,
    ]  # fmt: skip


def _values(storage: str, name: str, seeds: list[int]) -> list[float]:
    study = load(storage, name)
    return [t.value for t in study.get_trials(states=(TrialState.COMPLETE,)) if t.params.get("seed") in seeds]


def _print_best(found: list[Best]) -> None:
    for b in found:
        group = " | ".join(b.group[k] for k in GROUP_KEYS)
        print(f"{group}: {b.value:.6g} (trial {b.number} of {b.n_complete}) {b.params}")


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    extra = argv[argv.index("--") + 1 :] if "--" in argv else []
    argv = argv[: argv.index("--")] if "--" in argv else argv
    parser = argparse.ArgumentParser(prog="python -m camex.sweeps", description=__doc__.splitlines()[0])
    parser.add_argument("command", choices=("list", "best", "best-rerun"))
    parser.add_argument("--storage", default=None, help="study storage URL (default: sqlite under outputs/sweeps)")
    parser.add_argument("--output-root", default="outputs", help="paths.output_root of the sweep (default: outputs)")
    parser.add_argument("--study", help="study name (printed at the start and end of a sweep; see `list`)")
    parser.add_argument("--seeds", type=int, default=3, help="best-rerun: number of seeds (default 3)")
    parser.add_argument("--first-seed", type=int, default=0, help="best-rerun: first seed (default 0)")
    parser.add_argument("--dry-run", action="store_true", help="best-rerun: print the commands only")
    args = parser.parse_args(argv)
    storage = args.storage or default_storage(args.output_root)
    try:
        if args.command == "list":
            for name in optuna.get_all_study_names(open_storage(storage)):
                study = load(storage, name)
                states = [t.state.name for t in study.get_trials(deepcopy=False)]
                print(f"{name}: {study.direction.name.lower()}, {states.count('COMPLETE')} complete, "
                      f"{states.count('FAIL')} failed, {states.count('RUNNING')} running")  # fmt: skip
            return 0
        if not args.study:
            raise CliError(f"--study is required for {args.command}; see: python -m camex.sweeps list")
        if args.seeds < 1:
            raise CliError(f"--seeds must be >= 1, got {args.seeds}")
        found = best_per_group(load(storage, args.study))
        if not found:
            raise CliError(f"study {args.study!r} has no complete trial yet")
        _print_best(found)
        if args.command == "best":
            return 0
        seeds = list(range(args.first_seed, args.first_seed + args.seeds))
        for best in found:
            cmd = rerun_command(args.study, best, seeds, extra)
            print("\n$ python " + " ".join(cmd[1:]), flush=True)
            if not args.dry_run and subprocess.run(cmd).returncode != 0:
                print(f"error: the rerun of {best.slug} failed; rerun this command to resume it", file=sys.stderr)
                return 1
        if args.dry_run:
            return 0
        print(f"\n{args.study}: best configuration per group over seeds {seeds}")
        for best in found:
            values = _values(storage, f"{args.study}-best-{best.slug}", seeds)
            spread = statistics.stdev(values) if len(values) > 1 else 0.0
            group = " | ".join(best.group[k] for k in GROUP_KEYS)
            print(f"{group}: {statistics.mean(values):.6g} ± {spread:.3g} "
                  f"(n={len(values)}) {best.params}")  # fmt: skip
        return 0
    except CliError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
