"""The sweep loop: ask Optuna for trials, launch them through Hydra's launcher, tell the results.

One study per search (storage: `hydra.sweeper.storage`, default SQLite under the outputs
directory). Running the same command again resumes it: finished trials are never repeated, a
trial whose worker died (killed, node lost) is adopted and continued from its checkpoint, and the
remaining trials run. Several workers may run the same command against one storage at once: they
claim trials under a file lock, so no grid point runs twice and no budget is overshot.

Each trial gets its own run directory (`<output_root>/sweeps/<study>/trial<NNNN>`), a child MLflow
run nested under the sweep's parent run, and user attributes in the study (its overrides, run
directory, (task, model, merge), worker, and why it failed if it did).
"""

from __future__ import annotations

import logging
import math
import os
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import optuna
from hydra.core.override_parser.overrides_parser import OverridesParser
from hydra.core.utils import JobReturn, JobStatus
from hydra.errors import HydraException
from hydra.types import HydraContext, TaskFunction
from omegaconf import DictConfig, OmegaConf
from optuna.distributions import BaseDistribution, CategoricalDistribution
from optuna.trial import TrialState

from camex import tracking
from camex.sweeps import outcome as outcomes
from camex.sweeps import study as studies
from camex.sweeps.parent_run import ParentRun, mlflow_key
from hydra_plugins.camex_optuna_sweeper._search_space import SearchSpace, SearchSpaceError, parse

log = logging.getLogger(__name__)

SAMPLERS = ("grid", "tpe", "random")
DIRECTIONS = ("auto", "maximize", "minimize")
# Fault injection for tests: after N trials this process has told, the next trial is SIGKILLed
# mid-training (through train.py's CAMEX_FAULT_KILL_AT_STEP), taking this sweeper with it when
# the launcher runs trials in-process (basic launcher) — what a resumed sweep must survive.
FAULT_ENV = "CAMEX_FAULT_SWEEP_KILL_AFTER"


class _GridSampler(optuna.samplers.GridSampler):
    """Optuna's grid sampler without its end-of-grid `study.stop()`, which only works inside
    `study.optimize`; with ask/tell the sweep loop itself stops when no grid point is left."""

    def after_trial(self, study, trial, state, values) -> None:
        pass


@dataclass
class Planned:
    """A trial claimed by this worker and about to run."""

    trial: optuna.Trial
    overrides: list[str]  # config overrides: fixed and sampled
    run_dir: Path
    adopted: bool = False  # a dead worker's trial, continued with resume=true
    launch: list[str] = field(default_factory=list)


def _quote(text: str) -> str:
    return "'" + text.replace("\\", "\\\\").replace("'", "\\'") + "'"


@dataclass
class SweepLoop:
    """The implementation behind `CamexOptunaSweeper` (imported only when a sweep starts); the
    fields are the options of `conf/hydra/sweeper/camex_optuna.yaml`."""

    sampler: str = "grid"
    direction: str = "auto"
    n_trials: int | None = None
    n_jobs: int | None = None
    seed: int = 0
    study_name: str | None = None
    storage: str | None = None
    retry_failed: bool = False
    heartbeat_s: float = 60.0
    stale_after_s: float = 600.0
    params: Any = None
    told: int = field(default=0, init=False)  # trials this process has told

    def setup(self, *, hydra_context: HydraContext, task_function: TaskFunction, config: DictConfig) -> None:
        from hydra.core.plugins import Plugins

        self.hydra_context = hydra_context
        self.config = config
        self.launcher = Plugins.instance().instantiate_launcher(
            hydra_context=hydra_context, task_function=task_function, config=config
        )

    # ----------------------------------------------------------------------------- checks
    def _check_options(self) -> None:
        def need(key: str, ok: bool, allowed: str) -> None:
            if not ok:
                raise SearchSpaceError(f"hydra.sweeper.{key}={getattr(self, key)!r} is invalid; allowed: {allowed}")

        need("sampler", self.sampler in SAMPLERS, str(list(SAMPLERS)))
        need("direction", self.direction in DIRECTIONS, str(list(DIRECTIONS)))
        need("n_trials", self.n_trials is None or (isinstance(self.n_trials, int) and self.n_trials >= 1),
             "null or an integer >= 1")  # fmt: skip
        if self.n_jobs is None:  # as many as the launcher runs at once (joblib's n_jobs; -1: every CPU)
            n_jobs = OmegaConf.select(self.config, "hydra.launcher.n_jobs", default=1)
            self.n_jobs = (os.cpu_count() or 1) if n_jobs == -1 else n_jobs
        need("n_jobs", isinstance(self.n_jobs, int) and self.n_jobs >= 1, "null or an integer >= 1")
        if self.sampler != "grid" and self.n_trials is None:
            raise SearchSpaceError(f"hydra.sweeper.n_trials is required with sampler={self.sampler}")

    def _compose(self, overrides: list[str]) -> DictConfig:
        return self.hydra_context.config_loader.load_sweep_config(self.config, list(overrides))

    def _preflight(self, space: SearchSpace) -> bool:
        """Compose every value of every parameter once (typos fail here, before any training) and
        return whether the study maximises: `task.greater_is_better` of every task in the sweep."""

        def start(dist: BaseDistribution) -> Any:
            return dist.choices[0] if isinstance(dist, CategoricalDistribution) else dist.low

        first = {name: start(dist) for name, dist in space.distributions.items()}
        variants = [first] + [
            {**first, name: value}
            for name, dist in space.distributions.items()
            if isinstance(dist, CategoricalDistribution)
            for value in dist.choices[1:]
        ]
        directions: dict[str, bool] = {}
        for params in variants:
            cfg = self._compose(space.overrides(params))
            task = OmegaConf.select(cfg, "task.name", default="?")
            directions[str(task)] = bool(OmegaConf.select(cfg, "task.greater_is_better", default=True))
        if self.direction != "auto":
            return self.direction == "maximize"
        if len(set(directions.values())) > 1:
            raise SearchSpaceError(
                f"hydra.sweeper.direction=auto: the tasks of this sweep disagree ({directions}, true = greater is "
                "better); split the sweep per task family or set hydra.sweeper.direction"
            )
        return next(iter(directions.values()))

    # ----------------------------------------------------------------------------- study
    def _sampler(self, space: SearchSpace) -> optuna.samplers.BaseSampler:
        if self.sampler == "grid":
            return _GridSampler(space.grid(), seed=self.seed)
        if self.sampler == "tpe":
            return optuna.samplers.TPESampler(seed=self.seed)
        return optuna.samplers.RandomSampler(seed=self.seed)

    def _open_study(self, space: SearchSpace, name: str, maximize: bool) -> optuna.Study:
        identity = space.identity(self.sampler)
        study = optuna.create_study(
            storage=studies.open_storage(self.storage_url),
            sampler=self._sampler(space),
            study_name=name,
            direction="maximize" if maximize else "minimize",
            load_if_exists=True,
        )
        if (study.direction == optuna.study.StudyDirection.MAXIMIZE) != maximize:
            raise SearchSpaceError(f"study {name!r} was created to {study.direction.name.lower()}; this sweep does not")
        known = study.user_attrs.get("identity")
        if known is None:
            study.set_user_attr("identity", identity)
            study.set_user_attr("fixed_overrides", space.fixed)
            study.set_user_attr("sampler", self.sampler)
        elif known != identity:
            raise SearchSpaceError(
                f"study {name!r} in {self.storage_url} holds another search "
                f"(overrides {study.user_attrs.get('fixed_overrides')}); "
                "pass a new hydra.sweeper.study_name or the original overrides"
            )
        return study

    def _grid_left(self, study: optuna.Study, trials: list) -> int:
        taken = {
            t.system_attrs["grid_id"] for t in trials if "grid_id" in t.system_attrs and t.state != TrialState.WAITING
        }
        return math.prod(len(values) for values in self.space.grid().values()) - len(taken)

    def _may_ask(self, study: optuna.Study) -> bool:
        trials = study.get_trials(deepcopy=False)
        if any(t.state == TrialState.WAITING for t in trials):
            return True
        if self.n_trials is not None and len(trials) >= self.n_trials:
            return False
        return self._grid_left(study, trials) > 0 if self.sampler == "grid" else True

    def _enqueue_failed(self, study: optuna.Study) -> None:
        """retry_failed: grid points whose every trial failed are queued again."""
        trials = study.get_trials(deepcopy=False)
        alive = {studies.params_key(t.params) for t in trials if t.state != TrialState.FAIL}
        for trial in trials:
            key = studies.params_key(trial.params)
            if trial.state == TrialState.FAIL and trial.params and key not in alive:
                study.enqueue_trial(trial.params, user_attrs={"retry_of": trial.number})
                alive.add(key)

    # ----------------------------------------------------------------------------- trials
    def _run_dir(self, number: int) -> Path:
        return self.output_root / studies.STUDY_DIR / self.name / f"trial{number:04d}"

    def _claim(self, trial: optuna.Trial, overrides: list[str], adopted: bool = False) -> Planned:
        run_dir = self._run_dir(trial.number)
        cfg = self._compose(overrides)
        group = {
            "task": str(OmegaConf.select(cfg, "task.name")),
            "model": str(OmegaConf.select(cfg, "model.name")),
            "merge": str(OmegaConf.select(cfg, "merge.variant")),
        }
        trial.set_user_attr("overrides", overrides)
        trial.set_user_attr("run_dir", str(run_dir))
        trial.set_user_attr("group", group)
        trial.set_user_attr("worker", studies.this_worker())
        trial.set_user_attr("heartbeat", time.time())
        return Planned(trial, overrides, run_dir, adopted)

    def _adopt_orphans(self, study: optuna.Study) -> list[Planned]:
        adopted = []
        for frozen in study.get_trials(deepcopy=False, states=(TrialState.RUNNING,)):
            if studies.is_orphan(frozen, self.stale_after_s):
                trial = optuna.Trial(study, frozen._trial_id)
                overrides = frozen.user_attrs.get("overrides") or self.space.overrides(frozen.params)
                log.info(f"adopting trial {frozen.number} of a worker that is gone; it resumes from its checkpoint")
                adopted.append(self._claim(trial, list(overrides), adopted=True))
        return adopted

    def _ask(self, study: optuna.Study, count: int) -> list[Planned]:
        planned = []
        while len(planned) < count and self._may_ask(study):
            trial = study.ask(self.space.distributions)
            planned.append(self._claim(trial, self.space.overrides(trial.params)))
        return planned

    def _launch_overrides(self, plan: Planned) -> list[str]:
        number, params = plan.trial.number, plan.trial.params
        extra = [
            f"paths.run_dir={_quote(str(plan.run_dir))}",
            f"hydra.sweep.subdir={_quote(f'{self.name}/trial{number:04d}')}",
        ]
        if self.parent is not None:
            extra += [
                f"++tracking.parent_run_id={_quote(self.parent.run_id)}",
                f"++tracking.tags.sweep.study={_quote(self.name)}",
                f"++tracking.tags.sweep.trial={_quote(str(number))}",
                *(f"++tracking.tags.sweep.param.{mlflow_key(k)}={_quote(str(v))}" for k, v in params.items()),
            ]
        if plan.adopted:
            extra.append("resume=true")
        return [*plan.overrides, *extra]

    def _tell(self, study: optuna.Study, plan: Planned, result: outcomes.Outcome) -> None:
        for key, value in result.attrs.items():
            if value is not None:
                plan.trial.set_user_attr(key, value)
        if result.failed:
            plan.trial.set_user_attr("fail_reason", result.reason)
            study.tell(plan.trial, state=TrialState.FAIL)
            log.warning(f"trial {plan.trial.number} failed: {result.reason}")
        else:
            study.tell(plan.trial, result.value)
            log.info(f"trial {plan.trial.number}: {result.value} {plan.trial.params}")
        self.told += 1
        if self.parent is not None:
            self.parent.record(study, plan.trial.number, result.value)

    def _run_batch(self, study: optuna.Study, batch: list[Planned], job_idx: int) -> list[JobReturn]:
        to_launch = []
        for plan in batch:
            done = outcomes.read_metrics(plan.run_dir) if plan.adopted else None
            if done is not None:  # it finished before its worker died: only the tell was lost
                self._tell(study, plan, outcomes.read_outcome(None, None, plan.run_dir, self.maximize))
            else:
                plan.launch = self._launch_overrides(plan)
                to_launch.append(plan)
        if not to_launch:
            return []
        kill_after = os.environ.get(FAULT_ENV)
        if kill_after is not None and self.told >= int(kill_after):
            os.environ["CAMEX_FAULT_KILL_AT_STEP"] = "1"
        try:
            returns = self.launcher.launch([p.launch for p in to_launch], initial_job_idx=job_idx)
        except SystemExit as e:  # a trial run in this process called sys.exit
            code = e.code if isinstance(e.code, int) else 1
            if code >= 128:  # stopped by a signal (Ctrl-C, a scheduler): so is the sweep; the trial resumes next time
                raise
            for plan in to_launch:
                exited = outcomes.Outcome(None, f"the run exited with status {code}")
                finished = outcomes.read_metrics(plan.run_dir) is not None
                self._tell(
                    study, plan, outcomes.read_outcome(None, None, plan.run_dir, self.maximize) if finished else exited
                )
            return []
        for plan, ret in zip(to_launch, returns):
            error = ret._return_value if ret.status == JobStatus.FAILED else None
            returned = ret._return_value if ret.status == JobStatus.COMPLETED else None
            self._tell(study, plan, outcomes.read_outcome(returned, error, plan.run_dir, self.maximize))
        return list(returns)

    # ----------------------------------------------------------------------------- sweep
    def sweep(self, arguments: list[str]) -> Any:
        from camex.config import ConfigError

        try:
            study, lock, queue = self._prepare(arguments)
        except (SearchSpaceError, ConfigError, HydraException) as e:  # bad input: one line, before any trial
            lines = [line.strip() for line in str(e).splitlines() if line.strip()]
            print("error: " + " ".join(lines[:3]), file=sys.stderr)
            sys.exit(2)
        except Exception as e:  # the study or tracking store unusable (damaged, locked, disk full): one line too
            from camex.exits import STORAGE, storage_failure

            problem = storage_failure(e)
            if problem is None:
                raise
            print(f"error: {problem}", file=sys.stderr)
            sys.exit(STORAGE)
        return self._loop(study, lock, queue)

    def _prepare(self, arguments: list[str]) -> tuple[optuna.Study, Any, list[Planned]]:
        """Checks, the search space, the study and its parent run, and orphaned trials to adopt."""
        from camex.config import inside

        self._check_options()
        parser = OverridesParser.create(config_loader=self.hydra_context.config_loader)
        params = self.params
        if isinstance(params, DictConfig):
            params = OmegaConf.to_container(params, resolve=True)
        self.space = parse(params, arguments, parser)
        if self.sampler == "grid":
            self.space.grid()  # fails now, with the key, if a parameter is an interval
        if not self.space.distributions:
            raise SearchSpaceError("nothing to sweep: give hydra.sweeper.params or a,b,c values on the command line")
        self.maximize = self._preflight(self.space)
        self.output_root = Path(str(self.config.paths.output_root)).resolve()
        experiment = str(self.config.get("experiment_name", "default"))
        self.name = self.study_name or f"{experiment}-{self.space.identity(self.sampler)}"
        # the study name and experiment_name become folders: none may lead outside the output root
        inside(str(self.output_root), str(self._run_dir(0)), key="the sweep's trial folder")
        inside(str(self.config.paths.output_root), str(self.config.hydra.sweep.dir), key="hydra.sweep.dir")
        self.storage_url = self.storage or studies.default_storage(self.output_root)
        tracking_cfg = OmegaConf.to_container(self.config.tracking, resolve=True)
        tracking_cfg = tracking.resolve_store(tracking_cfg, output_root=self.output_root)  # a server must answer
        lock = studies.study_lock(self.output_root, self.name)
        self.parent = None
        with lock:
            study = self._open_study(self.space, self.name, self.maximize)
            if tracking_cfg.get("enabled", True):
                description = {"sampler": self.sampler, "direction": study.direction.name.lower(),
                               "storage": self.storage_url, **self.space.describe()}  # fmt: skip
                self.parent = ParentRun.open(
                    study, tracking_cfg, output_root=self.output_root, experiment=experiment, description=description
                )
            if self.retry_failed:
                self._enqueue_failed(study)
            queue = self._adopt_orphans(study)
        done = sum(t.state == TrialState.COMPLETE for t in study.get_trials(deepcopy=False))
        log.info(f"study {self.name} ({study.direction.name.lower()}) in {self.storage_url}: {done} complete so far")
        sweep_dir = Path(str(self.config.hydra.sweep.dir)) / self.name
        sweep_dir.mkdir(parents=True, exist_ok=True)
        OmegaConf.save(self.config, sweep_dir / "multirun.yaml")
        return study, lock, queue

    def _loop(self, study: optuna.Study, lock: Any, queue: list[Planned]) -> list[list[JobReturn]]:
        """Claim up to n_jobs trials (adopted ones first), launch them, tell their outcomes; repeat."""
        results, job_idx, status = [], 0, "FAILED"
        heartbeat = _Heartbeat(self.heartbeat_s)
        try:
            while True:
                batch, queue = queue[: self.n_jobs], queue[self.n_jobs :]
                if len(batch) < self.n_jobs:
                    with lock:
                        batch += self._ask(study, self.n_jobs - len(batch))
                if not batch:
                    break
                heartbeat.watch([p.trial for p in batch])
                results.append(self._run_batch(study, batch, job_idx))
                heartbeat.watch([])
                job_idx += len(batch)
            status = "FINISHED"
        except (KeyboardInterrupt, SystemExit):
            status = "KILLED"  # trials in flight stay RUNNING: the next invocation adopts and resumes them
            raise
        finally:
            heartbeat.stop()
            self._summarise(study, status)
        return results

    def _summarise(self, study: optuna.Study, status: str) -> None:
        best = studies.best_per_group(study)
        if self.parent is not None:
            self.parent.finish(study, status, best)
        states = [t.state.name for t in study.get_trials(deepcopy=False)]
        print(
            f"\nstudy {self.name}: {states.count('COMPLETE')} complete, {states.count('FAIL')} failed, "
            f"{states.count('RUNNING')} running ({self.storage_url})"
        )
        for b in best:
            value = f"{b.value:.6g}" if math.isfinite(b.value) else b.value
            group = " | ".join(b.group[k] for k in studies.GROUP_KEYS)
            print(f"  best {group}: {value} (trial {b.number}) {b.params}")
        print(f"  rerun the best with N seeds: python -m camex.sweeps best-rerun --storage {self.storage_url} "
              f"--study {self.name} --seeds 3")  # fmt: skip


class _Heartbeat:
    """Marks this worker's running trials alive every `every_s` seconds (user attribute
    `heartbeat`), so a worker on another host can tell a dead worker's trial from a slow one."""

    def __init__(self, every_s: float) -> None:
        self.every_s = every_s
        self.trials: list[optuna.Trial] = []
        self.stopped = threading.Event()
        self.thread = threading.Thread(target=self._beat, daemon=True, name="camex-sweep-heartbeat")
        self.thread.start()

    def watch(self, trials: list[optuna.Trial]) -> None:
        self.trials = list(trials)

    def _beat(self) -> None:
        while not self.stopped.wait(self.every_s):
            for trial in list(self.trials):
                try:
                    trial.set_user_attr("heartbeat", time.time())
                except Exception:  # the trial was told in the meantime
                    pass

    def stop(self) -> None:
        self.stopped.set()
