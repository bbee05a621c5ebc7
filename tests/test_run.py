"""End-to-end runs of `run.py` as a subprocess, one per task family, on local fixture files.

Each run must leave exactly one MLflow run with the resolved config as params, per-step training
metrics, per-epoch eval metrics, final metrics, artifacts and tags; its final metric must equal
one computed here, independently, from the saved final weights and the fixture's own labels.
"""

from __future__ import annotations

import csv
import json
import math
import os
import re
import string
import subprocess
import sys
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import torch
from omegaconf import OmegaConf
from safetensors.torch import load_file
from scipy import stats

ROOT = Path(__file__).resolve().parents[1]
FIX = ROOT / "tests" / "fixtures"
ENV = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}


def run_cli(out: Path, *overrides: str, env: dict | None = None, timeout: int = 300) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "run.py", f"paths.output_root={out}", "trainer=tiny", *overrides]
    return subprocess.run(cmd, cwd=ROOT, env=env or ENV, capture_output=True, text=True, timeout=timeout)


def _local(train: str, dev: str) -> list[str]:
    return [f"task.local.train={FIX / train}", f"task.local.eval={FIX / dev}"]


def _image_folders(root: Path) -> list[str]:
    """Two tiny class folders of PNGs (red-ish vs blue-ish squares)."""
    from PIL import Image

    rng = np.random.default_rng(0)
    for split, count in (("train", 6), ("eval", 4)):
        for label, channel in (("blue", 2), ("red", 0)):
            folder = root / split / label
            folder.mkdir(parents=True, exist_ok=True)
            for i in range(count):
                pixels = rng.integers(0, 80, (12, 12, 3), dtype=np.uint8)
                pixels[..., channel] = 200
                Image.fromarray(pixels).save(folder / f"{i}.png")
    return [f"task.local.train={root / 'train'}", f"task.local.eval={root / 'eval'}"]


FAMILIES = {
    "classification": ["task=glue/mrpc", "model=tiny_bert", "task.max_length=64",
                       *_local("cls_train.jsonl", "cls_dev.csv")],
    "regression": ["task=glue/stsb", "model=tiny_bert", "merge=camex_dare", *_local("reg_train.jsonl", "reg_dev.json")],
    "squad": ["task=qa/squad", "model=tiny_t5", "merge=camex", "task.max_length=96", "task.doc_stride=32",
              *_local("squad_train.jsonl", "squad_dev.json")],
    "wikiqa": ["task=qa/wikiqa", "model=tiny_bert", "merge=ties", "task.max_length=64",
               *_local("wikiqa_train.jsonl", "wikiqa_dev.csv")],
    "lm": ["task=lm/wikitext2", "model=tiny_gpt2", "merge=ep_camex", "task.block_size=32", "merge.segment_len=8",
           *_local("lm_train.txt", "lm_dev.txt")],
    "vision": ["task=vision/imagenet1k", "model=tiny_vit", "merge=camex_ties", "task.num_labels=2"],
}  # fmt: skip


def _mlflow_runs(out: Path, experiment: str = "default"):
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=f"sqlite:///{out / 'mlflow.db'}")
    exp = client.get_experiment_by_name(experiment)
    return client, client.search_runs([exp.experiment_id]) if exp else []


def _rebuild(run_dir: Path):
    """The upcycled model with the run's saved final weights, and its task data."""
    from camex import models, tasks
    from camex.config import validate
    from camex.train import _sample_limits
    from camex.upcycle import upcycle

    cfg = OmegaConf.to_container(OmegaConf.load(run_dir / ".hydra" / "config.yaml"), resolve=True)
    spec = validate(cfg)
    tokenizer = models.load_tokenizer(spec.model)
    prepared = tasks.prepare(
        _sample_limits(spec.task, spec.trainer), tokenizer=tokenizer, model=spec.info, seed=cfg["seed"]
    )
    model = models.build_model(spec.model, head=prepared.head, num_labels=prepared.num_labels, tokenizer=tokenizer)
    upcycle(model.model if isinstance(model, models.VisionClassifier) else model, spec.variant, spec.options)
    state = load_file(run_dir / "final_model" / "model.safetensors")
    missing, unexpected = model.load_state_dict(state, strict=False)
    assert not unexpected and all("lm_head" in k or "shared" in k or "embed_tokens" in k for k in missing), missing
    return model.eval(), prepared, tokenizer


def _batches(prepared, size: int = 4):
    data = prepared.eval
    for start in range(0, len(data), size):
        yield prepared.collator([data[i] for i in range(start, min(start + size, len(data)))])


def _logits(model, prepared) -> tuple[np.ndarray, np.ndarray]:
    outs, labels = [], []
    with torch.no_grad():
        for batch in _batches(prepared):
            labels.append(batch.pop("labels").numpy())
            out = model(**batch)
            outs.append((out["logits"] if isinstance(out, dict) else out.logits).numpy())
    return np.concatenate(outs), np.concatenate(labels)


def _normalize(text: str) -> str:  # SQuAD v1.1: lower, drop punctuation and articles, squeeze spaces
    text = "".join(ch for ch in text.lower() if ch not in set(string.punctuation))
    return " ".join(re.sub(r"\b(a|an|the)\b", " ", text).split())


def _squad_f1(pred: str, gold: str) -> float:
    p, g = _normalize(pred).split(), _normalize(gold).split()
    common = sum((Counter(p) & Counter(g)).values())
    if common == 0:
        return 0.0
    precision, recall = common / len(p), common / len(g)
    return 2 * precision * recall / (precision + recall)


def _independent(family: str, model, prepared, tokenizer) -> dict[str, float]:
    if family in ("classification", "wikiqa", "vision"):
        logits, labels = _logits(model, prepared)
        file_labels = {
            "classification": [int(r["label"]) for r in csv.DictReader(open(FIX / "cls_dev.csv"))],
            "wikiqa": [int(r["label"]) for r in csv.DictReader(open(FIX / "wikiqa_dev.csv"))],
        }.get(family)
        if file_labels is not None:
            assert labels.tolist() == file_labels
        pred = logits.argmax(-1)
        acc = float((pred == labels).mean())
        if family == "classification":
            tp, fp, fn = [int(((pred == a) & (labels == b)).sum()) for a, b in ((1, 1), (1, 0), (0, 1))]
            return {"final_f1": 2 * tp / (2 * tp + fp + fn) if tp else 0.0, "final_accuracy": acc}
        return {"final_top1" if family == "vision" else "final_accuracy": acc}
    if family == "regression":
        logits, labels = _logits(model, prepared)
        gold = [row["label"] for row in json.load(open(FIX / "reg_dev.json"))]
        assert np.allclose(labels, gold)
        return {"final_spearman": float(stats.spearmanr(logits[:, 0], labels)[0]),
                "final_pearson": float(stats.pearsonr(logits[:, 0], labels)[0])}  # fmt: skip
    if family == "lm":
        nll, count = 0.0, 0
        with torch.no_grad():
            for batch in _batches(prepared):
                logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
                targets = batch["labels"][:, 1:]
                keep = targets != -100
                logp = torch.log_softmax(logits[:, :-1].double(), -1)
                nll -= logp.gather(-1, targets.clamp(min=0).unsqueeze(-1)).squeeze(-1)[keep].sum().item()
                count += int(keep.sum())
        return {"final_perplexity": math.exp(nll / count)}
    if family == "squad":
        golds = [
            qa["answers"] for art in json.load(open(FIX / "squad_dev.json"))["data"]
            for par in art["paragraphs"] for qa in par["qas"]
        ]  # fmt: skip
        texts = []
        with torch.no_grad():
            for batch in _batches(prepared):
                inputs = {k: batch[k] for k in ("input_ids", "attention_mask")}
                ids = model.generate(**inputs, max_new_tokens=prepared.generation["max_new_tokens"], num_beams=1,
                                     do_sample=False)  # fmt: skip
                texts += [t.strip() for t in tokenizer.batch_decode(ids, skip_special_tokens=True)]
        assert len(texts) == len(golds)
        f1 = [max(_squad_f1(t, a["text"]) for a in g) for t, g in zip(texts, golds)]
        em = [max(float(_normalize(t) == _normalize(a["text"])) for a in g) for t, g in zip(texts, golds)]
        return {"final_f1": 100 * float(np.mean(f1)), "final_exact_match": 100 * float(np.mean(em))}
    raise AssertionError(family)


@pytest.mark.parametrize("family", list(FAMILIES))
def test_run_end_to_end(family, tmp_path):
    out = tmp_path / "out"
    overrides = FAMILIES[family] + (_image_folders(tmp_path / "img") if family == "vision" else [])
    proc = run_cli(out, *overrides)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "MLflow UI: mlflow ui --backend-store-uri sqlite:///" in proc.stdout

    client, runs = _mlflow_runs(out)
    assert len(runs) == 1
    run = runs[0]
    assert run.info.status == "FINISHED"
    params, tags, metrics = run.data.params, run.data.tags, run.data.metrics
    assert params["merge.variant"] == tags["merge"] and params["trainer.name"] == "tiny" and params["seed"] == "42"
    assert "resume" not in params and "merge.rank" in params and "task.local.train" in params
    assert {"task", "model", "merge", "seed", "experiment", "git_commit"} <= set(tags)
    history = {
        key: client.get_metric_history(run.info.run_id, key) for key in ("train_loss", "learning_rate", "aux_loss")
    }
    steps = {m.step for m in history["train_loss"]}
    assert len(steps) >= 2 and history["learning_rate"] and history["aux_loss"]
    payload = json.loads((next(out.rglob("metrics.json"))).read_text())
    primary = payload["primary"]
    evals = client.get_metric_history(run.info.run_id, "eval_" + primary.removeprefix("final_"))
    assert len(evals) == 2  # one per epoch; the final metrics are the selected epoch's evaluation
    best = max(evals, key=lambda m: m.value) if payload["greater_is_better"] else min(evals, key=lambda m: m.value)
    assert metrics[primary] == pytest.approx(best.value, abs=1e-12)
    artifacts = {a.path for a in client.list_artifacts(run.info.run_id)}
    assert {"config.json", "metrics.json", "packages.json", "git_commit.txt"} <= artifacts

    run_dir = next(out.rglob("final_model")).parent
    model, prepared, tokenizer = _rebuild(run_dir)
    expected = _independent(family, model, prepared, tokenizer)
    for key, value in expected.items():
        assert metrics[key] == pytest.approx(value, abs=1e-5, rel=1e-5), key
    assert primary in expected


def test_offline_hub_task_fails_fast_with_a_hint(tmp_path):
    proc = run_cli(tmp_path / "out", "task=glue/sst2", "merge=camex_ties", timeout=60)
    assert proc.returncode == 2
    err = proc.stderr.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: ")
    assert "unreachable" in err[0] and "task.local.train=" in err[0]


@pytest.mark.parametrize(
    "override,key",
    [("merge.top_k=9", "merge.top_k"), ("merge.rank=0", "merge.rank"), ("merge.routing=bogus", "merge.routing"),
     ("trainer.learning_rate=-1", "trainer.learning_rate"), ("tracking.uri=nowhere", "tracking.uri")],
)  # fmt: skip
def test_bad_values_fail_before_loading(override, key, tmp_path):
    proc = run_cli(
        tmp_path / "out", "task=glue/mrpc", "model=tiny_bert", override, *_local("cls_train.jsonl", "cls_dev.csv")
    )
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert proc.stderr.strip().startswith("error: ") and key in proc.stderr
    assert not (tmp_path / "out" / "mlflow.db").exists()


def test_generative_qa_on_an_encoder_is_refused(tmp_path):
    proc = run_cli(tmp_path / "out", "task=qa/squad", "model=tiny_bert", *_local("squad_train.jsonl", "squad_dev.json"))
    assert proc.returncode == 2 and "error: " in proc.stderr


def test_killed_run_resumes_to_the_same_result(tmp_path):
    args = ["task=glue/mrpc", "model=tiny_bert", "task.max_length=64", "trainer.epochs=3",
            *_local("cls_train.jsonl", "cls_dev.csv")]  # fmt: skip
    whole = run_cli(tmp_path / "whole", *args)
    assert whole.returncode == 0, whole.stderr[-2000:]
    killed = run_cli(tmp_path / "cut", *args, env={**ENV, "CAMEX_FAULT_KILL_AT_STEP": "5"})
    assert killed.returncode == -9  # SIGKILL after step 5: epoch 1 (3 steps) is checkpointed
    again = run_cli(tmp_path / "cut", *args)
    assert again.returncode == 2 and "resume=true" in again.stderr  # never clobbers silently
    resumed = run_cli(tmp_path / "cut", *args, "resume=true")
    assert resumed.returncode == 0, resumed.stderr[-2000:]

    def final(out: Path) -> dict:
        return json.loads(next(out.rglob("metrics.json")).read_text())["metrics"]

    a, b = final(tmp_path / "whole"), final(tmp_path / "cut")
    assert {k: v for k, v in a.items() if "runtime" not in k and "per_second" not in k and "wall" not in k} == {
        k: v for k, v in b.items() if "runtime" not in k and "per_second" not in k and "wall" not in k
    }
    _, runs = _mlflow_runs(tmp_path / "cut")
    assert len(runs) == 1 and runs[0].info.status == "FINISHED"  # the resumed run continued the same MLflow run
