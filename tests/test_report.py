"""The report generator against real tiny runs made by `run.py`.

Six runs (STS-B with tiny BERT: Domain-specific and Domain-specific-CA over two seeds, one more
CA run at α = 0.5 in a second experiment, one offline topic-classification run) go into one MLflow store;
`python -m camex.report` builds the report from it. Every number in the tables is checked
against the MLflow metrics aggregated here, independently, with MlflowClient and scipy.
"""

from __future__ import annotations

import csv
import math
import os
import re
import shutil
import statistics
import subprocess
import sys
from collections import defaultdict
from pathlib import Path

import numpy as np
import pytest
from scipy import stats

ROOT = Path(__file__).resolve().parents[1]
FIX = ROOT / "tests" / "fixtures"
ENV_KEYS = {"HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
STSB = ["task=glue/stsb", "model=tiny_bert", "task.max_length=64",
        f"task.local.train={FIX / 'reg_train.jsonl'}", f"task.local.eval={FIX / 'reg_dev.json'}"]  # fmt: skip
TOPIC = ["task=offline/topic", "model=tiny_bert", "task.max_length=32", "task.max_train_samples=16",
         "task.max_eval_samples=8"]  # BBC News shipped in a package: an offline task outside the paper's tables
MAIN, ABLATION = "report_main", "report_ablation"
# Rounds of runs started together; the first run alone creates the SQLite store.
ROUNDS = [
    [(MAIN, "domain", 1, STSB)],
    [(MAIN, "domain", 2, STSB), (MAIN, "camex", 1, STSB), (MAIN, "camex", 1, TOPIC)],
    [(MAIN, "camex", 2, STSB), (ABLATION, "camex", 1, [*STSB, "merge.alpha=0.5"])],
]
GLUE_SCALE = 100.0  # reports/paper_reference.yaml: GLUE values are published ×100
PUBLISHED_CA_STSB = 89.47  # SPEC §10: Domain-specific-CA, STS-B Spearman


def _env() -> dict:
    return {**os.environ, **ENV_KEYS}


@pytest.fixture(scope="module")
def store(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("report_store")
    for round_ in ROUNDS:
        procs = []
        for experiment, merge, seed, args in round_:
            cmd = [sys.executable, "run.py", f"paths.output_root={out}", "trainer=tiny", f"merge={merge}",
                   f"seed={seed}", f"experiment_name={experiment}", *args]  # fmt: skip
            procs.append(subprocess.Popen(cmd, cwd=ROOT, env=_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE))
        for proc in procs:
            _, err = proc.communicate(timeout=300)
            assert proc.returncode == 0, err.decode()[-3000:]
    return out


def _report(store: Path, out: Path, *extra: str) -> subprocess.CompletedProcess:
    """Build a report in a fresh interpreter and prove that it never imported torch."""
    code = ("import runpy, sys; sys.argv = ['camex.report', *sys.argv[1:]]\n"
            "try:\n    runpy.run_module('camex.report', run_name='__main__')\n"
            "except SystemExit as exc:\n    code = exc.code\nelse:\n    code = 0\n"
            "assert 'torch' not in sys.modules, 'the report imported torch'\nsys.exit(code)")  # fmt: skip
    cmd = [sys.executable, "-c", code, "--tracking-uri", f"sqlite:///{store / 'mlflow.db'}", "--out", str(out), *extra]
    return subprocess.run(cmd, cwd=ROOT, env=_env(), capture_output=True, text=True, timeout=300)


@pytest.fixture(scope="module")
def report(store, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("report_main")
    proc = _report(store, out, "--experiment", MAIN)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return out


@pytest.fixture(scope="module")
def report_all(store, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("report_all")
    proc = _report(store, out)  # every experiment: the α = 0.5 run joins the CA cell and the ablation
    assert proc.returncode == 0, proc.stderr[-3000:]
    return out


# ------------------------------------------------------------------ independent aggregation


def _mlflow_runs(store: Path, experiments: list[str]):
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=f"sqlite:///{store / 'mlflow.db'}")
    ids = [client.get_experiment_by_name(e).experiment_id for e in experiments]
    return client, [r for r in client.search_runs(ids) if r.info.status == "FINISHED"]


def _groups(runs) -> dict[tuple[str, str, str], list]:
    groups = defaultdict(list)
    for r in runs:
        groups[(r.data.tags["task"], r.data.tags["model"], r.data.tags["merge"])].append(r)
    return groups


def _summary(values: list[float]) -> dict:
    return {"mean": sum(values) / len(values), "std": statistics.stdev(values) if len(values) > 1 else None,
            "n": len(values), "values": values}  # fmt: skip


def _read_csv(path: Path) -> list[dict]:
    with path.open() as fh:
        return list(csv.DictReader(fh))


def _num(text: str) -> float | None:
    return float(text) if text not in ("", None) else None


def _body_numbers(md: str) -> list[str]:
    """Every number in the table body cells (not the row labels, not `n=` counts)."""
    rows = [line for line in md.splitlines() if line.startswith("| ") and not line.startswith("| row |")]
    found = []
    for line in rows:
        for cell in line.strip("|").split("|")[1:]:
            found += re.findall(r"[-+]?\d+(?:\.\d+)?", re.sub(r"\(n=\d+\)", "", cell))
    return found


def _fmt_all(value: float, decimals=(0, 1, 2, 4)) -> set[str]:
    out = {f"{value:.{d}f}" for d in decimals} | {f"{value:+.{d}f}" for d in decimals}
    return out | {s.lstrip("+") for s in out}


# --------------------------------------------------------------------------------- tests


def test_glue_table_matches_mlflow(store, report):
    _, runs = _mlflow_runs(store, [MAIN])
    groups = _groups(runs)
    rows = {(r["merge"], r["column"]): r for r in _read_csv(report / "tables" / "glue__tiny_bert.csv")}
    assert len(rows) == 9 * 9  # nine rows of SPEC §8 x (eight tasks + average)
    expected: dict[str, dict] = {}
    for merge in ("domain", "camex"):
        values = [r.data.metrics["final_spearman"] * GLUE_SCALE for r in groups[("glue/stsb", "tiny_bert", merge)]]
        expected[merge] = _summary(values)
        row = rows[(merge, "STS-B")]
        assert float(row["mean"]) == pytest.approx(expected[merge]["mean"], rel=1e-12, abs=1e-12)
        assert float(row["std"]) == pytest.approx(expected[merge]["std"], rel=1e-12, abs=1e-12)
        assert int(row["n"]) == 2 and sorted(row["seeds"].split()) == ["1", "2"]
        assert row["metric"] == "final_spearman"  # STS-B's primary metric, read from the runs' params
    ca, twin = rows[("camex", "STS-B")], rows[("domain", "STS-B")]
    assert float(ca["paper"]) == PUBLISHED_CA_STSB and twin["paper"] == ""
    assert float(ca["difference"]) == pytest.approx(expected["camex"]["mean"] - PUBLISHED_CA_STSB, abs=1e-12)
    # the same seeds on both sides: a paired t-test over seeds (the only twin test of the table: Holm = raw p)
    by_seed = {m: {r.data.tags["seed"]: r.data.metrics["final_spearman"] * GLUE_SCALE
                   for r in groups[("glue/stsb", "tiny_bert", m)]} for m in ("domain", "camex")}  # fmt: skip
    pairs = [(by_seed["camex"][s], by_seed["domain"][s]) for s in ("1", "2")]
    assert ca["twin"] == "domain"
    assert float(ca["twin_difference"]) == pytest.approx(expected["camex"]["mean"] - expected["domain"]["mean"])
    if all(a == b for a, b in pairs):
        assert ca["test"] == "identical" and ca["mark"] == "identical"
    else:
        paired = stats.ttest_rel([a for a, _ in pairs], [b for _, b in pairs])
        assert ca["test"] == "paired"
        if math.isfinite(paired.pvalue):
            assert float(ca["p_value"]) == pytest.approx(float(paired.pvalue), rel=1e-9)
            assert float(ca["p_holm"]) == pytest.approx(float(paired.pvalue), rel=1e-9)
            mark = "**" if paired.pvalue < 0.01 else "*" if paired.pvalue < 0.05 else "ns"
            assert ca["mark"] == mark + "ᵖ"
    filled = {k for k, r in rows.items() if r["mean"] != ""}
    assert filled == {("domain", "STS-B"), ("camex", "STS-B")}  # no number from anywhere else

    md = (report / "tables" / "glue__tiny_bert.md").read_text()
    # rows without any run are left out of the rendered table: 2 rows x (7 task cells + average) missing
    assert "70 of 72 cells missing" in md and md.count("missing ·") == 2 * 7 + 2
    assert "Rows without runs (not shown): Dense, SMoE, Ties, Ties-CA, Dare, Dare-CA, EP-CAMEx." in md
    line = next(x for x in md.splitlines() if x.startswith("| Domain-specific-CA |"))
    stsb_cell = line.strip("|").split("|")[4].strip()
    e = expected["camex"]
    assert stsb_cell.startswith(f"{e['mean']:.2f} ± {e['std']:.2f} (n=2)")
    low, high = stats.t.interval(0.95, 1, loc=e["mean"], scale=e["std"] / math.sqrt(2))
    word = "reproduced" if low <= PUBLISHED_CA_STSB <= high else "above" if low > PUBLISHED_CA_STSB else "below"
    assert f"paper {PUBLISHED_CA_STSB:.2f} (Δ {e['mean'] - PUBLISHED_CA_STSB:+.2f}) {word}" in stsb_cell
    allowed = set()
    for s in expected.values():
        allowed |= _fmt_all(s["mean"]) | _fmt_all(s["std"])
    allowed |= _fmt_all(e["mean"] - PUBLISHED_CA_STSB)
    for values in ({"sst2": 94.61, "mrpc": 92.49, "cola": 60.06, "stsb": 89.54, "rte": 75.81, "mnli": 86.45},
                   {"mrpc": 91.16, "stsb": 89.47, "rte": 74.72}, {"mrpc": 91.15, "stsb": 89.56, "rte": 78.70}):
        allowed |= {f"{v:.2f}" for v in values.values()}  # the reference file, SPEC §10  # fmt: skip
    assert set(_body_numbers(md)) <= allowed
    tex = (report / "tables" / "glue__tiny_bert.tex").read_text()
    assert r"\begin{tabular}" in tex and f"{e['mean']:.2f} $\\pm$ {e['std']:.2f}" in tex


def test_other_and_efficiency_tables_match_mlflow(store, report):
    _, runs = _mlflow_runs(store, [MAIN])
    groups = _groups(runs)
    other = {(r["merge"], r["column"]): r for r in _read_csv(report / "tables" / "other__tiny_bert.csv")}
    topic = groups[("offline/topic", "tiny_bert", "camex")]
    assert float(other[("camex", "offline/topic")]["mean"]) == topic[0].data.metrics["final_accuracy"]
    assert {k for k, r in other.items() if r["mean"] != ""} == {("camex", "offline/topic")}

    table = _read_csv(report / "tables" / "efficiency__tiny_bert_on_glue_stsb.csv")
    cells = {(r["merge"], r["metric"]): r for r in table}
    for merge in ("domain", "camex"):
        group = groups[("glue/stsb", "tiny_bert", merge)]
        for key in ("final_params_total", "final_params_curvature", "final_params_router", "peak_rss_mb",
                    "final_flops_per_token"):
            want = _summary([r.data.metrics[key] for r in group])
            assert float(cells[(merge, key)]["mean"]) == pytest.approx(want["mean"], rel=1e-12)
            assert int(cells[(merge, key)]["n"]) == 2
        step = _summary([1.0 / r.data.metrics["train_steps_per_second"] for r in group])
        assert float(cells[(merge, "train_steps_per_second")]["mean"]) == pytest.approx(step["mean"], rel=1e-12)
    assert float(cells[("camex", "final_params_curvature")]["mean"]) > 0
    assert float(cells[("domain", "final_params_curvature")]["mean"]) == 0
    # the curvature transform is extra matmul work per pass: CAMEx costs more FLOPs per token than Euclidean merging
    flops = {m: float(cells[(m, "final_flops_per_token")]["mean"]) for m in ("domain", "camex")}
    assert 0 < flops["domain"] < flops["camex"]
    for name in ("lm__no_runs", "qa__no_runs", "vision__no_runs"):
        assert all(r["mean"] == "" for r in _read_csv(report / "tables" / f"{name}.csv"))


def test_curvature_diagnostic_logged_at_every_evaluation(store, report):
    from camex.moe.diagnostics import KEYS

    client, runs = _mlflow_runs(store, [MAIN])
    groups = _groups(runs)
    for r in groups[("glue/stsb", "tiny_bert", "domain")]:  # no curvature: nothing logged
        assert not [k for k in r.data.metrics if k.startswith("curvature_")]
    last = defaultdict(list)
    for r in groups[("glue/stsb", "tiny_bert", "camex")]:
        eval_steps = [m.step for m in client.get_metric_history(r.info.run_id, "eval_spearman")]
        for key in KEYS:
            history = client.get_metric_history(r.info.run_id, key)
            assert sorted({m.step for m in history}) == sorted(set(eval_steps))  # at every evaluation
            assert all(math.isfinite(m.value) and m.value >= 0 for m in history)
            last[key].append(r.data.metrics[key])
        assert r.data.metrics["curvature_operator_change_max"] > 0  # trained: the operators moved
    row = next(r for r in _read_csv(report / "tables" / "glue__tiny_bert.csv")
               if r["merge"] == "camex" and r["column"] == "STS-B")  # fmt: skip
    for key in KEYS:
        assert float(row[key]) == pytest.approx(statistics.fmean(last[key]), rel=1e-12)
    md = (report / "tables" / "glue__tiny_bert__twin_tests.md").read_text()
    assert "not logged" not in md and "(n=2)" in md


def _png_spread(path: Path) -> float:
    import matplotlib.image as mpimg

    return float(np.asarray(mpimg.imread(path))[..., :3].std())


def test_figures_are_drawn_from_tracked_values(store, report, report_all):
    client, runs = _mlflow_runs(store, [MAIN])
    fig = report / "figures" / "convergence__glue_stsb__tiny_bert"
    assert _png_spread(fig.with_suffix(".png")) > 0.02 and "<path" in fig.with_suffix(".svg").read_text()
    curves = _read_csv(fig.with_suffix(".csv"))
    groups = _groups(runs)
    by_seed: dict[str, dict[str, dict[int, float]]] = {}
    for merge in ("domain", "camex"):
        per_step = defaultdict(list)
        for r in groups[("glue/stsb", "tiny_bert", merge)]:
            first: dict[int, tuple[int, float]] = {}
            for m in client.get_metric_history(r.info.run_id, "eval_spearman"):
                if m.step not in first or m.timestamp < first[m.step][0]:
                    first[m.step] = (m.timestamp, m.value)
            for step, (_, value) in first.items():
                per_step[step].append(value)
            by_seed.setdefault(merge, {})[r.data.tags["seed"]] = {step: v for step, (_, v) in first.items()}
        mine = [c for c in curves if c["merge"] == merge and c["panel"] == "eval_spearman"]
        got = {int(c["step"]): float(c["mean"]) for c in mine}
        assert got.keys() == per_step.keys() and len(got) == 2  # one evaluation per epoch
        for step, values in per_step.items():
            assert got[step] == pytest.approx(sum(values) / len(values), rel=1e-12)

    # the paired-difference panel: per step, the mean over seeds of CA − twin on the same seed
    diff = {int(c["step"]): c for c in curves if c["panel"] == "eval_spearman paired difference"}
    for step, row in diff.items():
        d = [by_seed["camex"][seed][step] - by_seed["domain"][seed][step] for seed in ("1", "2")]
        assert float(row["mean"]) == pytest.approx(sum(d) / 2, rel=1e-12, abs=1e-12) and row["n"] == "2"
    assert len(diff) == 2

    assert not list((report / "figures").glob("ablation_*"))  # one α value in the main experiment: no ablation
    abl = report_all / "figures" / "ablation_alpha__tiny_bert"
    assert _png_spread(abl.with_suffix(".png")) > 0.02 and abl.with_suffix(".svg").exists()
    _, every = _mlflow_runs(store, [MAIN, ABLATION])
    by_alpha = defaultdict(list)
    for r in _groups(every)[("glue/stsb", "tiny_bert", "camex")]:
        by_alpha[float(r.data.params["merge.alpha"])].append(r.data.metrics["final_spearman"] * GLUE_SCALE)
    points = {float(r["merge.alpha"]): r for r in _read_csv(abl.with_suffix(".csv")) if r["mean"]}
    assert points.keys() == {0.5, 1.0}
    for alpha, values in by_alpha.items():
        assert float(points[alpha]["mean"]) == pytest.approx(sum(values) / len(values), rel=1e-12)
        assert int(points[alpha]["n"]) == len(values)
    paper = [r for r in _read_csv(abl.with_suffix(".csv")) if r["paper"]]
    assert [(r["merge"], float(r["paper"])) for r in paper] == [("camex", PUBLISHED_CA_STSB)]
    md = (report_all / "tables" / "glue__tiny_bert.md").read_text()
    assert "‡" in md and "merge.alpha ∈ {0.5, 1.0}" in md  # the α = 0.5 run is flagged in the cell it joins


def _chromium() -> str | None:
    return shutil.which("chromium") or shutil.which("chromium-browser") or shutil.which("google-chrome")


def _render(html: Path, shot: Path, workdir: Path) -> str:
    """Headless Chromium screenshot of a page; returns its log (console messages are logged there)."""
    cmd = [_chromium(), "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
           "--disable-background-networking", "--disable-component-update", "--disable-sync",
           f"--user-data-dir={workdir}", "--enable-logging=stderr", "--v=0", "--window-size=1400,2000",
           f"--screenshot={shot}", html.resolve().as_uri()]  # fmt: skip
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
    return proc.stdout + proc.stderr


def _console(log: str) -> list[str]:
    return [line for line in log.splitlines() if ":CONSOLE" in line]


@pytest.mark.skipif(_chromium() is None, reason="chromium is not installed (.ci/run installs it with apt-get)")
def test_html_page_renders_in_chromium_without_console_errors(report, tmp_path):
    page = report / "report.html"
    text = page.read_text()
    assert not re.search(r"""(src|href)=["'](?!data:)""", text)  # self-contained: nothing to fetch
    assert text.count("data:image/png;base64,") == 1 and "<script" not in text

    bad = tmp_path / "bad.html"  # the check itself must see a console error when there is one
    bad.write_text('<!DOCTYPE html><html><body><script>console.error("report-test-error")</script></body></html>')
    assert any("report-test-error" in x for x in _console(_render(bad, tmp_path / "bad.png", tmp_path / "u1")))

    shot = report / "report_screenshot.png"  # kept beside the report as the test artifact
    log = _render(page, shot, tmp_path / "u2")
    assert _console(log) == []
    assert shot.stat().st_size > 10_000 and _png_spread(shot) > 0.02
    keep = os.environ.get("CAMEX_TEST_ARTIFACTS")  # a folder that outlives pytest's tmp retention
    if keep:
        shutil.copytree(report, Path(keep) / "report", dirs_exist_ok=True)
    print(f"screenshot: {shot}")


@pytest.mark.parametrize(
    "args,needle",
    [(["--experiment", "nope"], "--experiment 'nope' not found"), (["--tag", "merge"], "--tag 'merge'"),
     (["--tag", "merge=unknown"], "no finished camex runs")],
)  # fmt: skip
def test_bad_selection_fails_with_one_line(store, tmp_path, args, needle):
    proc = _report(store, tmp_path / "out", *args)
    assert proc.returncode == 2
    err = proc.stderr.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: ") and needle in err[0]
    assert not (tmp_path / "out").exists()


def test_missing_store_is_refused_not_created(tmp_path):
    cmd = [sys.executable, "-m", "camex.report", "--tracking-uri", str(tmp_path / "none.db"), "--out", str(tmp_path)]
    proc = subprocess.run(cmd, cwd=ROOT, env=_env(), capture_output=True, text=True)
    assert proc.returncode == 2 and "no such SQLite file" in proc.stderr
    assert not (tmp_path / "none.db").exists()


def test_reference_file_holds_exactly_the_values_of_spec_section_10():
    from camex.report.reference import load_reference

    glue = load_reference().table("glue")
    spec_10 = {  # SPEC §10: GLUE dev, T5-base, ×100
        "camex_ties": {"glue/sst2": 94.61, "glue/mrpc": 92.49, "glue/cola": 60.06, "glue/stsb": 89.54,
                       "glue/rte": 75.81, "glue/mnli": 86.45},
        "camex": {"glue/mrpc": 91.16, "glue/stsb": 89.47, "glue/rte": 74.72},
        "camex_dare": {"glue/mrpc": 91.15, "glue/stsb": 89.56, "glue/rte": 78.70},
    }  # fmt: skip
    assert glue.values == spec_10 and glue.scale == GLUE_SCALE and glue.model == "T5-base"
    assert {glue.metrics[t] for t in ("glue/mrpc", "glue/stsb", "glue/rte")} == {"f1", "spearman", "accuracy"}
    assert "reviews" in glue.provenance and "plotting script" in glue.provenance


def test_malformed_reference_is_refused_with_the_key(store, tmp_path):
    bad = tmp_path / "ref.yaml"
    bad.write_text(
        "tables:\n  glue:\n    scale: 100\n    metrics: {glue/rte: accuracy}\n"
        "    description: d\n    model: m\n    provenance: p\n    values: {camex: {glue/rte: high}}\n"
    )
    proc = _report(store, tmp_path / "out", "--reference", str(bad))
    assert proc.returncode == 2 and "values.camex.glue/rte must be a number" in proc.stderr
