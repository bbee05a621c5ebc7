"""`python -m camex.protocol`: the paper's protocol per table preset (grid -> best -> seeds -> report)."""

from __future__ import annotations

import itertools
import json
import os
import subprocess
import sys
from pathlib import Path

import optuna
import pytest
from optuna.distributions import CategoricalDistribution

from camex import protocol
from camex.sweeps.study import default_storage, open_storage

ROOT = Path(__file__).resolve().parents[1]
FIX = ROOT / "tests" / "fixtures"

# preset: (cells, grid trials, seed runs with 3 seeds)
COUNTS = {
    "glue_table": (72, 72 * 16, 72 * 3),  # 8 tasks x 9 rows; 16 grid points
    "qa_table": (18, 18 * 16, 18 * 3),
    "lm_table": (18, 18 * 16, 18 * 3),
    "lm_pretrain": (9, 9 * 16, 9 * 3),
    "vision_table": (8, 8 * 4, 8 * 3),  # batch fixed at 96: the lr only
    "ablation_alpha": (9, 9 * 16, 9 * 3 * 6),  # grid at alpha 1, then 6 alphas x 3 seeds
    "ablation_rank": (9, 9 * 16, 9 * 3 * 4),
    "convergence": (24, 24 * 16, 24 * 3),  # 3 GLUE tasks + GPT-2 pre-training, x 6 rows
    "efficiency": (18, 0, 18 * 3),  # 2 models x 9 rows, no grid
}


def test_every_protocol_preset_is_counted():
    assert sorted(COUNTS) == protocol.presets()


@pytest.mark.parametrize("preset", sorted(COUNTS))
def test_protocol_stages_and_trial_counts(preset):
    plan = protocol.compose_plan(preset, [0, 1, 2])
    assert (len(plan.cells), plan.grid_trials, plan.seed_trials) == COUNTS[preset]
    if preset == "glue_table":
        assert plan.grid == {"trainer.batch_size": [8, 16, 32, 64], "trainer.learning_rate": [3e-4, 1e-4, 3e-5, 1e-5]}
        glue = ("cola", "sst2", "mrpc", "stsb", "qqp", "mnli", "qnli", "rte")
        assert {c["task"] for c in plan.cells} == {f"glue/{t}" for t in glue}
        assert len({c["merge"] for c in plan.cells}) == 9
    if preset == "ablation_alpha":  # the grid holds alpha at 1; the seeds sweep every alpha
        cmd = protocol.grid_command(plan, Path("/o"))
        assert "merge.alpha=1.0" in cmd and not any(a.startswith("merge.alpha=0.5") for a in cmd)


def test_dry_run_prints_counts_hours_and_stages(capsys):
    assert protocol.main(["glue_table", "--dry-run", "--seeds", "3"]) == 0
    out = capsys.readouterr().out
    assert "= 1152 trials" in out and "72 cells x 3 seeds = 216 runs" in out
    assert "estimated" in out and "-hours" in out and "grid " in out
    assert "1. grid" in out and "3. seeds" in out and "4. report" in out


def test_quick_keeps_the_one_point_preset(capsys):
    assert protocol.main(["glue_table", "--quick", "--dry-run"]) == 0
    out = capsys.readouterr().out
    assert "quick: 72 runs" in out and "experiment=glue_table" in out and "camex_optuna" not in out


def test_pretraining_convergence_and_efficiency_presets_pick_their_models():
    from hydra import compose, initialize_config_dir

    def picked(*overrides: str) -> tuple[str, str, str]:
        with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base="1.3"):
            cfg = compose(config_name="config", overrides=list(overrides))
        return cfg.task.name, cfg.model.name, cfg.trainer.name

    assert picked("experiment=lm_pretrain") == ("lm/wikitext103_pretrain", "gpt2_scratch", "lm_pretrain")
    assert picked("experiment=convergence", "task=lm/wikitext103_pretrain")[1:] == ("gpt2_scratch", "lm_pretrain")
    assert picked("experiment=convergence", "task=glue/mrpc")[1:] == ("t5_base", "paper")
    assert picked("experiment=efficiency", "task=lm/wikitext2")[1] == "gpt2"
    assert picked("experiment=efficiency", "task=glue/rte")[1] == "t5_base"
    with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base="1.3"):
        model = compose(config_name="config", overrides=["model=gpt2_scratch"]).model
    assert model.pretrained is None and model.max_length == 1024  # GPT2Config defaults: the 124M shapes


def test_unknown_preset_is_one_line_and_exit_2(capsys):
    assert protocol.main(["cpu_mini_text"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "has no protocol" in err[0] and "glue_table" in err[0]


# --- the stage logic with a stubbed trial runner -----------------------------------------------


def _value(params: dict) -> float:
    """A validation metric with one clear best grid point: batch 4, lr 1e-4 (any seed close)."""
    return 1.0 - abs(params.get("trainer.learning_rate", 1e-4) - 1e-4) * 100 - params.get("trainer.batch_size", 4) / 100


class FakeRunner:
    """Stands in for `run.py -m`: records each launch and fills its study as the camex_optuna
    sweeper would (one COMPLETE trial per grid point, with group and overrides), without training."""

    def __init__(self, storage: str):
        self.storage, self.launched = storage, []

    def __call__(self, cmd: list[str], what: str) -> None:
        self.launched.append((what, cmd))
        if what == "report":
            return
        args = dict(a.split("=", 1) for a in cmd if "=" in a and not a.startswith("hydra/"))
        study = optuna.create_study(study_name=args["hydra.sweeper.study_name"], storage=open_storage(self.storage),
                                    direction="maximize", load_if_exists=True)  # fmt: skip
        sweeps = {k: v.split(",") for k, v in args.items() if "," in v}
        fixed = [f"{k}={v}" for k, v in args.items() if k not in sweeps and not k.startswith("hydra.")]
        done = {json.dumps(t.params, sort_keys=True) for t in study.trials}
        tasks = sweeps.pop("task", [args.get("task")])
        sweeps = {
            k: [int(v) if k in ("trainer.batch_size", "seed") else float(v) for v in vs] for k, vs in sweeps.items()
        }
        dists = {"task": CategoricalDistribution(tasks), **{k: CategoricalDistribution(v) for k, v in sweeps.items()}}
        for task in tasks:
            for combo in itertools.product(*sweeps.values()):
                params = {"task": task, **dict(zip(sweeps, combo))}
                if json.dumps(params, sort_keys=True) in done:
                    continue
                overrides = [*fixed, *(f"{k}={v}" for k, v in params.items())]
                group = {"task": task, "model": "tiny_bert", "merge": args.get("merge", "camex")}
                attrs = {"group": group, "overrides": overrides}
                trial = optuna.trial.create_trial(
                    params=params, distributions=dists, value=_value(params), user_attrs=attrs
                )
                study.add_trial(trial)


def test_stage_logic_chooses_the_best_reruns_it_over_seeds_and_resumes(tmp_path, monkeypatch):
    extra = ["task=glue/mrpc,glue/rte", "merge=camex", "trainer.batch_size=4,8", "trainer.learning_rate=1e-3,1e-4"]
    plan = protocol.compose_plan("glue_table", [0, 1], extra)
    assert (len(plan.cells), plan.grid_trials, plan.seed_trials) == (2, 8, 4)
    fake = FakeRunner(default_storage(tmp_path))
    monkeypatch.setattr(protocol, "_run", fake)

    assert protocol.run(plan, tmp_path, until="grid") == 0  # "killed" after the grid stage
    assert [w for w, _ in fake.launched] == ["grid"]
    assert protocol.run(plan, tmp_path) == 0  # rerun: the grid is complete, so it is not launched again
    assert [w for w, _ in fake.launched] == ["grid", "seeds", "seeds", "report"]
    for _, cmd in fake.launched[1:3]:  # each cell's seeds rerun the chosen point (batch 4, lr 1e-4)
        assert "trainer.batch_size=4" in cmd and "trainer.learning_rate=0.0001" in cmd and "seed=0,1" in cmd
        assert "experiment_name=glue_table-protocol" in cmd
    chosen = json.loads((tmp_path / "reports" / "glue_table-protocol" / "protocol.json").read_text())["cells"]
    assert [(c["task"], c["chosen"], c["n"]) for c in chosen] == [
        ("glue/mrpc", {"trainer.batch_size": 4, "trainer.learning_rate": 1e-4}, 2),
        ("glue/rte", {"trainer.batch_size": 4, "trainer.learning_rate": 1e-4}, 2),
    ]
    table = (tmp_path / "reports" / "glue_table-protocol" / "protocol.md").read_text()
    assert "| glue/mrpc | tiny_bert | camex | 4 | 0.0001 |" in table and "| 2 |" in table

    assert protocol.run(plan, tmp_path) == 0  # everything finished: only the report is rebuilt
    assert [w for w, _ in fake.launched][4:] == ["report"]


# --- end to end on a tiny model -----------------------------------------------------------------


@pytest.mark.slow
def test_protocol_end_to_end_on_a_tiny_model(tmp_path):
    """2 x 2 grid, 2 seeds, one cell (STS-B: a continuous metric, so grid points differ), a tiny
    BERT on fixture files. ~2-3 min on 2 shared cores: the fast test above covers the stage logic."""
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
    cmd = [sys.executable, "-m", "camex.protocol", "glue_table", "--seeds", "2", "--output-root", str(tmp_path), "--",
           "task=glue/stsb", "merge=camex", "model=tiny_bert", "trainer=tiny", "trainer.progress_bar=false",
           "trainer.batch_size=4,8", "trainer.learning_rate=1e-3,1e-4", "task.max_length=32",
           f"task.local.train={FIX / 'reg_train.jsonl'}", f"task.local.eval={FIX / 'reg_dev.json'}"]  # fmt: skip

    def go(*more: str) -> subprocess.CompletedProcess:
        return subprocess.run(cmd[:6] + list(more) + cmd[6:], cwd=ROOT, env=env, capture_output=True, text=True)

    grid = go("--until", "grid")  # stopped after the grid stage
    assert grid.returncode == 0, grid.stderr[-2000:]
    trials = sorted((tmp_path / "sweeps" / "glue_table-grid").glob("trial*/metrics.json"))
    assert len(trials) == 4
    stamps = {p: p.stat().st_mtime_ns for p in trials}
    values = {}
    for p in trials:
        m = json.loads(p.read_text())
        values[p] = m["metrics"][m["primary"]]
    full = go()
    assert full.returncode == 0, full.stderr[-2000:]
    assert "grid: 4 trials complete, skipped" in full.stdout
    assert {p: p.stat().st_mtime_ns for p in trials} == stamps  # nothing of the grid trained again
    study = optuna.load_study(study_name="glue_table-grid", storage=open_storage(default_storage(tmp_path)))
    best = max(study.trials, key=lambda t: (t.value, -t.number))
    assert best.value == max(values.values())
    out = tmp_path / "reports" / "glue_table-protocol"
    cell = json.loads((out / "protocol.json").read_text())["cells"][0]
    assert cell["chosen"] == {k: best.params[k] for k in ("trainer.batch_size", "trainer.learning_rate")}
    assert cell["n"] == 2 and cell["grid_value"] == best.value
    seeds = optuna.load_study(study_name="glue_table-grid-best-glue_stsb-tiny_bert-camex",
                              storage=open_storage(default_storage(tmp_path)))  # fmt: skip
    assert sorted(t.params["seed"] for t in seeds.trials) == [0, 1]
    for t in seeds.trials:  # the seeds ran the chosen configuration
        ov = t.user_attrs["overrides"]
        assert f"trainer.batch_size={best.params['trainer.batch_size']}" in ov
    report = (out / "report.md").read_text()
    assert "(n=2)" in report and "configuration chosen per cell" in report
    again = go()
    assert again.returncode == 0 and "seeds: 2 runs complete, skipped" in again.stdout
    assert len(list((tmp_path / "sweeps").glob("*/trial*/metrics.json"))) == 6  # 4 grid + 2 seeds, no more


def test_ablation_protocol_reports_each_ablated_value_over_the_seeds(tmp_path, monkeypatch):
    extra = ["task=glue/mrpc", "merge=camex", "trainer.batch_size=4,8", "trainer.learning_rate=1e-3,1e-4"]
    plan = protocol.compose_plan("ablation_alpha", [0, 1], extra)
    assert (len(plan.cells), plan.grid_trials, plan.seed_trials) == (1, 4, 12)
    fake = FakeRunner(default_storage(tmp_path))
    monkeypatch.setattr(protocol, "_run", fake)
    assert protocol.run(plan, tmp_path) == 0
    grid_cmd, seeds_cmd = fake.launched[0][1], fake.launched[1][1]
    assert "merge.alpha=1.0" in grid_cmd  # the grid at the paper's alpha
    assert "merge.alpha=0.5,0.6,0.7,0.8,0.9,1.0" in seeds_cmd and "trainer.learning_rate=0.0001" in seeds_cmd
    rows = json.loads((tmp_path / "reports" / "ablation_alpha-protocol" / "protocol.json").read_text())["cells"]
    assert [(r["with"]["merge.alpha"], r["n"]) for r in rows] == [(a, 2) for a in (0.5, 0.6, 0.7, 0.8, 0.9, 1.0)]


def test_reproduce_script_runs_the_protocol(tmp_path):
    env = {**os.environ, "CAMEX_RUNNER": "local", "CAMEX_OUTPUTS": str(tmp_path / "out"),
           "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}"}  # fmt: skip
    cmd = ["bash", "scripts/reproduce_preset.sh", "glue_table", "--protocol", "--dry-run", "--seeds", "2", "--",
           "task=glue/mrpc"]  # fmt: skip
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "9 cells x 16 points" in proc.stdout and "9 cells x 2 seeds = 18 runs" in proc.stdout
    assert f"paths.output_root={tmp_path / 'out'}" in proc.stdout
