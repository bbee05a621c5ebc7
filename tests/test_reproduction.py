"""The CPU-scale reproduction's pipeline (scripts/reproduce_cpu_mini.py) on its reduced version.

The same three presets (text, LM, vision) run through the sweeper into one MLflow store, and the
report is built from it, with a few examples per run. Checked: the report holds what the runs
logged and records how it was made; a second invocation resumes (runs nothing again) and its
report agrees with the first; `compare_reports` tells seed noise from a real difference; and the
committed full report's numbers are the ones in its runs.csv.
"""

from __future__ import annotations

import csv
import importlib.util
import json
import os
import re
import shutil
import statistics
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "scripts" / "reproduce_cpu_mini.py"
COMMITTED = ROOT / "reports" / "cpu_mini"
ENV = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
PARTS = {"offline/topic": "tiny_bert", "offline/wiki_lm": "small_gpt2", "offline/digits": "small_vit"}


def _driver():
    spec = importlib.util.spec_from_file_location("reproduce_cpu_mini", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _reproduce(outputs: Path, out: Path, *extra: str) -> subprocess.CompletedProcess:
    cmd = [sys.executable, str(SCRIPT), "--reduced", "--outputs", str(outputs), "--out", str(out), *extra]
    return subprocess.run(cmd, cwd=ROOT, env=ENV, capture_output=True, text=True, timeout=900)


def _rows(path: Path) -> list[dict]:
    with path.open() as fh:
        return list(csv.DictReader(fh))


@pytest.fixture(scope="module")
def reduced(tmp_path_factory) -> tuple[Path, Path]:
    root = tmp_path_factory.mktemp("reproduction")
    proc = _reproduce(root / "outputs", root / "report")
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    return root / "outputs", root / "report"


def test_reduced_reproduction_reports_every_tracked_run(reduced):
    from mlflow.tracking import MlflowClient

    outputs, report = reduced
    rows = _rows(report / "runs.csv")
    # 3 sweeps: text (one set) + LM + vision, each Domain-specific vs Domain-specific-CA over 2 seeds
    assert sorted((r["task"], r["model"], r["merge"], r["seed"]) for r in rows) == sorted(
        (task, model, merge, seed) for task, model in PARTS.items() for merge in ("domain", "camex") for seed in "01"
    )
    client = MlflowClient(tracking_uri=f"sqlite:///{outputs / 'mlflow.db'}")
    for row in rows:  # every reported run is a finished run of the store, with the same final metric
        run = client.get_run(row["run_id"])
        assert run.info.status == "FINISHED" and run.data.tags["experiment"] == "cpu_mini"
        key = next(k for k in ("final_accuracy", "final_top1", "final_perplexity") if row.get(k))
        assert float(row[key]) == run.data.metrics[key]
    # a table cell is the mean over the seeds of those runs
    cells = {(r["merge"], r["column"]): r for r in _rows(report / "tables" / "other__small_vit.csv")}
    top1 = [float(r["final_top1"]) for r in rows if r["task"] == "offline/digits" and r["merge"] == "camex"]
    assert float(cells[("camex", "offline/digits")]["mean"]) == pytest.approx(statistics.mean(top1), rel=1e-12)
    for task, model in PARTS.items():  # the convergence figure of every part: CA against its Euclidean twin
        stem = f"convergence__{task}__{model}".replace("/", "_")
        assert (report / "figures" / f"{stem}.png").stat().st_size > 0
        assert {r["merge"] for r in _rows(report / "figures" / f"{stem}.csv")} == {"domain", "camex"}
    run_dirs = list((outputs / "sweeps").glob("*/trial*"))
    assert len(run_dirs) == len(rows) and all((d / "final_model").is_dir() for d in run_dirs)
    assert not [d for d in run_dirs if (d / "checkpoints").exists()]  # trainer.keep_checkpoints=false
    assert {client.get_run(r["run_id"]).data.params["trainer.threads"] for r in rows} == {"1"}
    lm_loss = [r for r in _rows(report / "figures" / "convergence__offline_wiki_lm__small_gpt2.csv")
               if r["panel"] == "train_loss"]  # fmt: skip
    assert {r["step"] for r in lm_loss} == {"1", "2"}  # the loss curve: logged every step in the reduced run


def test_report_records_command_versions_and_wall_clock(reduced):
    outputs, report = reduced
    provenance = json.loads((report / "provenance.json").read_text())
    assert provenance["command"].startswith("python scripts/reproduce_cpu_mini.py --reduced")
    assert provenance["packages"]["torch"] and provenance["packages"]["transformers"]
    timings = json.loads((outputs / "timings.json").read_text())
    spent = sum(p["seconds"] for inv in timings for p in inv["parts"].values())
    assert provenance["wall_clock_s"] == pytest.approx(spent, abs=0.1) and spent > 0
    assert [p["command"].split()[3] for p in timings[0]["parts"].values()] == [
        "experiment=cpu_mini_text", "experiment=cpu_mini_lm", "experiment=cpu_mini_vision"]  # fmt: skip
    md = (report / "report.md").read_text()
    assert f"Produced by: `{provenance['command']}`" in md
    assert f"Wall-clock of the runs: {provenance['wall_clock_s'] / 60:.1f} min" in md
    assert f"torch {provenance['packages']['torch']}" in md and "Git commit: " in md
    assert "Produced by:" in (report / "report.html").read_text()


def test_rerun_resumes_and_agrees_with_the_first_report(reduced, tmp_path):
    outputs, first = reduced
    before = {p: p.stat().st_mtime for p in outputs.rglob("metrics.json")}
    proc = _reproduce(outputs, tmp_path / "again", "--compare", str(first))
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    assert "agrees within seed noise" in proc.stdout
    assert {p: p.stat().st_mtime for p in outputs.rglob("metrics.json")} == before  # nothing trained again
    assert len(json.loads((outputs / "timings.json").read_text())) == 2


def test_compare_tells_noise_from_a_real_difference(tmp_path):
    driver = _driver()
    header = "run_id,experiment,task,model,merge,seed,final_accuracy\n"

    def write(name: str, values: dict[str, list[float]]) -> Path:
        folder = tmp_path / name
        folder.mkdir()
        lines = [f"r{m}{i},x,t,m,{m},{i},{v!r}" for m, vs in values.items() for i, v in enumerate(vs)]
        (folder / "runs.csv").write_text(header + "\n".join(lines) + "\n")
        return folder

    old = write("old", {"camex": [0.60, 0.62, 0.64], "domain": [0.5, 0.5, 0.5]})
    assert driver.compare_reports(write("noise", {"camex": [0.61, 0.63, 0.66], "domain": [0.5, 0.5, 0.5]}), old) == []
    shifted = driver.compare_reports(write("shift", {"camex": [0.80, 0.82, 0.84], "domain": [0.5, 0.5, 0.5]}), old)
    assert len(shifted) == 1 and "'camex'" in shifted[0]
    exact = driver.compare_reports(write("exact", {"camex": [0.60, 0.62, 0.64], "domain": [0.51, 0.51, 0.51]}), old)
    assert len(exact) == 1 and "'domain'" in exact[0]  # no spread on either side: must match exactly
    assert "only in" in driver.compare_reports(write("fewer", {"camex": [0.6, 0.62, 0.64]}), old)[0]


def test_committed_report_numbers_come_from_its_runs():
    if not (COMMITTED / "runs.csv").exists():
        pytest.skip("no committed CPU-scale report")
    rows = _rows(COMMITTED / "runs.csv")
    assert len({r["run_id"] for r in rows}) == len(rows) == 2 * 9 * 3 + 4 * 3 + 2 * 3
    provenance = json.loads((COMMITTED / "provenance.json").read_text())
    assert provenance["command"] == "python scripts/reproduce_cpu_mini.py"
    for table, key in (("other__minilm", "final_accuracy"), ("other__small_gpt2", "final_perplexity"),
                       ("other__small_vit", "final_top1")):  # fmt: skip
        for cell in _rows(COMMITTED / "tables" / f"{table}.csv"):
            values = [float(r[key]) for r in rows if r["task"] == cell["column"] and r["merge"] == cell["merge"]]
            if cell["mean"] == "":
                assert not values
                continue
            assert float(cell["mean"]) == pytest.approx(statistics.mean(values), rel=1e-12)
            assert float(cell["std"]) == pytest.approx(statistics.stdev(values), rel=1e-9)
    page = (ROOT / "docs" / "cpu_mini.md").read_text()
    for image in re.findall(r"\]\(\.\./(reports/cpu_mini/[^)]+\.png)\)", page):
        assert (ROOT / image).is_file(), image
    generated = "\n".join((COMMITTED / "tables" / f"{t}.md").read_text() for t in ("other__minilm", "other__small_gpt2",
                                                                                 "other__small_vit"))  # fmt: skip
    section = page[page.index("**Headline table**"):page.index("**Findings.**")]
    rows = [line for line in section.splitlines() if line.startswith("| ") and not line.startswith("| row")]
    assert len(rows) == 9 + 4 + 2 and all(line in generated for line in rows)  # the docs show the report's cells


def test_committed_tables_rebuild_from_the_committed_mlflow_store(tmp_path):
    if not (COMMITTED / "mlflow.db").exists():
        pytest.skip("no committed CPU-scale report")
    store = tmp_path / "mlflow.db"
    shutil.copy(COMMITTED / "mlflow.db", store)  # MLflow may touch the file it opens: never the committed one
    cmd = [sys.executable, "-m", "camex.report", "--tracking-uri", f"sqlite:///{store}", "--experiment", "cpu_mini",
           "--out", str(tmp_path / "report")]  # fmt: skip
    proc = subprocess.run(cmd, cwd=ROOT, env=ENV, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    committed = sorted(p.relative_to(COMMITTED) for p in (COMMITTED / "tables").iterdir())
    assert committed == sorted(p.relative_to(tmp_path / "report") for p in (tmp_path / "report" / "tables").iterdir())
    for name in [*committed, Path("runs.csv")]:
        assert (tmp_path / "report" / name).read_text() == (COMMITTED / name).read_text(), name


def test_bad_compare_folder_is_refused_before_any_run(tmp_path):
    proc = subprocess.run([sys.executable, str(SCRIPT), "--compare", str(tmp_path), "--outputs", str(tmp_path / "o")],
                          cwd=ROOT, env=ENV, capture_output=True, text=True, timeout=60)  # fmt: skip
    assert proc.returncode != 0 and "no runs.csv" in proc.stderr
    assert not (tmp_path / "o").exists()
