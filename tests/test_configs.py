"""Every config combination composes through Hydra's Compose API and validates (or is refused
with a one-line reason when the task and model do not fit together)."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf

from camex import list_variants
from camex.config import ConfigError, validate

CONF = Path(__file__).resolve().parents[1] / "conf"


def _options(group: str) -> list[str]:
    root = CONF / group
    names = sorted(str(p.relative_to(root).with_suffix("")) for p in root.rglob("*.yaml"))
    return [n for n in names if not Path(n).name.startswith("_")]


@pytest.fixture(scope="module", autouse=True)
def _hydra():
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        yield


def _compose(overrides: list[str]) -> dict:
    return OmegaConf.to_container(compose(config_name="config", overrides=overrides), resolve=False)


def _resolve(cfg: dict) -> dict:
    cfg = {k: v for k, v in cfg.items() if k != "hydra"}
    return OmegaConf.to_container(OmegaConf.create(cfg), resolve=True)


def _resolved(overrides: list[str]) -> dict:
    return _resolve(_compose(overrides))


def test_merge_presets_are_exactly_the_variants():
    assert sorted(_options("merge")) == sorted(list_variants())


def test_every_task_merge_model_combination(monkeypatch):
    """Compose task × model × merge. A task and a model either fit (every merge must then compose
    and validate) or not (validation must refuse the pair with a one-line reason).

    Hydra composes each (task, model) pair and each merge preset once. A triple is the pair's
    config with the preset's `merge` node, which is what Hydra composes for it as long as no task,
    model or experiment writes to `merge`: checked on every pair, and one full triple composition
    per pair (rotating over the merges) must equal the assembled one. So the two thousand triples
    do not each pay a Hydra compose."""
    monkeypatch.setenv("HF_HUB_OFFLINE", "0")  # validate the configs, not hub reachability
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "0")
    tasks, merges, models = _options("task"), _options("merge"), _options("model")
    default_merge = _compose([])["merge"]
    merge_nodes = {merge: _compose([f"merge={merge}"])["merge"] for merge in merges}
    composed, refused, cross_checked = 0, 0, 0
    for t, task in enumerate(tasks):
        fits = 0
        for m, model in enumerate(models):
            pair = _compose([f"task={task}", f"model={model}"])
            assert pair["merge"] == default_merge, f"task={task} model={model} writes to merge"
            try:
                validate(_resolve(pair))
            except ConfigError as e:
                assert "\n" not in str(e)
                refused += len(merges)
                continue
            fits += 1
            for k, merge in enumerate(merges):
                cfg = _resolve({**pair, "merge": merge_nodes[merge]})
                if (t + m + k) % len(merges) == 0:
                    assert cfg == _resolved([f"task={task}", f"model={model}", f"merge={merge}"]), (task, model, merge)
                    cross_checked += 1
                assert (cfg["task"]["name"], cfg["model"]["name"], cfg["merge"]["variant"]) == (task, model, merge)
                validate(cfg)
                composed += 1
        assert fits >= 1, f"no model fits task {task}"
    print(
        f"\ncomposed and validated {composed} task x model x merge combinations ({refused} refused as incompatible;"
        f" {cross_checked} composed whole by Hydra as a cross-check)"
    )


@pytest.mark.parametrize("experiment", _options("experiment"))
def test_every_experiment_preset_composes(experiment):
    cfg = _compose([f"experiment={experiment}"])
    # the three parts of the CPU-scale reproduction share one MLflow experiment, hence one report
    assert cfg["experiment_name"] == ("cpu_mini" if experiment.startswith("cpu_mini_") else experiment)
    assert cfg["merge"]["variant"] in list_variants()


def test_task_presets_pick_the_papers_model_and_cli_wins():
    assert _compose(["task=glue/sst2"])["model"]["name"] == "t5_base"
    assert _compose(["task=lm/wikitext2"])["model"]["name"] == "gpt2"
    assert _compose(["task=glue/sst2", "model=tiny_t5"])["model"]["name"] == "tiny_t5"
    default = _compose([])
    assert (default["task"]["name"], default["model"]["name"], default["merge"]["variant"]) == (
        "offline/sentiment",
        "minilm",
        "camex_ties",
    )


@pytest.mark.parametrize(("override", "message"), [
    ({"threads": 0}, "trainer.threads=0 is invalid; allowed: null or an integer >= 1"),
    ({"keep_checkpoints": "no"}, "trainer.keep_checkpoints='no' is invalid; allowed: true or false"),
    ({"compile": "yes"}, "trainer.compile='yes' is invalid; allowed: true or false"),
    ({"reuse_host_memory": 1}, "trainer.reuse_host_memory=1 is invalid; allowed: true or false"),
])  # fmt: skip
def test_cpu_trainer_options_are_validated(override, message):
    from camex.config import _check_trainer

    trainer = {**_compose(["trainer=cpu_mini"])["trainer"], **override}
    with pytest.raises(ConfigError, match=re.escape(message)):
        _check_trainer(trainer)
    _check_trainer(_compose(["trainer=cpu_mini"])["trainer"])  # the preset itself is valid


@pytest.mark.parametrize("value", [False, True])
def test_trainer_compile_reaches_the_trainer(value, tmp_path):
    from camex.tasks import Prepared
    from camex.train import _training_args

    cfg = _resolved(["trainer=tiny", "model=tiny_bert", "tracking=none", f"trainer.compile={str(value).lower()}"])
    spec = validate(cfg)
    prepared = Prepared(None, None, None, "sequence_classification", 2, lambda p: {}, "accuracy", True)
    assert _training_args(spec, prepared, tmp_path, 0).torch_compile is value
