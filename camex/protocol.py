"""`python -m camex.protocol`: a table preset run by the paper's protocol, end to end, resumable.

    python -m camex.protocol glue_table --dry-run           # trial counts, estimated GPU-hours, stages
    python -m camex.protocol glue_table --seeds 3           # grid -> best per cell -> seeds -> report
    python -m camex.protocol glue_table -- task=glue/mrpc   # Hydra overrides for every run (here: one task)
    python -m camex.protocol glue_table --quick             # today's one-point preset (no grid, one seed)

Stages (conf/protocol/<preset>.yaml says what each searches; docs/protocol.md):
1. grid: every cell of the table (the preset's sweep: task x merge x ...) at every point of the grid
   (SPEC §9: batch {8,16,32,64} x lr {3e-4,1e-4,3e-5,1e-5}); one persistent grid study `<preset>-grid`;
2. best: per (task, model, merge), the grid point with the best validation metric (the run's
   primary metric at its selected epoch);
3. seeds: that configuration rerun with seeds 0..N-1 (`python -m camex.sweeps best-rerun` per cell),
   tracked in the MLflow experiment `<preset>-protocol`;
4. report: `python -m camex.report` over `<preset>-protocol`, plus `protocol.md` / `protocol.json`
   beside it: the configuration chosen for each cell, its grid value, and n, mean and std over seeds.

Every stage is a camex_optuna grid study, so rerunning the command resumes where it stopped: a
finished trial is never trained again, and a stage whose study is complete is not even launched.
"""

from __future__ import annotations

import argparse
import importlib.util
import itertools
import json
import math
import statistics
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
CONF = ROOT / "conf"
STAGES = ("grid", "seeds", "report")


class ProtocolError(ValueError):
    """Bad input: one line, exit status 2."""


def presets() -> list[str]:
    return sorted(p.stem for p in (CONF / "protocol").glob("*.yaml") if not p.stem.startswith("_"))


def _values(value: Any) -> list[Any]:
    """A sweep value from a config: a list, or Hydra's comma syntax `a,b,c`."""
    if isinstance(value, (list, tuple)):
        return list(value)
    return [v.strip() for v in str(value).split(",")]


def _text(value: Any) -> str:
    return ",".join(str(v) for v in value) if isinstance(value, (list, tuple)) else str(value)


@dataclass
class Plan:
    """The stages of one preset's protocol, composed from its configs."""

    preset: str
    cells: list[dict[str, str]]  # one per table cell: the preset's sweep values (task, merge, ...)
    grid: dict[str, list[Any]]  # searched in every cell
    grid_fixed: dict[str, Any]  # held during the grid stage only (e.g. the ablated alpha at 1)
    with_seeds: dict[str, list[Any]]  # swept with the seeds over each chosen configuration
    seeds: list[int]
    extra: list[str] = field(default_factory=list)  # Hydra overrides given after `--` for every run
    narrowed: list[str] = field(default_factory=list)  # of those, the ones that narrow the cells
    grid_seed: int = 42  # the config's `seed`: every grid trial runs with it

    @property
    def grid_points(self) -> int:
        return math.prod(len(v) for v in self.grid.values()) if self.grid else 0

    @property
    def grid_trials(self) -> int:
        return len(self.cells) * self.grid_points

    @property
    def runs_per_cell(self) -> int:
        return len(self.seeds) * math.prod(len(v) for v in self.with_seeds.values())

    @property
    def seed_trials(self) -> int:
        return len(self.cells) * self.runs_per_cell

    @property
    def grid_study(self) -> str:
        return f"{self.preset}-grid"

    @property
    def experiment(self) -> str:
        return f"{self.preset}-protocol"


def compose_plan(preset: str, seeds: list[int], extra: list[str] | None = None) -> Plan:
    """The protocol of `preset` through Hydra's Compose API: the preset's own sweep gives the
    cells, `conf/protocol/<preset>.yaml` the grid; overrides in `extra` of a cell key narrow it."""
    from hydra import compose, initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra
    from omegaconf import OmegaConf

    if preset not in presets():
        raise ProtocolError(f"preset {preset!r} has no protocol (conf/protocol/); allowed: {presets()}")
    extra = list(extra or [])
    fresh = not GlobalHydra.instance().is_initialized()
    context = initialize_config_dir(config_dir=str(CONF), version_base="1.3") if fresh else None
    try:
        if context is not None:
            context.__enter__()
        cfg = compose(config_name="config", overrides=[f"experiment={preset}", f"+protocol={preset}"],
                      return_hydra_config=True)  # fmt: skip
    finally:
        if context is not None:
            context.__exit__(None, None, None)
    cfg = OmegaConf.to_container(cfg, resolve=False)
    spec = cfg["protocol"]
    params = {str(k): _values(v) for k, v in ((cfg["hydra"]["sweeper"] or {}).get("params") or {}).items()}
    grid_fixed, with_seeds = dict(spec.get("grid_fixed") or {}), spec.get("with_seeds") or {}
    with_seeds = {k: _values(v) for k, v in with_seeds.items()}
    grid = {k: _values(v) for k, v in (spec.get("grid") or {}).items()}
    rest = []
    for line in extra:  # a cell or grid key given on the command line replaces the preset's values
        key, _, value = line.partition("=")
        if key in params or key in grid:
            (params if key in params else grid)[key] = _values(value)
        else:
            rest.append(line)
    # a preset's own `seed` sweep (e.g. convergence) is the seeds stage's business, not a cell
    keys = [k for k in params if k not in grid_fixed and k not in with_seeds and k != "seed"]
    cells = [dict(zip(keys, map(str, combo))) for combo in itertools.product(*(params[k] for k in keys))]
    narrowed = [line for line in extra if line.partition("=")[0] in params]
    return Plan(preset, cells, grid, grid_fixed, with_seeds, list(seeds), rest, narrowed, int(cfg["seed"]))


# ------------------------------------------------------------------------------------ commands
def grid_command(plan: Plan, output_root: Path) -> list[str]:
    return [
        sys.executable, str(ROOT / "run.py"), "-m", f"experiment={plan.preset}",
        "hydra/sweeper=camex_optuna", "hydra.sweeper.sampler=grid",
        f"hydra.sweeper.study_name={plan.grid_study}", f"experiment_name={plan.grid_study}",
        f"paths.output_root={output_root}", f"seed={plan.grid_seed}",
        *(f"{k}={v}" for k, v in plan.grid_fixed.items()),
        *(f"{k}={_text(v)}" for k, v in plan.grid.items()),
        *plan.narrowed, *plan.extra,
    ]  # fmt: skip


def quick_command(plan: Plan, output_root: Path) -> list[str]:
    return [sys.executable, str(ROOT / "run.py"), "-m", f"experiment={plan.preset}",
            f"paths.output_root={output_root}", *plan.narrowed, *plan.extra]  # fmt: skip


def seeds_command(plan: Plan, best: Any, output_root: Path) -> list[str]:
    """The chosen configuration of one cell over the seeds (`camex.sweeps` best-rerun's command)."""
    from camex.sweeps.__main__ import rerun_command

    extra = [f"paths.output_root={output_root}", *(f"{k}={_text(v)}" for k, v in plan.with_seeds.items()), *plan.extra]
    cmd = rerun_command(plan.grid_study, best, plan.seeds, extra)
    return [f"experiment_name={plan.experiment}" if a.startswith("experiment_name=") else a for a in cmd]


def seeds_only_command(plan: Plan, output_root: Path) -> list[str]:
    """A preset without a grid (e.g. efficiency): every cell at its one point, over the seeds."""
    return [
        *quick_command(plan, output_root)[:4], "hydra/sweeper=camex_optuna", "hydra.sweeper.sampler=grid",
        f"hydra.sweeper.study_name={plan.experiment}", f"experiment_name={plan.experiment}",
        f"paths.output_root={output_root}", f"seed={','.join(map(str, plan.seeds))}",
        *(f"{k}={_text(v)}" for k, v in plan.with_seeds.items()), *plan.narrowed, *plan.extra,
    ]  # fmt: skip


# ------------------------------------------------------------------------------------ studies
def _complete(storage: str, name: str) -> list[Any]:
    import optuna
    from optuna.trial import TrialState

    from camex.sweeps.study import open_storage

    if name not in optuna.get_all_study_names(open_storage(storage)):
        return []
    study = optuna.load_study(study_name=name, storage=open_storage(storage))
    return study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))


def _run(cmd: list[str], what: str) -> None:
    print("$ python " + " ".join(cmd[1:]), flush=True)
    if subprocess.run(cmd).returncode != 0:
        raise RuntimeError(f"the {what} stage failed; rerun this command to resume it")


def _estimate(plan: Plan) -> str:
    """Estimated GPU-hours per stage from scripts/estimate_gpu_hours.py (FLOPs; an ESTIMATE)."""
    path = ROOT / "scripts" / "estimate_gpu_hours.py"
    try:
        spec = importlib.util.spec_from_file_location("estimate_gpu_hours", path)
        est = sys.modules.setdefault("estimate_gpu_hours", importlib.util.module_from_spec(spec))
        spec.loader.exec_module(est)  # registered first: its dataclasses look their module up
        assumptions = est._yaml(ROOT / "scripts" / "gpu_hours.yaml")
        runs = est.table_runs(plan.preset)
        per_run = statistics.mean(est.run_flops(r, assumptions)[0] for r in runs)
    except (SystemExit, OSError, KeyError, ImportError) as e:  # the estimator's own refusals
        return f"estimated GPU-hours: not available ({e})"
    gpu = assumptions["gpu"]
    rate = gpu["peak_tflops"]["fp32"] * 1e12 * gpu["mfu"] * 3600
    grid, seeds = plan.grid_trials * per_run / rate, plan.seed_trials * per_run / rate
    return (f"estimated {gpu['name']}-hours (fp32, MFU {gpu['mfu']}; a FLOPs ESTIMATE at the preset's batch "
            f"size, scripts/gpu_hours.yaml): grid {grid:,.0f} + seeds {seeds:,.0f} = {grid + seeds:,.0f}")  # fmt: skip


# ------------------------------------------------------------------------------------ report
def _chosen(plan: Plan, storage: str, found: list[Any]) -> list[dict[str, Any]]:
    """One row per cell (and per value of a `with_seeds` option, e.g. each ablated alpha): the
    chosen grid point, its grid value, and the seeds' n, mean and std of the primary metric."""
    rows = []
    for best in found:
        by_option: dict[tuple, list[float]] = {}
        for t in _complete(storage, f"{plan.grid_study}-best-{best.slug}"):
            if t.params.get("seed") in plan.seeds:
                by_option.setdefault(tuple(t.params.get(k) for k in plan.with_seeds), []).append(t.value)
        for option, values in sorted(by_option.items(), key=lambda kv: str(kv[0])) or [((), [])]:
            rows.append({
                **best.group,
                "chosen": {k: v for k, v in best.params.items() if k in plan.grid},
                **({"with": dict(zip(plan.with_seeds, option))} if plan.with_seeds else {}),
                "grid_value": best.value,
                "grid_trials": best.n_complete,
                "n": len(values),
                "mean": statistics.mean(values) if values else None,
                "std": statistics.stdev(values) if len(values) > 1 else None,
            })  # fmt: skip
    return rows


def write_chosen(rows: list[dict[str, Any]], out: Path, plan: Plan) -> None:
    out.mkdir(parents=True, exist_ok=True)
    (out / "protocol.json").write_text(
        json.dumps({"preset": plan.preset, "seeds": plan.seeds, "cells": rows}, indent=2)
    )
    keys, options = list(plan.grid), list(plan.with_seeds)
    lines = [
        f"# {plan.preset}: configuration chosen per cell",
        "",
        f"Grid searched per cell: {', '.join(f'{k} {_text(v)}' for k, v in plan.grid.items())}; chosen by the "
        f"validation metric; then rerun with seeds {plan.seeds} (mean ± std below, the primary metric).",
        "",
        "| task | model | merge | " + " | ".join(keys + options) + " | grid value | n | mean ± std |",
        "|---|---|---|" + "---|" * len(keys + options) + "---:|---:|---:|",
    ]
    for r in rows:
        spread = "-" if not r["n"] else f"{r['mean']:.4g}" + (f" ± {r['std']:.2g}" if r["std"] is not None else "")
        chosen = [str(r["chosen"].get(k, "")) for k in keys] + [str(r.get("with", {}).get(k, "")) for k in options]
        cell = f"| {r['task']} | {r['model']} | {r['merge']} | {' | '.join(chosen)} |"
        lines.append(f"{cell} {r['grid_value']:.4g} | {r['n']} | {spread} |")
    (out / "protocol.md").write_text("\n".join(lines) + "\n")


# ------------------------------------------------------------------------------------ main
def run(plan: Plan, output_root: Path, until: str = "report") -> int:
    from camex.sweeps.study import best_per_group, default_storage

    storage = default_storage(output_root)
    if not plan.grid:  # nothing to search: the preset's one point over the seeds
        if len(_complete(storage, plan.experiment)) < plan.seed_trials:
            _run(seeds_only_command(plan, output_root), "seeds")
        else:
            print(f"seeds: {plan.seed_trials} runs complete, skipped")
        return _report(plan, output_root, storage, [])
    done = len(_complete(storage, plan.grid_study))
    if done < plan.grid_trials:
        print(f"grid: {done} of {plan.grid_trials} trials complete", flush=True)
        _run(grid_command(plan, output_root), "grid")
    else:
        print(f"grid: {plan.grid_trials} trials complete, skipped")
    if until == "grid":
        return 0
    import optuna

    from camex.sweeps.study import open_storage

    found = best_per_group(optuna.load_study(study_name=plan.grid_study, storage=open_storage(storage)))
    for best in found:
        params = {k: v for k, v in best.params.items() if k in plan.grid}
        print(f"best {' | '.join(best.group.values())}: {best.value:.6g} at {params}")
        have = len(_complete(storage, f"{plan.grid_study}-best-{best.slug}"))
        if have < plan.runs_per_cell:
            _run(seeds_command(plan, best, output_root), "seeds")
        else:
            print(f"  seeds: {plan.runs_per_cell} runs complete, skipped")
    if until == "seeds":
        return 0
    return _report(plan, output_root, storage, found)


def _report(plan: Plan, output_root: Path, storage: str, found: list[Any]) -> int:
    out = output_root / "reports" / plan.experiment
    uris = [a.split("=", 1)[1] for a in plan.extra if a.lstrip("+").startswith("tracking.uri=")]
    uri = uris[-1] if uris else f"sqlite:///{output_root / 'mlflow.db'}"  # the runs' store (tracking.uri)
    cmd = [sys.executable, "-m", "camex.report", "--tracking-uri", uri,
           "--experiment", plan.experiment, "--out", str(out)]  # fmt: skip
    _run(cmd, "report")
    if found:
        write_chosen(_chosen(plan, storage, found), out, plan)
        report = out / "report.md"  # the chosen configurations become a section of the report too
        if report.exists():
            report.write_text(report.read_text().rstrip("\n") + "\n\n#" + (out / "protocol.md").read_text())
    print(f"report: {out}")
    return 0


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    extra = argv[argv.index("--") + 1 :] if "--" in argv else []
    argv = argv[: argv.index("--")] if "--" in argv else argv
    parser = argparse.ArgumentParser(prog="python -m camex.protocol", description=__doc__.splitlines()[0])
    parser.add_argument("preset", help="a table preset with a protocol: " + ", ".join(presets()))
    parser.add_argument("--seeds", type=int, default=3, help="seeds per chosen configuration (default 3)")
    parser.add_argument("--first-seed", type=int, default=0, help="first seed (default 0)")
    parser.add_argument("--output-root", default="outputs", help="paths.output_root of every run (default: outputs)")
    parser.add_argument("--dry-run", action="store_true", help="print trial counts, GPU-hours and stages only")
    parser.add_argument("--quick", action="store_true", help="the preset's one point, one seed (no protocol)")
    parser.add_argument("--until", choices=STAGES, default="report", help="stop after this stage")
    args = parser.parse_args(argv)
    output_root = Path(args.output_root).resolve()
    try:
        if args.seeds < 1:
            raise ProtocolError(f"--seeds must be >= 1, got {args.seeds}")
        plan = compose_plan(args.preset, list(range(args.first_seed, args.first_seed + args.seeds)), extra)
        if args.quick:
            print(f"quick: {len(plan.cells)} runs (one point, one seed)")
            if args.dry_run:
                print("$ python " + " ".join(quick_command(plan, output_root)[1:]))
                return 0
            _run(quick_command(plan, output_root), "quick")
            return 0
        if args.dry_run:
            print(describe(plan, output_root))
            return 0
        return run(plan, output_root, args.until)
    except ProtocolError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except RuntimeError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1


def describe(plan: Plan, output_root: Path) -> str:
    lines = [f"protocol {plan.preset}: {len(plan.cells)} cells"]
    if plan.grid:
        grid = " x ".join(f"{k} {{{_text(v)}}}" for k, v in plan.grid.items())
        fixed = f", holding {plan.grid_fixed}" if plan.grid_fixed else ""
        lines += [
            f"1. grid: {len(plan.cells)} cells x {plan.grid_points} points ({grid}{fixed}) = {plan.grid_trials} trials",
            f"   $ python {' '.join(grid_command(plan, output_root)[1:])}",
            "2. best: per (task, model, merge) the grid point with the best validation metric",
        ]
    with_seeds = "".join(f" x {len(v)} {k}" for k, v in plan.with_seeds.items())
    lines += [
        f"3. seeds: {len(plan.cells)} cells x {len(plan.seeds)} seeds{with_seeds} = {plan.seed_trials} runs "
        f"(seeds {plan.seeds}; MLflow experiment {plan.experiment})",
        f"4. report: {output_root / 'reports' / plan.experiment} (protocol.md: the chosen configuration per cell)",
        f"total: {plan.grid_trials + plan.seed_trials} runs; " + _estimate(plan),
    ]
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
