"""Released-code parity (experiment=released_glue / released_lm / released_qa): each switch that
makes a run behave like the authors' released scripts has its effect on a tiny real T5."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf

from camex import models, tasks
from camex.config import ConfigError, validate
from camex.train import _CamexTrainerMixin, _training_args, pad_like_released
from camex.upcycle import upcycle

ROOT = Path(__file__).resolve().parents[1]
FIX = ROOT / "tests" / "fixtures"
LOCAL = [f"task.local.train={FIX / 'cls_train.jsonl'}", f"task.local.eval={FIX / 'cls_dev.csv'}"]


def _spec(*overrides: str):
    with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base="1.3"):
        cfg = compose(config_name="config", overrides=list(overrides))
    cfg = OmegaConf.to_container(cfg, resolve=True)
    return cfg, validate(cfg)


def _upcycled(spec):
    tokenizer = models.load_tokenizer(spec.model)
    prepared = tasks.prepare(spec.task, tokenizer=tokenizer, model=spec.info, seed=0)
    model = models.build_model(spec.model, head=prepared.head, num_labels=prepared.num_labels, tokenizer=tokenizer)
    upcycle(model, spec.variant, spec.options)
    return prepared, model


RELEASED = ("experiment=released_glue", "task=glue/rte", "model=tiny_t5", *LOCAL)
PAPER = ("task=glue/rte", "model=tiny_t5", "merge=camex", *LOCAL)


@pytest.mark.parametrize("overrides", [RELEASED, PAPER], ids=["released_glue", "paper"])
def test_t5_objective_has_the_aux_loss_only_outside_released_glue(overrides):
    torch.manual_seed(0)
    _, spec = _spec(*overrides)
    prepared, model = _upcycled(spec)
    model.train()
    batch = prepared.collator([prepared.train[i] for i in range(4)])
    out = model(**batch)
    task_loss = torch.nn.functional.cross_entropy(out.logits, batch["labels"])
    aux = float(model.camex_aux_loss.detach())
    if "experiment=released_glue" in overrides:  # the released T5 never adds the load-balancing loss
        assert spec.options.aux_coef == 0.0 and aux == 0.0
        assert float(out.loss.detach()) == pytest.approx(float(task_loss.detach()), abs=1e-7)
    else:  # the paper's objective carries it (so the check above is not vacuous)
        assert aux > 1e-4 and float(out.loss.detach()) == pytest.approx(float(task_loss.detach()) + aux, rel=1e-5)


def test_padding_inclusive_mean_pads_every_batch_to_max_length():
    _, spec = _spec(*RELEASED)
    assert spec.options.padding_mean == "include"
    prepared, _ = _upcycled(spec)
    features = [prepared.train[i] for i in range(3)]
    assert prepared.collator(features)["input_ids"].shape[1] < spec.task["max_length"]  # dynamic padding
    pad_like_released(prepared, spec)
    batch = prepared.collator(features)
    assert batch["input_ids"].shape[1] == batch["attention_mask"].shape[1] == spec.task["max_length"] == 128
    _, paper = _spec(*PAPER)  # the fixed (padding-excluding) mean keeps dynamic padding
    kept, _ = _upcycled(paper)
    pad_like_released(kept, paper)
    assert kept.collator(features)["input_ids"].shape[1] < paper.task["max_length"]


@pytest.mark.parametrize("experiment", ["released_glue", "released_lm", "released_qa"])
def test_released_optimizer_has_the_hugging_face_defaults(experiment, tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "0")  # validate the configs, not hub reachability
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "0")
    task = {"released_glue": "glue/rte", "released_lm": "lm/wikitext2", "released_qa": "qa/squad"}[experiment]
    model_name = "tiny_gpt2" if task.startswith("lm/") else "tiny_t5"
    shorter = ["task.block_size=64", "merge.segment_len=32"] if task.startswith("lm/") else []
    cfg, spec = _spec(f"experiment={experiment}", f"task={task}", f"model={model_name}", *shorter)
    prepared = SimpleNamespace(head="seq2seq" if task == "qa/squad" else "classification", primary_metric="m",
                               greater_is_better=True, eval=None, extra={}, generation={})  # fmt: skip
    args = _training_args(spec, prepared, tmp_path, seed=0)
    assert args.warmup_steps == 0
    model = torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.LayerNorm(4))
    trainer = SimpleNamespace(optimizer=None, args=args, model=model, decay_curvature=spec.options.curvature_decay)
    optimizer = _CamexTrainerMixin.create_optimizer(trainer, model)
    assert len(optimizer.param_groups) == 2
    for group in optimizer.param_groups:
        assert group["betas"] == (0.9, 0.999) and group["eps"] == 1e-8 and group["weight_decay"] == 0.0
    aux = {"released_glue": 0.0, "released_lm": 1e-5, "released_qa": 0.0}[experiment]
    assert spec.options.aux_coef == aux


def test_optimizer_option_leaves_the_paper_trainer_alone_and_is_composable():
    cfg, _ = _spec(*PAPER)
    t = cfg["trainer"]
    assert (t["adam_beta2"], t["adam_epsilon"], t["weight_decay"], t["warmup_steps"]) == (0.98, 1e-6, 0.01, 16)
    cfg, _ = _spec(*PAPER, "optimizer=hf_adamw")
    t = cfg["trainer"]
    assert (t["adam_beta2"], t["adam_epsilon"], t["weight_decay"], t["warmup_steps"]) == (0.999, 1e-8, 0.0, 0)


def test_released_presets_refuse_other_tasks():
    with pytest.raises(ConfigError, match="needs task= one of"):
        _spec("experiment=released_qa", "task=glue/rte")


def test_released_glue_without_a_glue_task_exits_2_with_one_line(tmp_path):
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"}
    cmd = [sys.executable, "run.py", "experiment=released_glue", f"paths.output_root={tmp_path}", "tracking=none"]
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: experiment released_glue needs task= one of")
    assert "glue/mrpc" in lines[0] and "offline/sentiment" in lines[0]
    assert not any(tmp_path.rglob("metrics.json"))
