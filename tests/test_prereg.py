"""The pre-registered CPU experiment (docs/prereg_cpu.md) before its runs: the presets carry the
registered numbers (composed through Hydra's Compose API), one epoch is the registered step count,
the detectable effect agrees with a simulation of the paired t-test, the pre-registered analysis
reads paired comparisons as registered, and the driver runs its stages in order."""

from __future__ import annotations

import csv
import importlib.util
import json
import math
from pathlib import Path

import numpy as np
import pytest
from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf
from scipy import stats

from camex.report import power, prereg
from camex.report.collect import Run

ROOT = Path(__file__).resolve().parents[1]
CONF = ROOT / "conf"


def _cfg(experiment: str, *overrides: str) -> dict:
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        overrides = [f"experiment={experiment}", *overrides]
        cfg = compose(config_name="config", overrides=overrides, return_hydra_config=True)
    return OmegaConf.to_container(cfg, resolve=False)


def _sweep(cfg: dict) -> dict[str, list[str]]:
    return {k: str(v).split(",") for k, v in cfg["hydra"]["sweeper"]["params"].items()}


def test_main_arm_preset_is_the_registered_design():
    cfg = _cfg("prereg_lm")
    assert cfg["experiment_name"] == "prereg_lm"
    assert cfg["task"]["name"] == "offline/wiki_lm" and cfg["model"]["name"] == "small_gpt2_bpe8k"
    assert cfg["model"]["tokenizer"] == "asset:wiki_bpe8k"  # amendment 1: the corpus-fitted vocabulary
    assert cfg["task"]["block_size"] == 256 and cfg["merge"]["segment_len"] == 64
    t = cfg["trainer"]
    assert t["batch_size"] * cfg["task"]["block_size"] == 2048  # tokens per optimizer step
    assert (t["eval_every"], t["eval_steps"]) == ("steps", 50)
    assert t["select_best"] is False  # the primary endpoint is the last step
    assert t["max_train_samples"] is None  # the full sample
    assert t["max_eval_samples"] == 128 and cfg["task"]["data_seed"] == 0  # the same 128 eval blocks for every run
    assert _sweep(cfg) == {"merge": ["domain", "camex", "ties", "camex_ties"], "seed": [str(s) for s in range(6)]}
    assert cfg["hydra"]["sweeper"]["sampler"] == "grid" and cfg["hydra"]["launcher"]["n_jobs"] == 2


def test_fine_tuning_arm_preset_is_the_registered_design(tmp_path):
    cfg = _cfg("prereg_ft", f"paths.output_root={tmp_path}")
    resolved = OmegaConf.to_container(OmegaConf.create({k: v for k, v in cfg.items() if k != "hydra"}), resolve=True)
    assert cfg["experiment_name"] == "prereg_ft"
    assert (cfg["task"]["name"], cfg["model"]["name"], cfg["task"]["max_length"]) == ("offline/topic", "minilm", 48)
    # the composed MoE reads the experts the driver builds into the outputs folder (scripts/prereg_experts.py)
    assert resolved["compose"]["experts"] == {d: str(tmp_path / "experts" / d) for d in ("tweets", "wikipedia", "code")}
    t = cfg["trainer"]
    assert (t["learning_rate"], t["batch_size"], t["max_steps"], t["warmup_steps"]) == (1.0e-3, 8, 100, 10)
    assert (t["eval_every"], t["eval_steps"], t["select_best"]) == ("steps", 25, False)
    assert t["max_train_samples"] is None and t["max_eval_samples"] is None
    assert _sweep(cfg) == {"merge": ["domain", "camex"], "seed": [str(s) for s in range(5)]}


def test_control_is_the_euclidean_rows_at_learning_rate_x_1_2_on_shared_seeds():
    main, control = _cfg("prereg_lm"), _cfg("prereg_lm_control")
    assert control["experiment_name"] == "prereg_lm_control"
    assert control["trainer"]["learning_rate"] == pytest.approx(1.2 * main["trainer"]["learning_rate"])
    assert _sweep(control) == {"merge": ["domain", "ties"], "seed": ["0", "1", "2"]}
    assert set(_sweep(control)["seed"]) <= set(_sweep(main)["seed"])  # pairs by seed with the CA runs
    # everything else is the main arm's
    for key in ("task", "model", "merge"):
        assert control[key] == main[key], key
    same = {k: v for k, v in main["trainer"].items() if k != "learning_rate"}
    assert {k: v for k, v in control["trainer"].items() if k != "learning_rate"} == same


def test_max_steps_and_eval_blocks_are_the_registered_counts():
    """Counts the blocks of the full gensim sample with the preset's tokenizer (~15 s)."""
    from camex import models, tasks

    cfg = OmegaConf.to_container(OmegaConf.create({k: v for k, v in _cfg("prereg_lm").items() if k != "hydra"}),
                                 resolve=True)  # fmt: skip
    task = {**cfg["task"], "max_train_samples": None, "max_eval_samples": None}
    tokenizer = models.load_tokenizer(cfg["model"])
    assert len(tokenizer) == 8192
    prepared = tasks.prepare(task, tokenizer=tokenizer, model=models.model_info(cfg["model"]), seed=0)
    blocks, eval_blocks = len(prepared.train), len(prepared.eval)
    epoch = math.ceil(blocks / cfg["trainer"]["batch_size"])
    # the numbers docs/prereg_cpu.md states: 300 of the 338 steps of an epoch, 128 of 360 eval blocks
    assert (blocks, epoch, cfg["trainer"]["max_steps"], eval_blocks) == (2699, 338, 300, 360)


def test_an_unknown_asset_is_refused_with_the_allowed_ones():
    from camex import models

    assert models.resolve_source("asset:wiki_bpe8k", "model.tokenizer").endswith("camex/assets/wiki_bpe8k")
    with pytest.raises(models.ModelError, match=r"tokenizer=asset:nope: no such asset; allowed: asset:wiki_bpe8k"):
        models.resolve_source("asset:nope", "model.tokenizer")


def test_the_committed_tokenizer_is_what_its_build_script_writes(tmp_path):
    """camex/assets/wiki_bpe8k is regenerated from the train split and compared file by file (~10 s)."""
    spec = importlib.util.spec_from_file_location("build_tokenizer", ROOT / "scripts" / "build_tokenizer.py")
    build = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(build)
    out = build.build("wiki_bpe8k", tmp_path / "wiki_bpe8k")
    committed = ROOT / "camex" / "assets" / "wiki_bpe8k"
    assert sorted(p.name for p in out.iterdir()) == sorted(p.name for p in committed.iterdir())
    for f in committed.iterdir():
        assert (out / f.name).read_bytes() == f.read_bytes(), f.name


# ---------------------------------------------------------------------------------------- power


def test_power_at_no_effect_is_alpha_and_normal_limit_for_large_n():
    assert power.power(0.0, 6) == pytest.approx(0.05, abs=1e-9)
    # large n: the t-test becomes the z-test, d = (z_0.975 + z_0.8) / sqrt(n)
    n = 2000
    assert power.detectable_effect(n) == pytest.approx((stats.norm.ppf(0.975) + stats.norm.ppf(0.8)) / math.sqrt(n),
                                                      rel=2e-3)  # fmt: skip


def test_detectable_effect_with_6_pairs_matches_a_simulated_paired_t_test():
    d = power.detectable_effect(6)
    assert 1.3 < d < 1.6
    rng = np.random.default_rng(0)
    sims = 40_000
    diffs = rng.normal(d, 1.0, size=(sims, 6))  # paired differences with SD 1 and mean d
    t = diffs.mean(axis=1) / (diffs.std(axis=1, ddof=1) / math.sqrt(6))
    rejected = np.mean(np.abs(t) > stats.t.ppf(0.975, 5))
    assert rejected == pytest.approx(0.8, abs=4 * math.sqrt(0.8 * 0.2 / sims))


def test_planning_sd_pools_the_paired_differences_of_each_row_pair(tmp_path):
    path = tmp_path / "runs.csv"
    rows = [("domain", 0, 1.0), ("domain", 1, 2.0), ("domain", 2, 3.0), ("camex", 0, 0.9), ("camex", 1, 2.0),
            ("camex", 2, 2.8), ("ties", 0, 1.0), ("ties", 1, 1.0), ("camex_ties", 0, 1.5), ("camex_ties", 1, 0.5),
            ("domain", 0, 9.0)]  # fmt: skip
    with path.open("w", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(["model", "merge", "seed", "final_nll"])
        w.writerows([("small_gpt2", m, s, v) for m, s, v in rows[:-1]] + [("small_vit", *rows[-1])])
    diffs = power.paired_differences(path, "small_gpt2")
    assert diffs["camex − domain"] == pytest.approx([-0.1, 0.0, -0.2])
    assert diffs["camex_ties − ties"] == pytest.approx([0.5, -0.5])
    # variances 0.01 (2 df) and 0.5 (1 df): pooled (0.02 + 0.5) / 3
    assert power.planning_sd(diffs) == pytest.approx(math.sqrt(0.52 / 3))


def test_power_refuses_too_few_pairs_with_exit_2(capsys):
    assert power.main(["--n", "1"]) == 2
    assert "--n 1" in capsys.readouterr().err


# ------------------------------------------------------------------------------ the analysis


def _run(experiment: str, merge: str, seed: int, nll: float) -> Run:
    return Run(f"{experiment}-{merge}-{seed}", experiment, {"task": "offline/wiki_lm", "model": "small_gpt2",
               "merge": merge, "seed": str(seed)}, {}, {"final_nll": nll})  # fmt: skip


def test_analysis_pairs_by_seed_holm_adjusts_and_states_no_effect_with_its_interval():
    ca_gain = [-0.010, -0.012, -0.011, -0.009, -0.013, -0.010]  # a clear CA effect on the Domain pair
    noise = [0.003, -0.002, 0.001, -0.004, 0.002, -0.001]  # none on the Ties pair
    main = [_run("prereg_lm", "domain", s, 5.0 + s / 10) for s in range(6)]
    main += [_run("prereg_lm", "camex", s, 5.0 + s / 10 + ca_gain[s]) for s in range(6)]
    main += [_run("prereg_lm", "ties", s, 6.0 + s / 10) for s in range(6)]
    main += [_run("prereg_lm", "camex_ties", s, 6.0 + s / 10 + noise[s]) for s in range(6)]
    control = [_run("prereg_lm_control", m, s, base + s / 10 - 0.02) for m, base in (("domain", 5.0), ("ties", 6.0))
               for s in range(3)]  # fmt: skip
    history = {r.run_id: [(50, r.metrics["final_nll"] + 1.0), (100, r.metrics["final_nll"])] for r in main + control}
    rows = prereg.analyse(main, control, lambda run_id, key: history[run_id] if key == "eval_nll" else [])
    by = {(r["hypothesis"], r["endpoint"].split(":")[0], r["pair"]): r for r in rows}
    assert len(rows) == 8

    h1 = by[("H1", "primary", "camex − domain")]["comparison"]
    assert h1.kind == "paired" and h1.n == 6 and h1.difference == pytest.approx(np.mean(ca_gain))
    assert h1.p_sign == pytest.approx(2 / 64)  # 6 of 6 pairs favour CA
    other = by[("H1", "primary", "camex_ties − ties")]["comparison"]
    assert h1.p_holm == pytest.approx(min(1.0, 2 * h1.p)) and other.p_holm == pytest.approx(max(other.p, 2 * h1.p))
    assert by[("H1", "primary", "camex − domain")]["decision"].startswith("CA lower")
    decision = by[("H1", "primary", "camex_ties − ties")]["decision"]
    lo, hi = other.ci
    assert decision.startswith("no detectable effect") and f"[{lo:+.5f}, {hi:+.5f}]" in decision

    # secondary endpoint: the per-run mean over its evaluations (here final + 0.5, so the same Δ)
    sec = by[("H1", "secondary", "camex − domain")]["comparison"]
    assert sec.difference == pytest.approx(h1.difference)

    # H2: the CA runs of the control's seeds only, paired with the lr x 1.2 runs
    h2 = by[("H2", "primary", "camex − domain (lr × 1.2)")]["comparison"]
    assert h2.kind == "paired" and h2.seeds == ("0", "1", "2")
    assert h2.differences == pytest.approx([ca_gain[s] + 0.02 for s in range(3)])

    # the findings read them by the registered rules
    said = prereg.findings(rows, ["a check"])
    h1_domain = next(f for f in said if f.startswith("**H1, Domain-specific-CA vs Domain-specific**"))
    assert "CA lower (supports the hypothesis)" in h1_domain and "6 of 6 pairs lower for CA" in h1_domain
    assert "Secondary endpoint (supporting): CA lower" in h1_domain
    h2_ties = next(f for f in said if f.startswith("**H2, Ties-CA vs Ties (lr × 1.2)**"))
    assert "not interpreted, as registered (H1 is not supported for this pair)" in h2_ties
    h2_domain = next(f for f in said if f.startswith("**H2, Domain-specific-CA vs Domain-specific (lr × 1.2)**"))
    # CA above the lr x 1.2 runs on 3 of 3 pairs: significant by the t-test only (sign test p = 0.25 at n = 3)
    assert "CA higher (against the hypothesis)" in h2_domain
    assert "significant by the t-test, not by the sign test (p = 0.25)" in h2_domain
    assert said[-1] == "a check" and len(said) == 5  # 4 primary questions, then the checks


def test_analysis_says_not_testable_when_seeds_do_not_pair():
    main = [_run("prereg_lm", "domain", s, 5.0) for s in (0, 1)] + [_run("prereg_lm", "camex", s, 5.0) for s in (2, 3)]
    rows = prereg.analyse(main, [], lambda _, __: [])
    assert all(r["decision"].startswith("not testable") for r in rows)
    assert "seeds do not pair" in rows[0]["decision"]


def _ft_run(merge: str, seed: int, accuracy: float, moved: float | None = None) -> Run:
    metrics = {"final_accuracy": accuracy, **({} if moved is None else {prereg.MOVED: moved})}
    return Run(f"ft-{merge}-{seed}", prereg.FINETUNE, {"task": "offline/topic", "model": "minilm", "merge": merge,
               "seed": str(seed)}, {}, metrics)  # fmt: skip


def test_fine_tuning_arm_reads_accuracy_with_higher_favouring_ca():
    gain = [0.020, 0.025, 0.018, 0.022, 0.021]
    runs = [_ft_run("domain", s, 0.80 + s / 100) for s in range(5)]
    runs += [_ft_run("camex", s, 0.80 + s / 100 + gain[s], moved=0.08) for s in range(5)]
    history = {r.run_id: [(25, r.metrics["final_accuracy"] - 0.1), (100, r.metrics["final_accuracy"])] for r in runs}
    rows = prereg.analyse_finetune(runs, lambda run_id, key: history[run_id] if key == "eval_accuracy" else [])
    assert [(r["hypothesis"], r["endpoint"].split(":")[0]) for r in rows] == [("H3", "primary"), ("H3", "secondary")]
    c = rows[0]["comparison"]
    assert c.kind == "paired" and c.n == 5 and c.difference == pytest.approx(np.mean(gain))
    assert c.p_holm == pytest.approx(c.p)  # one pair per endpoint: Holm changes nothing
    assert rows[0]["decision"].startswith("CA higher (supports the hypothesis)") and "accuracy" in rows[0]["decision"]
    assert rows[1]["comparison"].difference == pytest.approx(c.difference)
    (h3,) = prereg.findings(rows)
    # 5 of 5 pairs favour CA: the sign test's smallest p is 0.0625, so the t-test stands alone
    assert "supported by the t-test, not by the sign test (p = 0.0625)" in h3
    # the manipulation check against the registered 5 %: met here, not met below it
    assert "above the registered 5%" in prereg.manipulation_check(prereg.FINETUNE, runs)
    low = [_ft_run("camex", s, 0.8, moved=0.002) for s in range(2)]
    text = prereg.manipulation_check(prereg.FINETUNE, low)
    assert "0.20% (mean of 2 runs)" in text and "says nothing about the paper's claim" in text
    assert "cannot say" in prereg.manipulation_check(prereg.MAIN, [_ft_run("camex", 0, 0.8)])


def test_the_analysis_quotes_the_registration_commits():
    registered = prereg.registration_commits()
    if not registered:
        pytest.skip("no git history in this checkout")
    hashes = [line.split()[0] for line in registered]
    # the first registration and amendment 1, oldest first, each a commit that changed docs/prereg_cpu.md
    assert all(line.split(" ", 3)[3].startswith("Pre-registration:") for line in registered)
    assert any(h.startswith("fef311e") for h in hashes) and any(h.startswith("b1962ff") for h in hashes)
    text = prereg.render([], [], registered)
    assert "Registered before any run" in text and f"`{hashes[0]}`" in text


# ------------------------------------------------------------------------------ the driver


def _driver():
    spec = importlib.util.spec_from_file_location("prereg_cpu", ROOT / "scripts" / "prereg_cpu.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_driver_runs_both_arms_then_the_report_then_the_registered_tests(tmp_path, monkeypatch):
    driver = _driver()
    calls: list[list[str]] = []
    monkeypatch.setattr(driver.pipeline, "_run", lambda cmd: calls.append(cmd) or 1.5)
    monkeypatch.setattr(driver.prereg, "write", lambda uri, out: calls.append(["prereg", uri, str(out)]) or out)
    monkeypatch.setattr(driver.prereg_experts, "build", lambda out, reduced: calls.append(["experts", str(out), reduced]))  # noqa: E501
    outputs, out = tmp_path / "o", tmp_path / "r"
    assert driver.main(["--reduced", "--outputs", str(outputs), "--out", str(out)]) == 0
    experts, sweeps, report, tests = calls[0], calls[1:4], calls[4], calls[5]
    assert experts == ["experts", str(outputs / "experts"), True]  # built first: prereg_ft reads them
    assert [c[3] for c in sweeps] == ["experiment=prereg_lm", "experiment=prereg_lm_control", "experiment=prereg_ft"]
    assert "merge=domain,camex" in sweeps[0] and "merge=domain" in sweeps[1] and "merge=domain,camex" in sweeps[2]
    assert all("seed=0,1" in c and "trainer.max_steps=2" in c and f"paths.output_root={outputs}" in c for c in sweeps)
    assert report[1:3] == ["-m", "camex.report"]
    assert [report[i + 1] for i, a in enumerate(report) if a == "--experiment"] == ["prereg_lm", "prereg_ft"]
    assert tests == ["prereg", f"sqlite:///{outputs}/mlflow.db", str(out)]
    provenance = json.loads((out / "provenance.json").read_text())
    assert provenance["command"].startswith("python scripts/prereg_cpu.py --reduced")
    assert set(provenance["invocations"][0]["parts"]) == {"main", "control", "finetune"}
    assert provenance["wall_clock_s"] == pytest.approx(4.5 + provenance["invocations"][0]["before_sweeps_s"])


def test_the_experts_train_on_one_thread_whatever_the_driver_runs_on(tmp_path, monkeypatch):
    """The registered experts were trained on one thread; on two, GEMM sums in another order and all
    three came out different (docs/prereg_cpu.md, "Second rerun"), so the builder pins it."""
    import torch

    experts = _driver().prereg_experts
    demo, seen = experts.demo, []
    monkeypatch.setattr(demo, "domain_data", lambda cfg: ({}, {d: (3 * i, 3) for i, d in enumerate(cfg["domains"])}))
    monkeypatch.setattr(demo, "sampler", lambda *args: None)
    monkeypatch.setattr(demo, "train", lambda *args, **kwargs: seen.append(torch.get_num_threads()))
    monkeypatch.setattr(demo, "save_atomic", lambda model, tokenizer, folder: folder.mkdir())
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(2)
        folders = experts.build(tmp_path, reduced=True)
        after = torch.get_num_threads()
    finally:
        torch.set_num_threads(threads)
    assert seen == [1, 1, 1] and after == 2  # the driver's own setting comes back
    assert sorted(folders) == ["code", "tweets", "wikipedia"]


def _reduced(outputs: Path, out: Path, *extra: str):
    import os
    import subprocess
    import sys

    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
    cmd = [sys.executable, "scripts/prereg_cpu.py", "--reduced", "--outputs", str(outputs), "--out", str(out), *extra]
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    return proc


@pytest.fixture(scope="module")
def reduced_run(tmp_path_factory) -> tuple[Path, Path]:
    """`python scripts/prereg_cpu.py --reduced`: experts, three sweeps, report and registered tests."""
    root = tmp_path_factory.mktemp("prereg_reduced")
    _reduced(root / "o", root / "r")
    return root / "o", root / "r"


def test_reduced_pipeline_end_to_end(reduced_run):
    """The issue's "--reduced still runs the pipeline in CI": the whole driver on a few blocks."""
    _, out = reduced_run
    text = (out / "prereg.md").read_text()
    assert "| H1 | primary: last-step NLL | camex − domain | 2 |" in text
    assert "| H2 | primary: last-step NLL | camex − domain (lr × 1.2) | 2 |" in text
    assert "| H3 | primary: last-step accuracy | camex − domain | 2 |" in text and "## Manipulation checks" in text
    assert (out / "runs.csv").is_file()


@pytest.mark.slow
def test_reduced_pipeline_run_again_resumes_nothing_and_agrees(reduced_run, tmp_path):
    outputs, out = reduced_run
    again = _reduced(outputs, tmp_path / "r2", "--compare", str(out))
    assert "finished:" not in again.stdout and "agrees within seed noise" in again.stdout
    assert (tmp_path / "r2" / "prereg.md").read_text() == (out / "prereg.md").read_text()


def test_measured_budget_leaves_out_pauses_and_counts_overlapping_runs_once():
    # run a: works 0-100 s, stopped, resumed at 1000-1050 s; run b overlaps it at 50-150 s
    a = prereg.active_intervals([0, 10, 100, 1000, 1050], pause_s=300)
    b = prereg.active_intervals([150, 50, 120], pause_s=300)
    assert a == [(0, 100), (1000, 1050)] and b == [(50, 150)]
    budget = prereg.measured_budget({"main": a, "ft": b})
    assert budget["main"] == {"wall_s": 150.0, "run_s": 150.0}
    assert budget["total"] == {"wall_s": 200.0, "run_s": 250.0}  # 0-150 and 1000-1050; 100 + 50 + 100
    table = prereg.render_budget(budget, {"main": 1, "ft": 1})
    assert table[-1] == "| total | 2 | 3.3 | 4.2 |"


def test_a_part_stopped_before_its_end_stays_on_record_and_the_report_says_so(tmp_path, monkeypatch):
    driver = _driver()

    def run(cmd: list[str]) -> float:
        if "experiment=prereg_lm_control" in cmd:
            raise SystemExit("stopped")  # as a stop (or a failed part) ends the driver
        return 2.0

    monkeypatch.setattr(driver.pipeline, "_run", run)
    monkeypatch.setattr(driver.prereg_experts, "build", lambda out, reduced: None)
    monkeypatch.setattr(driver.prereg, "write", lambda uri, out: out)
    outputs, out = tmp_path / "o", tmp_path / "r"
    with pytest.raises(SystemExit):
        driver.main(["--reduced", "--outputs", str(outputs), "--out", str(out)])
    parts = json.loads((outputs / "timings.json").read_text())[0]["parts"]
    assert parts["main"]["seconds"] == 2.0 and parts["control"]["seconds"] is None  # on record, no time
    monkeypatch.setattr(driver.pipeline, "_run", lambda cmd: 2.0)  # resumed: every part ends
    assert driver.main(["--reduced", "--outputs", str(outputs), "--out", str(out)]) == 0
    provenance = json.loads((out / "provenance.json").read_text())
    assert provenance["parts_stopped"] == 1 and provenance["wall_clock_s"] == pytest.approx(2.0 * 4, abs=0.5)
    from camex.report.__main__ import _provenance_lines

    line = [x for x in _provenance_lines(out / "provenance.json") if x.startswith("Wall-clock")][0]
    assert line.endswith("(2 invocations; 1 part stopped before the end, not counted)")


@pytest.mark.parametrize("folder", ["prereg_cpu", "prereg_cpu/rerun", "prereg_cpu/rerun2"])
def test_the_committed_analysis_is_what_the_committed_store_gives(tmp_path, folder):
    """reports/<folder>/prereg.md is regenerated from reports/<folder>/mlflow.db, unchanged, and
    every CA run in the committed store logged the curvature diagnostic at every evaluation (the
    experiment, and its full rerun at a later commit, docs/prereg_cpu.md)."""
    committed = ROOT / "reports" / folder
    store = f"sqlite:///{committed / 'mlflow.db'}"
    path = prereg.write(store, tmp_path)
    assert path.read_text() == (committed / "prereg.md").read_text()
    from camex.report.collect import client, collect_runs, metric_history

    runs = collect_runs(store, [prereg.MAIN, prereg.CONTROL, prereg.FINETUNE])
    assert sorted(r.experiment for r in runs).count(prereg.MAIN) == 24 and len(runs) == 40
    mlflow_client = client(store)
    for run in (r for r in runs if r.merge.startswith("camex")):
        evals = [step for step, _ in metric_history(mlflow_client, run.run_id, "eval_loss")]
        moved = [step for step, _ in metric_history(mlflow_client, run.run_id, prereg.MOVED)]
        assert set(evals) <= set(moved) and len(evals) >= 4, run.run_id
