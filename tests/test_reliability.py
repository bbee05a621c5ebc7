"""Faults and trust: nothing finished is lost, nothing is trusted that should not be.

Subprocess runs of `run.py` (tiny BERT, fixture files) with faults injected through the
environment (`camex/faults.py`): signals, a SIGKILL in the middle of a checkpoint save, a NaN
loss, an unreachable tracking server, malformed data. The "Reliability" table in docs/reliability.md points here.
"""

from __future__ import annotations

import ast
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
from safetensors.torch import load_file
from test_run import ENV, FIX, ROOT, _image_folders, _local, _mlflow_runs, run_cli

from camex import checkpoints, faults, models, tracking
from camex.config import ConfigError
from camex.redact import REDACTED, redact_secrets, secret_values

ARGS = ["task=glue/mrpc", "model=tiny_bert", "task.max_length=64", *_local("cls_train.jsonl", "cls_dev.csv")]
SECRETS = {"HF_TOKEN": "hf_TESTSECRET_1234567", "MLFLOW_TRACKING_PASSWORD": "pw-TESTSECRET-89",
           "MY_API_KEY": "k3y-TESTSECRET"}  # fmt: skip


@pytest.fixture(scope="module")
def empty_store(tmp_path_factory) -> Path:
    """An MLflow SQLite store with its tables created once: each run copies it instead of paying
    for MLflow's schema migrations (seconds per run)."""
    from mlflow.tracking import MlflowClient

    db = tmp_path_factory.mktemp("store") / "mlflow.db"
    MlflowClient(tracking_uri=f"sqlite:///{db}").search_experiments()
    return db


def _out(tmp_path: Path, store: Path) -> Path:
    out = tmp_path / "out"
    out.mkdir()
    shutil.copy(store, out / "mlflow.db")
    return out


def _error_line(proc) -> str:
    """The run's last stderr line, which must be its one-line error; no traceback anywhere."""
    assert "Traceback" not in proc.stderr, proc.stderr[-3000:]
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert lines and lines[-1].startswith("error: "), proc.stderr[-3000:]
    return lines[-1]


def _run_dir(out: Path) -> Path:
    return out / "runs" / "default" / "glue" / "mrpc" / "tiny_bert" / "camex_ties" / "seed42"


def _steps(ckpt_dir: Path) -> list[int]:
    return sorted(int(p.name.split("-")[1]) for p in ckpt_dir.glob("checkpoint-*"))


# --- 1, 2: signals and a SIGKILL mid-save -------------------------------------------------------


def test_signals_and_a_kill_mid_save_lose_nothing(tmp_path, empty_store):
    """Ctrl-C at step 2, SIGTERM at step 4, SIGKILL while checkpoint-6 is half written; then
    `resume=true` finishes the same MLflow run. (2 epochs of 3 steps.)"""
    from transformers.trainer_utils import get_last_checkpoint

    out = _out(tmp_path, empty_store)
    ckpt = _run_dir(out) / "checkpoints"

    proc = run_cli(out, *ARGS, env={**ENV, faults.SIGNAL_AT_STEP: "2:INT"})
    assert proc.returncode == 130, proc.stderr[-3000:]
    line = _error_line(proc)
    assert "interrupted by SIGINT at step 2" in line and "checkpoint-2" in line and "resume=true" in line
    assert _steps(ckpt) == [2]
    _, runs = _mlflow_runs(out)
    assert [r.info.status for r in runs] == ["KILLED"]
    run_id = runs[0].info.run_id

    proc = run_cli(out, *ARGS, "resume=true", env={**ENV, faults.SIGNAL_AT_STEP: "4:TERM"})
    assert proc.returncode == 143, proc.stderr[-3000:]
    assert "interrupted by SIGTERM at step 4" in _error_line(proc)
    assert 4 in _steps(ckpt)
    _, runs = _mlflow_runs(out)
    assert [(r.info.run_id, r.info.status) for r in runs] == [(run_id, "KILLED")]

    proc = run_cli(out, *ARGS, "resume=true", env={**ENV, faults.KILL_IN_SAVE: "6"})
    assert proc.returncode == -signal.SIGKILL
    partial = ckpt / ".partial-checkpoint-6" / "checkpoint-6"
    assert (partial / "model.safetensors").exists() and not (partial / "optimizer.pt").exists()  # killed mid-save
    assert max(_steps(ckpt)) == 4 and get_last_checkpoint(str(ckpt)) == str(ckpt / "checkpoint-4")
    last = ckpt / "checkpoint-4"
    assert json.loads((last / "trainer_state.json").read_text())["global_step"] == 4
    assert load_file(last / "model.safetensors")  # the previous checkpoint is whole and loadable
    # weights are safetensors only; training_args.bin (a pickle the Trainer writes for people) is never loaded
    assert not list(ckpt.rglob("pytorch_model*")) and (last / "model.safetensors").exists()

    proc = run_cli(out, *ARGS, "resume=true")
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert not list(ckpt.glob(".partial-*"))  # the half-written save was cleared, never loaded
    assert _steps(ckpt)[-1] == 6
    payload = json.loads((_run_dir(out) / "metrics.json").read_text())
    assert payload["run_id"] == run_id
    client, runs = _mlflow_runs(out)
    assert [(r.info.run_id, r.info.status) for r in runs] == [(run_id, "FINISHED")]
    assert {m.step for m in client.get_metric_history(run_id, "train_loss")} == set(range(1, 7))


def test_signal_guard_defers_the_first_signal_and_obeys_the_second():
    with faults.SignalGuard() as guard:
        with guard.deferred():
            os.kill(os.getpid(), signal.SIGTERM)  # in the training loop: only noted
            assert guard.received == signal.SIGTERM
            with pytest.raises(faults.RunInterrupted) as err:
                os.kill(os.getpid(), signal.SIGINT)  # a second, impatient signal stops at once
        assert err.value.exit_code == 130
    with faults.SignalGuard():
        with pytest.raises(faults.RunInterrupted, match="interrupted by SIGTERM; continue with resume=true"):
            os.kill(os.getpid(), signal.SIGTERM)  # outside the loop: stops at once
    assert signal.getsignal(signal.SIGTERM) == signal.SIG_DFL  # handlers are given back


def test_publish_replaces_a_checkpoint_without_a_gap_and_partials_are_cleared(tmp_path):
    root = tmp_path / "checkpoints"
    for content in ("old", "new"):
        staged = root / ".partial-checkpoint-3" / "checkpoint-3"
        staged.mkdir(parents=True)
        (staged / "w.txt").write_text(content)
        checkpoints.publish(staged, root / "checkpoint-3")
    assert (root / "checkpoint-3" / "w.txt").read_text() == "new"
    assert [p.name for p in checkpoints.remove_partial(root)] == [".partial-checkpoint-3"]
    assert [p.name for p in root.iterdir()] == ["checkpoint-3"]
    checkpoints.atomic_write_text(root / "metrics.json", "{}")
    assert (root / "metrics.json").read_text() == "{}" and not list(root.glob(".partial-*"))


# --- 3, 4, 7: a NaN loss, logged to the fallback store, with secrets in the environment ---------


@pytest.fixture(scope="module")
def diverged(tmp_path_factory, empty_store):
    """One run: NaN weights before step 4, tracking server down with `tracking.fallback=sqlite`,
    secrets in the environment, one of them pulled into the config by an interpolation."""
    out = _out(tmp_path_factory.mktemp("diverged"), empty_store)
    env = {**ENV, **SECRETS, faults.NAN_AT_STEP: "4"}
    started = time.time()
    proc = run_cli(
        out, *ARGS, f"tracking.uri=http://127.0.0.1:{_closed_port()}", "tracking.fallback=sqlite",
        "+leaked=${oc.env:HF_TOKEN}", env=env,
    )  # fmt: skip
    return out, proc, time.time() - started


def test_nan_loss_stops_the_run_naming_the_step(diverged):
    out, proc, _ = diverged
    assert proc.returncode == 3, proc.stderr[-3000:]
    line = _error_line(proc)
    assert "training diverged" in line and "nan" in line and "step 4" in line
    _, runs = _mlflow_runs(out)
    assert [r.info.status for r in runs] == ["FAILED"]
    assert not (_run_dir(out) / "metrics.json").exists()
    assert _steps(_run_dir(out) / "checkpoints") == [3]  # the last good epoch is kept


def test_a_diverging_sweep_trial_is_failed_and_the_sweep_goes_on(tmp_path):
    """A real blow-up (learning rate 1e6, no injected fault) in one trial of a two-trial sweep."""
    import optuna

    out = tmp_path / "out"
    cmd = [sys.executable, "run.py", "-m", "hydra/sweeper=camex_optuna", f"paths.output_root={out}", "trainer=tiny",
           *ARGS, "trainer.learning_rate=1e6,1e-3", "tracking=none"]  # fmt: skip
    proc = subprocess.run(cmd, cwd=ROOT, env=ENV, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0 and "Traceback" not in proc.stderr, proc.stderr[-3000:]
    (study,) = optuna.get_all_study_summaries(f"sqlite:///{out / 'sweeps' / 'optuna.db'}")
    trials = optuna.load_study(study_name=study.study_name, storage=f"sqlite:///{out / 'sweeps' / 'optuna.db'}").trials
    states = {t.params["trainer.learning_rate"]: (t.state.name, t.user_attrs.get("fail_reason", "")) for t in trials}
    assert states[1e-3][0] == "COMPLETE"
    assert states[1e6][0] == "FAIL" and states[1e6][1].startswith("TrainingDiverged: training diverged")


def test_unreachable_server_falls_back_to_sqlite_when_asked(diverged):
    out, proc, _ = diverged
    warning = [line for line in proc.stderr.splitlines() if line.startswith("warning: tracking server")]
    assert len(warning) == 1 and "unreachable" in warning[0] and "tracking.fallback=sqlite" in warning[0]
    _, runs = _mlflow_runs(out)
    assert len(runs) == 1  # logged locally instead


def test_secrets_never_reach_logged_params(diverged):
    from mlflow.tracking import MlflowClient

    out, _, _ = diverged
    _, runs = _mlflow_runs(out)
    params = runs[0].data.params
    assert params["leaked"] == REDACTED
    assert params["model.tokenizer"].startswith("package:")  # a key merely *containing* "token" is kept
    client = MlflowClient(tracking_uri=f"sqlite:///{out / 'mlflow.db'}")
    logged = json.dumps(params) + Path(client.download_artifacts(runs[0].info.run_id, "config.json")).read_text()
    assert "TESTSECRET" not in logged


def test_redaction_by_key_and_by_environment_value():
    env = {**SECRETS, "TOKENIZERS_PARALLELISM": "false", "MY_KEY_ID": "123"}
    cfg = {"tracking": {"password": "p", "uri": "http://u:pw-TESTSECRET-89@host"}, "api_key": None,
           "model": {"tokenizer": "bert"}, "notes": ["x", "hf_TESTSECRET_1234567"], "seed": 1}  # fmt: skip
    assert redact_secrets(cfg, env) == {
        "tracking": {"password": REDACTED, "uri": REDACTED}, "api_key": None,
        "model": {"tokenizer": "bert"}, "notes": ["x", REDACTED], "seed": 1,
    }  # fmt: skip
    assert "false" not in secret_values(env)


# --- 4: an unreachable tracking server fails fast ----------------------------------------------


def _closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_unreachable_server_fails_fast_with_a_clear_error(tmp_path):
    started = time.time()
    proc = run_cli(tmp_path / "out", *ARGS, f"tracking.uri=http://127.0.0.1:{_closed_port()}", timeout=60)
    elapsed = time.time() - started
    assert proc.returncode == 2
    line = _error_line(proc)
    assert "tracking.uri=http://127.0.0.1:" in line and "unreachable" in line and "tracking.fallback=sqlite" in line
    assert not (tmp_path / "out" / "mlflow.db").exists()
    print(f"\nrun.py with a refused tracking server exited after {elapsed:.1f} s (interpreter start included)")


def test_a_server_that_never_answers_is_given_up_within_10_seconds():
    silent = socket.socket()  # accepts connections (the kernel's backlog) but never says a word
    silent.bind(("127.0.0.1", 0))
    silent.listen(8)
    try:
        uri = f"http://127.0.0.1:{silent.getsockname()[1]}"
        started = time.time()
        with pytest.raises(tracking.TrackingUnreachable, match="unreachable") as err:
            tracking.resolve_store({"enabled": True, "uri": uri}, output_root="unused")
        assert time.time() - started < 10
        assert isinstance(err.value, ConfigError)
    finally:
        silent.close()
    assert tracking.resolve_store({"enabled": True, "uri": None}, output_root="x") == {"enabled": True, "uri": None}


# --- 5: malformed local data --------------------------------------------------------------------

HINT = "expected JSON lines, one object per line with keys sentence1, sentence2, label"


@pytest.mark.parametrize(
    ("content", "needles"),
    [
        ('{"sentence1": "a", "sentence2": "b", "label": 1}\n{"sentence1": oops}\n', ["line 2", "not valid JSON", HINT]),
        ('{"sentence1": "a", "label": 1}\n', ["line 1", "missing column 'sentence2'", HINT]),
        ('{"sentence1": "a", "sentence2": "b", "label": "yes"}\n', ["line 1", "'label'", "integer class id in [0, 2)"]),
        ("\n", ["file is empty", HINT]),
    ],
    ids=["bad-json-line", "missing-column", "wrong-label-type", "empty-file"],
)
def test_malformed_local_data_stops_run_py_before_training(tmp_path, content, needles):
    bad = tmp_path / "train.jsonl"
    bad.write_text(content)
    out = tmp_path / "out"
    proc = run_cli(out, "task=glue/mrpc", "model=tiny_bert", f"task.local.train={bad}",
                   f"task.local.eval={FIX / 'cls_dev.csv'}", timeout=120)  # fmt: skip
    assert proc.returncode == 2
    line = _error_line(proc)
    assert str(bad) in line
    for needle in needles:
        assert needle in line
    assert not (out / "mlflow.db").exists() and not list(out.rglob("checkpoints"))


# --- 7: trust --------------------------------------------------------------------------------------


def _torch_load_calls(source: str) -> list[ast.Call]:
    return [
        node for node in ast.walk(ast.parse(source))
        if isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) and node.func.attr == "load"
        and isinstance(node.func.value, ast.Name) and node.func.value.id == "torch"
    ]  # fmt: skip


def _weights_only(call: ast.Call) -> bool:
    return any(k.arg == "weights_only" and isinstance(k.value, ast.Constant) and k.value.value is True
               for k in call.keywords)  # fmt: skip


def test_every_torch_load_is_weights_only():
    """Ours (none today, any future one) and the Trainer's resume path (optimizer.pt,
    scheduler.pt, rng_state.pth, scaler.pt) — a pickle can run code, weights_only cannot."""
    import transformers.trainer

    ours = [p for d in ("camex", "benchmarks", "hydra_plugins") for p in (ROOT / d).rglob("*.py")] + [ROOT / "run.py"]
    for path in ours:
        for call in _torch_load_calls(path.read_text()):
            assert _weights_only(call), f"{path}:{call.lineno}: torch.load without weights_only=True"
    trainer_calls = _torch_load_calls(Path(transformers.trainer.__file__).read_text())
    assert len(trainer_calls) >= 5 and all(_weights_only(c) for c in trainer_calls)


def test_trust_remote_code_is_off_unless_set(monkeypatch):
    import transformers

    seen = []
    monkeypatch.setattr(transformers.AutoTokenizer, "from_pretrained", lambda *a, **k: seen.append(k) or _Tok())
    base = {"family": "bert", "pretrained": "some/hub-model", "tokenizer": None}
    models.load_tokenizer(base)
    models.load_tokenizer({**base, "trust_remote_code": True})
    assert [k["trust_remote_code"] for k in seen] == [False, True]
    with pytest.raises(models.ModelError, match="model.trust_remote_code"):
        models.check({**base, "trust_remote_code": "yes"})
    for name in (ROOT / "conf" / "model").glob("*.yaml"):
        assert "\ntrust_remote_code: false" in name.read_text(), name


class _Tok:
    pad_token = "[PAD]"


def test_mlflow_servers_and_uis_bind_localhost():
    """Every `mlflow ui` / `mlflow server` command we print or document names --host 127.0.0.1."""
    files = [ROOT / "README.md", *(ROOT / "docs").glob("*.md"), ROOT / "run.py", *(ROOT / "camex").rglob("*.py")]
    files += list((ROOT / "conf").rglob("*.yaml"))
    files += list((ROOT / "hydra_plugins").rglob("*.py")) if (ROOT / "hydra_plugins").is_dir() else []
    commands = 0
    for path in files:
        for number, line in enumerate(path.read_text().splitlines(), 1):
            assert "0.0.0.0" not in line, f"{path}:{number}"
            if re.search(r"mlflow (ui|server) -", line):  # a command with options (bare ones default to 127.0.0.1)
                commands += 1
                assert "--host 127.0.0.1" in line, f"{path}:{number}: {line.strip()}"
    assert commands >= 3
    compose_file = ROOT / "docker-compose.yml"
    if compose_file.exists():  # inside its container a server listens on all interfaces; the host sees 127.0.0.1
        import yaml

        services = yaml.safe_load(compose_file.read_text())["services"].values()
        published = [str(port) for service in services for port in service.get("ports", [])]
        assert all(port.startswith("127.0.0.1:") for port in published), published


# --- round two (issue 19): storage faults, resume that cannot lie, secrets in tags, races ---------
#
# In-process `train()` calls (the same function `run.py` calls) on tiny BERT: a run costs seconds
# instead of an interpreter start and imports per subprocess.


def _compose(out: Path, *overrides: str, base: tuple[str, ...] = tuple(ARGS)) -> dict:
    from hydra import compose, initialize_config_dir
    from omegaconf import OmegaConf

    with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base="1.3"):
        cfg = compose(config_name="config", overrides=[f"paths.output_root={out}", "trainer=tiny", *base, *overrides])
    return OmegaConf.to_container(cfg, resolve=True)


def _train(out: Path, *overrides: str, base: tuple[str, ...] = tuple(ARGS)) -> dict:
    from camex.train import train

    cfg = _compose(out, *overrides, base=base)
    return train(cfg, run_dir=Path(cfg["paths"]["run_dir"]))


def _snapshot(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory, empty_store) -> Path:
    """One finished tiny run (2 epochs of 3 steps: checkpoint-3 and checkpoint-6), copied per test."""
    out = _out(tmp_path_factory.mktemp("finished"), empty_store)
    _train(out)
    return out


@pytest.fixture
def existing(tmp_path, finished_run) -> Path:
    out = tmp_path / "out"
    shutil.copytree(finished_run, out)
    return out


def _classified(exc: BaseException) -> tuple[int, str]:
    from camex.exits import classify

    known = classify(exc)
    assert known is not None and "\n" not in known[1], exc
    return known


def _truncate(path: Path) -> None:
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])


# 6: secrets in tags and in URIs


def test_secret_tags_and_uri_passwords_never_reach_mlflow_disk_or_console(tmp_path, empty_store, monkeypatch, capsys):
    monkeypatch.setenv("HF_TOKEN", SECRETS["HF_TOKEN"])
    out = _out(tmp_path, empty_store)
    uri = f"http://user:pw-URISECRET-7@127.0.0.1:{_closed_port()}"  # down: tracking.fallback=sqlite logs locally
    _train(out, "++tracking.tags.token=tag-TESTSECRET-42", "++tracking.tags.from_env=${oc.env:HF_TOKEN}",
           f"tracking.uri={uri}", "tracking.fallback=sqlite", "trainer.max_steps=1")  # fmt: skip
    console = capsys.readouterr()
    client, (run,) = _mlflow_runs(out)
    assert run.data.tags["token"] == REDACTED and run.data.tags["from_env"] == REDACTED
    assert run.data.params["tracking.uri"] == uri.replace("pw-URISECRET-7", REDACTED)
    assert "tracking server http://user:<redacted>@127.0.0.1" in console.err
    on_disk = b"".join(p.read_bytes() for p in out.rglob("*") if p.is_file())  # mlflow.db, artifacts, run dir
    for secret in ("TESTSECRET", "URISECRET"):
        assert secret.encode() not in on_disk and secret not in console.out + console.err


# 2: a run replaced by overwrite=true


def test_overwrite_marks_the_replaced_run_and_reports_count_the_seed_once(existing):
    from camex.report.collect import collect_runs

    _, (old,) = _mlflow_runs(existing)
    payload = _train(existing, "overwrite=true", "trainer.max_steps=2")
    collected = collect_runs(f"sqlite:///{existing / 'mlflow.db'}")
    assert [r.run_id for r in collected] == [payload["run_id"]]  # n = 1 for seed 42, not 2
    client, runs = _mlflow_runs(existing)
    assert {r.info.run_id for r in runs} == {old.info.run_id, payload["run_id"]}
    assert client.get_run(old.info.run_id).data.tags["camex.replaced_by"] == payload["run_id"]


# 3: resume=true with another config


def test_resume_with_a_changed_learning_rate_is_refused_naming_the_key(existing, capsys):
    run_dir = _run_dir(existing)
    (run_dir / "metrics.json").unlink()  # an unfinished run, as a kill leaves it
    before = _snapshot(run_dir)
    with pytest.raises(ConfigError) as err:
        _train(existing, "resume=true", "trainer.learning_rate=0.5")
    code, line = _classified(err.value)
    assert code == 2 and "trainer.learning_rate: 0.001 -> 0.5" in line and "resume_changed=true" in line
    assert _snapshot(run_dir) == before
    _train(existing, "resume=true", "trainer.learning_rate=0.5", "++resume_changed=true")
    assert "resume_changed=true: resuming" in capsys.readouterr().err
    client, (run,) = _mlflow_runs(existing)
    logged = [a.path for a in client.list_artifacts(run.info.run_id)]
    assert "resume_changed_step6.txt" in logged


# 4: damaged checkpoints

DAMAGES = {
    "truncated-weights": lambda ckpt: _truncate(ckpt / "checkpoint-6" / "model.safetensors"),
    "truncated-optimizer": lambda ckpt: _truncate(ckpt / "checkpoint-6" / "optimizer.pt"),
    "garbled-trainer-state": lambda ckpt: (ckpt / "checkpoint-6" / "trainer_state.json").write_text("{garbled"),
    "empty-newer-folder": lambda ckpt: (ckpt / "checkpoint-9").mkdir(),
}


@pytest.mark.parametrize("damage", sorted(DAMAGES))
def test_each_checkpoint_damage_is_found_from_metadata(existing, damage):
    ckpt = _run_dir(existing) / "checkpoints"
    DAMAGES[damage](ckpt)
    last, damaged = checkpoints.verified_checkpoints(ckpt)
    expected = ckpt / ("checkpoint-6" if damage == "empty-newer-folder" else "checkpoint-3")
    assert last == expected and len(damaged) == 1 and damaged[0][1]


def test_resume_falls_back_past_a_damaged_checkpoint_and_says_so(existing, capsys):
    run_dir = _run_dir(existing)
    ckpt = run_dir / "checkpoints"
    (run_dir / "metrics.json").unlink()
    _truncate(ckpt / "checkpoint-6" / "model.safetensors")
    payload = _train(existing, "resume=true")
    err = capsys.readouterr().err
    assert "checkpoint-6 is damaged" in err and "resuming from checkpoint-3" in err
    assert (ckpt / ".damaged-checkpoint-6").is_dir() and load_file(ckpt / "checkpoint-6" / "model.safetensors")
    assert json.loads((run_dir / "metrics.json").read_text())["run_id"] == payload["run_id"]


def test_no_whole_checkpoint_left_is_one_line(existing):
    run_dir = _run_dir(existing)
    (run_dir / "metrics.json").unlink()
    for step in (3, 6):
        (run_dir / "checkpoints" / f"checkpoint-{step}" / "trainer_state.json").write_text("")
    before = _snapshot(run_dir)
    with pytest.raises(checkpoints.CheckpointError) as err:
        _train(existing, "resume=true")
    code, line = _classified(err.value)
    assert code == 4 and "no checkpoint" in line and "checkpoint-6: trainer_state.json" in line
    assert _snapshot(run_dir) == before


# 5: storage faults


@pytest.mark.parametrize("damage", ["corrupt", "truncated", "locked"])
def test_a_damaged_or_locked_store_is_one_line_before_data_loads(existing, damage, monkeypatch):
    import sqlite3

    from camex import tasks

    db = existing / "mlflow.db"
    holder = None
    if damage == "corrupt":
        db.write_bytes(b"not a database " * 4000)
    elif damage == "truncated":
        _truncate(db)
    else:
        holder = sqlite3.connect(db)
        holder.execute("BEGIN EXCLUSIVE")  # another process writing, and not letting go
    monkeypatch.setattr(tasks, "prepare", lambda *a, **k: pytest.fail("data was loaded before the store was probed"))
    try:
        with pytest.raises(Exception) as err:
            _train(existing, "overwrite=true", "++tracking.store_wait_s=1")
    finally:
        if holder is not None:
            holder.close()
    code, line = _classified(err.value)
    assert code == 4 and str(db) in line
    assert {"corrupt": "damaged", "truncated": "damaged", "locked": "locked"}[damage] in line


def test_a_full_disk_is_one_line_naming_it_and_the_run_is_failed(tmp_path, empty_store):
    """A tmpfs just larger than the store: the first checkpoint does not fit (ENOSPC)."""
    mnt = tmp_path / "small"
    mnt.mkdir()
    if shutil.which("unshare") is None or subprocess.run(
        ["unshare", "-rm", "sh", "-c", f"mount -t tmpfs -o size=1m tmpfs {mnt}"], capture_output=True
    ).returncode:
        pytest.skip("cannot mount a tmpfs here (needs unprivileged user and mount namespaces)")
    size_k = empty_store.stat().st_size // 1024 + 1200
    runs = (f"from mlflow.tracking import MlflowClient; c = MlflowClient(tracking_uri='sqlite:///{mnt}/mlflow.db'); "
            "e = c.get_experiment_by_name('default').experiment_id; "
            "print('STATUSES', [r.info.status for r in c.search_runs([e])])")  # fmt: skip
    run = " ".join([sys.executable, "run.py", f"paths.output_root={mnt}", "trainer=tiny", *ARGS])
    script = (f"mount -t tmpfs -o size={size_k}k tmpfs {mnt} && cp {empty_store} {mnt}/mlflow.db && "
              f"{run}; echo EXIT $?; {sys.executable} -c \"{runs}\"")  # fmt: skip
    proc = subprocess.run(["unshare", "-rm", "sh", "-c", script], cwd=ROOT, env=ENV, capture_output=True, text=True,
                          timeout=300)  # fmt: skip
    assert "EXIT 4" in proc.stdout, proc.stdout[-2000:] + proc.stderr[-3000:]
    assert "STATUSES ['FAILED']" in proc.stdout, proc.stdout[-2000:]
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert "Traceback" not in proc.stderr and lines[-1].startswith("error: storage failed: no space left on device")


class _GoneServer:
    """An `mlflow` module whose server answered twice, then died."""

    def __init__(self) -> None:
        self.calls = 0

    def log_metrics(self, metrics, step):
        self.calls += 1
        if self.calls > 2:
            raise ConnectionError("Connection refused")


def test_a_tracking_server_dying_mid_run_checkpoints_and_stops_in_one_line():
    from transformers import TrainerControl, TrainerState

    from camex.train import _TrackerCallback

    tracker = tracking.Tracker(_GoneServer())
    callback, control = _TrackerCallback(tracker), TrainerControl()
    for step in (1, 2):
        callback.on_log(None, TrainerState(global_step=step), control, logs={"loss": 0.5})
    assert not control.should_training_stop
    callback.on_log(None, TrainerState(global_step=3), control, logs={"loss": 0.5})  # does not raise in the loop
    assert control.should_save and control.should_training_stop
    tracker.log_metrics({"loss": 0.4}, step=4)  # nothing more is sent to a dead server
    assert tracker.mlflow.calls == 3
    code, line = _classified(tracking.StoreLost(3, tracker.lost, "/runs/x/checkpoints/checkpoint-3"))
    assert code == 4 and "step 3" in line and "Connection refused" in line and "resume=true" in line
    for wait in (5, 30, 60):  # MLflow's own retries, bounded: 3 attempts and 2 s of backoff within the wait
        limits = tracking.http_limits(wait)
        attempts = int(limits["MLFLOW_HTTP_REQUEST_MAX_RETRIES"]) + 1
        assert attempts * int(limits["MLFLOW_HTTP_REQUEST_TIMEOUT"]) + 2 <= max(wait, attempts + 2)


# 1: sweep workers writing to one parent run


def test_80_concurrent_writers_on_the_parent_run_never_collide(tmp_path, empty_store):
    """Forked processes (what parallel sweep workers are), all telling a trial at the same moment:
    MLflow inserts a new tag with a select-then-insert, so unserialised writers collide."""
    import multiprocessing

    import optuna

    from camex.sweeps.parent_run import ParentRun

    out = _out(tmp_path, empty_store)
    uri = f"sqlite:///{out / 'mlflow.db'}"
    study = optuna.create_study(study_name="race", direction="maximize")
    dists = optuna.distributions
    trial = study.ask({"a": dists.FloatDistribution(0, 1), "b": dists.IntDistribution(0, 9)})
    study.tell(trial, 0.5)
    cfg = {"uri": uri}
    parent = ParentRun.open(study, cfg, output_root=out, experiment="race", description={"sampler": "grid"})
    ctx = multiprocessing.get_context("fork")
    barrier, results = ctx.Barrier(80), ctx.Queue()

    def worker(number: int) -> None:
        try:
            mine = ParentRun.open(study, cfg, output_root=out, experiment="race", description={})
            barrier.wait(timeout=120)
            mine.record(study, number, float(number))
            results.put(None)
        except Exception as e:  # noqa: BLE001 - reported to the parent
            results.put(f"{type(e).__name__}: {e}"[:300])

    procs = [ctx.Process(target=worker, args=(n,)) for n in range(80)]
    for p in procs:
        p.start()
    errors = [e for e in (results.get(timeout=240) for _ in procs) if e]
    for p in procs:
        p.join()
    assert errors == []
    from mlflow.tracking import MlflowClient

    run = MlflowClient(tracking_uri=uri).get_run(parent.run_id)
    assert run.data.tags["best.trial"] == "0" and run.data.tags["best.param.b"] == str(trial.params["b"])


# 7: nothing of an existing run changed by a refused command; paths stay inside the output root


def test_a_refused_rerun_leaves_the_finished_run_and_its_hydra_record_alone(existing):
    run_dir = _run_dir(existing)
    (run_dir / ".hydra").mkdir()
    (run_dir / ".hydra" / "config.yaml").write_text("recorded: by the first run\n")
    (run_dir / ".hydra" / "overrides.yaml").write_text("- seed=42\n")
    before = _snapshot(run_dir)
    proc = run_cli(existing, *ARGS, "trainer.learning_rate=0.5", timeout=120)  # no resume, no overwrite: refused
    assert proc.returncode == 2 and "already holds a run" in _error_line(proc)
    after = _snapshot(run_dir)
    assert {k: after.get(k) for k in before} == before  # Hydra's log file may appear; nothing existing changes
    assert not (run_dir / ".hydra-pending").exists()


def test_config_values_cannot_move_writes_outside_the_output_root(tmp_path):
    root = tmp_path / "a" / "b" / "c"
    proc = run_cli(root, *ARGS, "experiment_name=../../../x", timeout=120)
    assert proc.returncode == 2
    line = _error_line(proc)
    assert "outside paths.output_root" in line and "experiment_name" in line
    assert [p for p in tmp_path.rglob("*") if p.name == "x"] == []
    with pytest.raises(ConfigError, match="paths.run_dir=/elsewhere/run is outside paths.output_root"):
        _train(tmp_path, "paths.run_dir=/elsewhere/run")


# 8: bad inputs found before the MLflow run starts


def test_files_that_are_not_images_stop_the_run_before_it_starts_in_mlflow(tmp_path):
    from camex.tasks import TaskError

    folders = tmp_path / "images"
    local = _image_folders(folders)
    out = tmp_path / "out"
    base = ("task=vision/imagenet1k", "model=tiny_vit", "task.num_labels=2", *local)
    for name, content in (("text.png", b"not an image at all"),
                          ("cut.png", (folders / "train" / "red" / "0.png").read_bytes()[:60])):  # fmt: skip
        bad = folders / "train" / "red" / name
        bad.write_bytes(content)
        with pytest.raises(TaskError, match=re.escape(str(bad))) as err:
            _train(out, base=base)
        assert _classified(err.value)[0] == 2
        assert not (out / "mlflow.db").exists()
        bad.unlink()


def test_a_parent_run_that_does_not_exist_is_refused_before_data_loads(tmp_path, empty_store):
    out = _out(tmp_path, empty_store)
    cfg = {"enabled": True, "uri": None, "parent_run_id": "0123456789abcdef0123456789abcdef"}
    with pytest.raises(ConfigError, match="tracking.parent_run_id=0123456789abcdef0123456789abcdef does not exist in"):
        tracking.probe_store(cfg, output_root=out)
    tracking.probe_store({**cfg, "parent_run_id": None}, output_root=out)  # the store itself is fine
