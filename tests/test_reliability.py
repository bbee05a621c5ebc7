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
from test_run import ENV, FIX, ROOT, _local, _mlflow_runs, run_cli

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
