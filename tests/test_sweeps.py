"""Optuna sweeps through the camex Hydra sweeper: `run.py -m` as a subprocess on a tiny BERT and
the MRPC fixture files, with the study and MLflow in SQLite files under a temporary directory.

Each sweep is a 2 x 2 grid (learning rate x batch size) of one-epoch trials; every check reads
the Optuna storage and the MLflow store back, not the sweeper's own printout.
"""

from __future__ import annotations

import itertools
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import optuna
import pytest
from hydra import compose, initialize_config_dir
from hydra.core.override_parser.overrides_parser import OverridesParser
from omegaconf import OmegaConf
from optuna.distributions import CategoricalDistribution, FloatDistribution, IntDistribution
from optuna.trial import TrialState

from camex.sweeps import outcome
from camex.sweeps.__main__ import main as sweeps_cli
from hydra_plugins.camex_optuna_sweeper._search_space import SearchSpaceError, parse

ROOT = Path(__file__).resolve().parents[1]
FIX = ROOT / "tests" / "fixtures"
ENV = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
STUDY = "tiny"
TINY = [
    "trainer=tiny", "task=glue/mrpc", "model=tiny_bert", "task.max_length=64", "trainer.epochs=1",
    f"task.local.train={FIX / 'cls_train.jsonl'}", f"task.local.eval={FIX / 'cls_dev.csv'}",
]  # fmt: skip
LRS, BATCHES = (1e-3, 1e-4), (2, 4)
GRID = ["trainer.learning_rate=" + ",".join(map(str, LRS)), "trainer.batch_size=" + ",".join(map(str, BATCHES))]


def sweep_cmd(out: Path, *extra: str) -> list[str]:
    return [sys.executable, "run.py", "-m", "hydra/sweeper=camex_optuna", f"paths.output_root={out}",
            f"hydra.sweeper.study_name={STUDY}", *TINY, *extra]  # fmt: skip


def sweep(out: Path, *extra: str, env: dict | None = None) -> subprocess.CompletedProcess:
    proc = subprocess.run(sweep_cmd(out, *extra), cwd=ROOT, env=env or ENV, capture_output=True, text=True, timeout=300)
    return proc


def trials_run(proc: subprocess.CompletedProcess) -> int:
    """How many trainings this invocation ran to the end (train.py announces each)."""
    return proc.stdout.count("finished: glue/mrpc")


def load_study(out: Path, name: str = STUDY) -> optuna.Study:
    return optuna.load_study(study_name=name, storage=f"sqlite:///{out / 'sweeps' / 'optuna.db'}")


def mlflow_runs(out: Path, experiment: str = "default"):
    """(client, parent runs, child runs) of one experiment."""
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=f"sqlite:///{out / 'mlflow.db'}")
    exp = client.get_experiment_by_name(experiment)
    runs = client.search_runs([exp.experiment_id], max_results=1000)
    parents = [r for r in runs if r.data.tags.get("sweep.role") == "parent"]
    children = [r for r in runs if r.data.tags.get("sweep.role") != "parent"]
    return client, parents, children


def check_complete_grid(out: Path) -> optuna.Study:
    """Four COMPLETE trials covering the grid once each; one parent run; one FINISHED child per
    trial, nested under the parent, carrying the trial number, the sampled values and its value."""
    study = load_study(out)
    trials = study.get_trials()
    assert [t.state for t in trials].count(TrialState.COMPLETE) == 4
    complete = [t for t in trials if t.state == TrialState.COMPLETE]
    combos = sorted((t.params["trainer.learning_rate"], t.params["trainer.batch_size"]) for t in complete)
    assert combos == sorted(itertools.product(LRS, BATCHES))

    client, parents, children = mlflow_runs(out)
    assert len(parents) == 1 and len(children) == 4
    parent = parents[0]
    by_trial = {int(r.data.tags["sweep.trial"]): r for r in children}
    assert sorted(by_trial) == sorted(t.number for t in complete)
    for trial in complete:
        run = by_trial[trial.number]
        tags, params, metrics = run.data.tags, run.data.params, run.data.metrics
        assert run.info.status == "FINISHED"
        assert tags["mlflow.parentRunId"] == parent.info.run_id and tags["sweep.study"] == STUDY
        assert float(tags["sweep.param.trainer.learning_rate"]) == trial.params["trainer.learning_rate"]
        assert int(tags["sweep.param.trainer.batch_size"]) == trial.params["trainer.batch_size"]
        assert float(params["trainer.learning_rate"]) == trial.params["trainer.learning_rate"]  # the run used them
        assert int(params["trainer.batch_size"]) == trial.params["trainer.batch_size"]
        assert metrics["final_f1"] == pytest.approx(trial.value)  # the objective is the run's primary metric
        assert trial.user_attrs["mlflow_run_id"] == run.info.run_id and trial.user_attrs["primary"] == "final_f1"
        assert len(client.get_metric_history(run.info.run_id, "train_loss")) >= 1
    assert parent.info.status == "FINISHED"
    best = study.best_trial
    assert parent.data.metrics["best_value"] == pytest.approx(best.value)
    assert parent.data.tags["best.trial"] == str(best.number)
    assert float(parent.data.tags["best.param.trainer.learning_rate"]) == best.params["trainer.learning_rate"]
    assert parent.data.params["space.trainer.batch_size"] == "2,4"
    return study


def test_grid_sweep_gives_a_parent_run_and_one_child_per_trial(tmp_path):
    out = tmp_path / "out"
    proc = sweep(out, *GRID)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert trials_run(proc) == 4
    study = check_complete_grid(out)
    assert study.direction == optuna.study.StudyDirection.MAXIMIZE  # task.greater_is_better of MRPC's F1
    run_dirs = {Path(t.user_attrs["run_dir"]) for t in study.trials}
    assert len(run_dirs) == 4 and all((d / "metrics.json").exists() for d in run_dirs)

    # the best configuration per (task, model, merge), rerun with 2 seeds as its own resumable sweep
    storage = f"sqlite:///{out / 'sweeps' / 'optuna.db'}"
    rerun = subprocess.run(
        [sys.executable, "-m", "camex.sweeps", "best-rerun", "--storage", storage, "--study", STUDY, "--seeds", "2"],
        cwd=ROOT, env=ENV, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert rerun.returncode == 0, rerun.stderr[-3000:]
    seeds = load_study(out, f"{STUDY}-best-glue_mrpc-tiny_bert-camex_ties")
    assert sorted(t.params["seed"] for t in seeds.trials if t.state == TrialState.COMPLETE) == [0, 1]
    best = study.best_trial
    for trial in seeds.trials:
        overrides = trial.user_attrs["overrides"]
        assert f"trainer.learning_rate={best.params['trainer.learning_rate']}" in overrides
        assert f"trainer.batch_size={best.params['trainer.batch_size']}" in overrides
    assert "glue/mrpc | tiny_bert | camex_ties: " in rerun.stdout and " ± " in rerun.stdout


def test_killed_sweep_resumes_with_only_the_remaining_trials(tmp_path):
    out = tmp_path / "out"
    # SIGKILL in the middle of the third trial's training (the sweeper runs it in-process)
    killed = sweep(out, *GRID, env={**ENV, "CAMEX_FAULT_SWEEP_KILL_AFTER": "2"})
    assert killed.returncode == -9, killed.stderr[-3000:]
    study = load_study(out)
    assert sorted(t.state.name for t in study.trials) == ["COMPLETE", "COMPLETE", "RUNNING"]
    first_two = {t.number: Path(t.user_attrs["run_dir"]) / "metrics.json" for t in study.trials if t.value is not None}
    stamps = {n: p.stat().st_mtime_ns for n, p in first_two.items()}

    again = sweep(out, *GRID)
    assert again.returncode == 0, again.stderr[-3000:]
    assert trials_run(again) == 2  # the interrupted trial (adopted, resumed) and the one never started
    study = check_complete_grid(out)
    assert len(study.trials) == 4  # no trial was repeated or added
    assert {n: p.stat().st_mtime_ns for n, p in first_two.items()} == stamps  # finished trials untouched


def test_a_raising_trial_is_recorded_failed_and_the_sweep_finishes(tmp_path):
    out = tmp_path / "out"
    # the rank ablation's sweep file, narrowed to one task and merge and ranks {0, 1}: rank 0 raises
    proc = sweep(out, "+sweeps=ablation_rank", "merge=camex_ties", "merge.rank=0,1", "trainer.learning_rate=1e-3")
    assert proc.returncode == 0, proc.stderr[-3000:]
    study = load_study(out)
    states = {t.params["merge.rank"]: t for t in study.trials}
    assert states[0].state == TrialState.FAIL and "merge.rank" in states[0].user_attrs["fail_reason"]
    assert states[1].state == TrialState.COMPLETE and math.isfinite(states[1].value)
    assert states[1].user_attrs["group"] == {"task": "glue/mrpc", "model": "tiny_bert", "merge": "camex_ties"}
    _, parents, children = mlflow_runs(out, "ablation_rank")
    assert len(parents) == 1 and parents[0].info.status == "FINISHED" and len(children) == 1
    assert parents[0].data.params["fixed.sweeps"] == "ablation_rank"
    assert parents[0].data.metrics["trials_fail"] == 1 and parents[0].data.metrics["trials_complete"] == 1

    # retry_failed: the same command again queues the failed grid point once more, never the finished one
    proc = sweep(out, "+sweeps=ablation_rank", "merge=camex_ties", "merge.rank=0,1", "trainer.learning_rate=1e-3",
                 "hydra.sweeper.retry_failed=true")  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    ranks = sorted((t.params["merge.rank"], t.state) for t in load_study(out).trials)
    assert ranks == [(0, TrialState.FAIL), (0, TrialState.FAIL), (1, TrialState.COMPLETE)]
    assert "finished: glue/mrpc" not in proc.stdout


def test_two_parallel_workers_share_one_study_and_one_mlflow_store(tmp_path):
    out = tmp_path / "out"
    workers = [
        subprocess.Popen(
            sweep_cmd(out, *GRID), cwd=ROOT, env=ENV, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
        )  # fmt: skip
        for _ in range(2)
    ]
    results = [w.communicate(timeout=300) for w in workers]
    for worker, (_, stderr) in zip(workers, results):
        assert worker.returncode == 0, stderr[-3000:]
    assert sum(stdout.count("finished: glue/mrpc") for stdout, _ in results) == 4  # each grid point ran once
    study = check_complete_grid(out)
    assert len(study.trials) == 4
    pids = {t.user_attrs["worker"]["pid"] for t in study.trials}
    assert pids <= {w.pid for w in workers}


@pytest.mark.slow
def test_joblib_launcher_runs_trials_two_at_a_time(tmp_path):
    out = tmp_path / "out"
    proc = sweep(out, *GRID, "hydra/launcher=parallel", "hydra.launcher.n_jobs=2")  # the sweeper follows n_jobs
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stderr.count("Joblib.Parallel(n_jobs=2") + proc.stdout.count("Joblib.Parallel(n_jobs=2") == 2
    study = check_complete_grid(out)
    assert len({t.user_attrs["worker"]["pid"] for t in study.trials}) == 1  # one sweeper, trials in its workers


@pytest.mark.slow
def test_submitit_launcher_runs_trials_as_jobs(tmp_path):
    """submitit's local executor: the SLURM launcher's code path (pickled jobs in other processes)."""
    pytest.importorskip("hydra_plugins.hydra_submitit_launcher")
    out = tmp_path / "out"
    proc = sweep(out, *GRID, "hydra/launcher=submitit_local", "hydra.sweeper.n_jobs=2")
    assert proc.returncode == 0, proc.stderr[-3000:]
    check_complete_grid(out)


# ----------------------------------------------------------------------------- no training


def _space(*lines: str, params: dict | None = None):
    return parse(params, list(lines), OverridesParser.create())


def test_search_space_from_hydra_syntax():
    space = _space(
        "task=glue/mrpc", "trainer.batch_size=8,16", "trainer.learning_rate=tag(log,interval(1e-5,3e-4))",
        "merge.rank=tag(int,interval(1,8))", "seed=range(0,3)", params={"trainer.batch_size": "32,64", "x": 1},
    )  # fmt: skip
    assert space.fixed == ["x=1", "task=glue/mrpc"]
    d = space.distributions
    assert d["trainer.batch_size"] == CategoricalDistribution([8, 16])  # the command line wins over params
    assert d["trainer.learning_rate"] == FloatDistribution(1e-5, 3e-4, log=True)
    assert d["merge.rank"] == IntDistribution(1, 8)
    assert d["seed"] == CategoricalDistribution([0, 1, 2])
    assert space.overrides({"trainer.batch_size": 8, "trainer.learning_rate": 1e-4, "merge.rank": 2, "seed": 1}) == [
        "x=1", "task=glue/mrpc", "trainer.batch_size=8", "trainer.learning_rate=0.0001", "merge.rank=2", "seed=1"
    ]  # fmt: skip
    with pytest.raises(SearchSpaceError, match="trainer.learning_rate: the grid sampler needs a list"):
        space.grid()
    # the study identity ignores how a run is tracked or where outputs go, not what is searched
    a = _space("trainer.batch_size=8,16", "tracking=none", "paths.output_root=/x").identity("grid")
    assert a == _space("trainer.batch_size=8,16").identity("grid")
    assert a != _space("trainer.batch_size=8,32").identity("grid") != _space("trainer.batch_size=8,16").identity("tpe")


def test_outcome_of_a_trial(tmp_path):
    assert outcome.read_outcome(0.5, None, tmp_path, maximize=True).value == 0.5
    for bad in (float("nan"), float("inf"), None, "0.5"):
        assert outcome.read_outcome(bad, None, tmp_path, maximize=True).failed
    raised = outcome.read_outcome(None, RuntimeError("boom\nmore"), tmp_path, maximize=True)
    assert raised.failed and raised.reason == "RuntimeError: boom"
    payload = {"metrics": {"final_perplexity": 12.0}, "primary": "final_perplexity", "greater_is_better": False,
               "run_id": "abc"}  # fmt: skip
    (tmp_path / "metrics.json").write_text(json.dumps(payload))
    assert outcome.read_outcome(None, None, tmp_path, maximize=False).value == 12.0  # read back from the run
    wrong = outcome.read_outcome(12.0, None, tmp_path, maximize=True)
    assert wrong.failed and "does not maximize" in wrong.reason


def test_orphaned_trials_and_best_per_group():
    import time

    from camex.sweeps import study as studies

    study = optuna.create_study(direction="minimize")  # e.g. perplexity
    me = studies.this_worker()
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    workers = {
        "alive here": me,
        "dead here": {**me, "pid": int(dead.stdout)},
        "silent elsewhere": {"host": "elsewhere", "pid": 1, "started": 0.0},
        "beating elsewhere": {"host": "elsewhere", "pid": 1, "started": 0.0},
    }
    for name, worker in workers.items():
        trial = study.ask()
        trial.set_user_attr("name", name)
        trial.set_user_attr("worker", worker)
        trial.set_user_attr("heartbeat", time.time() - (1000 if name == "silent elsewhere" else 0))
    orphans = {t.user_attrs["name"] for t in study.trials if studies.is_orphan(t, stale_after_s=600)}
    assert orphans == {"dead here", "silent elsewhere"}

    for value, merge in ((12.0, "camex"), (10.0, "camex"), (10.0, "camex"), (9.0, "ties")):
        trial = study.ask({"lr": CategoricalDistribution([1e-4, 3e-5])})
        trial.set_user_attr("group", {"task": "lm/wikitext2", "model": "gpt2", "merge": merge})
        trial.set_user_attr("overrides", [f"merge={merge}", f"trainer.learning_rate={trial.params['lr']}"])
        study.tell(trial, value)
    best = {b.group["merge"]: b for b in studies.best_per_group(study)}
    assert best["camex"].value == 10.0 and best["camex"].number == 5 and best["camex"].n_complete == 3  # ties: earliest
    assert best["ties"].value == 9.0 and best["ties"].slug == "lm_wikitext2-gpt2-ties"
    assert best["ties"].overrides[0] == "merge=ties"


PAPER_GRID = {"trainer.batch_size": [8, 16, 32, 64], "trainer.learning_rate": [3e-4, 1e-4, 3e-5, 1e-5]}
GLUE = ["cola", "sst2", "mrpc", "stsb", "qqp", "mnli", "qnli", "rte"]
MERGES = ["dense", "smoe", "domain", "camex", "ties", "camex_ties", "dare", "camex_dare", "ep_camex"]


@pytest.mark.parametrize(
    "name,overrides,expected,model",
    [
        ("paper_grid_glue", [], {**PAPER_GRID, "merge": MERGES, "task": [f"glue/{t}" for t in GLUE]}, None),
        ("paper_grid_qa", [], {**PAPER_GRID, "merge": MERGES, "task": ["qa/squad", "qa/wikiqa"]}, None),
        ("paper_grid_lm", [], {**PAPER_GRID, "merge": MERGES, "task": ["lm/wikitext2", "lm/wikitext103"]}, None),
        ("paper_grid_vision", [], {"trainer.learning_rate": PAPER_GRID["trainer.learning_rate"],
                                   "merge": MERGES[:-1]}, "vit_small"),
        ("seeds", [], {"seed": [0, 1, 2, 3, 4]}, None),
        ("ablation_alpha", ["task=glue/mrpc"], {"task": ["glue/mrpc", "glue/stsb", "glue/rte"],
         "merge": ["camex", "camex_ties", "camex_dare"], "merge.alpha": [0.5, 0.6, 0.7, 0.8, 0.9, 1.0]}, "t5_base"),
        ("ablation_rank", ["task=glue/mrpc"], {"task": ["glue/mrpc", "glue/stsb", "glue/rte"],
         "merge": ["camex", "camex_ties", "camex_dare"], "merge.rank": [1, 2, 4, 6]}, "t5_small"),
    ],
)  # fmt: skip
def test_sweep_files_hold_the_paper_grids(name, overrides, expected, model):
    with initialize_config_dir(str(ROOT / "conf"), version_base="1.3"):
        cfg = compose("config", overrides=[f"+sweeps={name}", *overrides], return_hydra_config=True)
    assert cfg.hydra.sweeper._target_ == "hydra_plugins.camex_optuna_sweeper.sweeper.CamexOptunaSweeper"
    assert cfg.hydra.sweeper.sampler == "grid" and cfg.experiment_name == name
    space = parse(OmegaConf.to_container(cfg.hydra.sweeper.params), [], OverridesParser.create())
    assert space.grid() == expected
    if model:
        assert cfg.model.name == model


def test_cli_errors_are_one_line(tmp_path, capsys):
    storage = f"sqlite:///{tmp_path / 'optuna.db'}"
    optuna.create_study(study_name="a", storage=storage)
    assert sweeps_cli(["best", "--storage", storage, "--study", "nope"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "--study 'nope'" in err[0] and "['a']" in err[0]
    assert sweeps_cli(["best", "--storage", storage, "--study", "a"]) == 2
    assert "no complete trial" in capsys.readouterr().err


def test_bad_sweeper_option_fails_before_any_trial(tmp_path):
    proc = sweep(tmp_path / "out", *GRID, "hydra.sweeper.sampler=tpe")  # tpe needs a trial budget
    assert proc.returncode == 2 and proc.stderr.strip().splitlines()[-1] == (
        "error: hydra.sweeper.n_trials is required with sampler=tpe"
    )
    assert "finished:" not in proc.stdout and not (tmp_path / "out" / "sweeps" / "optuna.db").exists()
