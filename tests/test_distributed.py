"""`torchrun --nproc_per_node=2` on CPUs (gloo): DDP through the Trainer, rank 0 alone writes and logs.

The comparison. Two processes with per-device batch 2 see, at every optimizer step, the same four
examples as one process with batch 4: the Trainer's seedable sampler draws one permutation on
every rank, and the sharded batch sampler hands rank r the r-th half of each global batch (the
12 fixture examples fill 3 global batches exactly, so no rank pads its last batch with repeats).
DDP averages the two half-batch mean gradients, which is the full-batch mean gradient. The
per-step losses, gradient norms, final weights and final metrics must therefore agree up to float
summation order: tolerance 1e-5 absolute (weights, losses) and 1e-4 relative (gradient norms),
where one optimizer step at lr 3e-3 moves the weights by ~1e-3, 100x more.

Two parts of the MoE layer legitimately depend on the per-device batch and are switched off for
this comparison: the noisy gate's random draws (`merge.noisy=false`) and the load-balancing loss,
a non-linear function of the batch's routing scores (`merge.aux_coef=0`).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from camex import distributed

ROOT = Path(__file__).resolve().parents[1]
FIX = ROOT / "tests" / "fixtures"
ENV = {
    **os.environ,
    "HF_HUB_OFFLINE": "1",
    "HF_DATASETS_OFFLINE": "1",
    "TOKENIZERS_PARALLELISM": "false",
    "OMP_NUM_THREADS": "1",
}
RUN = [
    "trainer=tiny", "task=glue/mrpc", "model=tiny_bert", "task.max_length=64", "merge=camex",
    "merge.noisy=false", "merge.aux_coef=0", "trainer.learning_rate=3e-3",
    f"task.local.train={FIX / 'cls_train.jsonl'}", f"task.local.eval={FIX / 'cls_dev.csv'}",
]  # fmt: skip


def _single(out: Path, *overrides: str) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "run.py", f"paths.output_root={out}", *RUN, *overrides]
    return subprocess.run(cmd, cwd=ROOT, env=ENV, capture_output=True, text=True, timeout=300)


def _torchrun(out: Path, *overrides: str, port: int) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", f"--master_port={port}",
           "run.py", f"paths.output_root={out}", *RUN, *overrides]  # fmt: skip
    return subprocess.run(cmd, cwd=ROOT, env=ENV, capture_output=True, text=True, timeout=300)


def _run_dir(out: Path) -> Path:
    return next((out / "runs").rglob("metrics.json")).parent  # not the MLflow artifact copy


def _history(out: Path) -> tuple[list, dict]:
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=f"sqlite:///{out / 'mlflow.db'}")
    runs = client.search_runs([client.get_experiment_by_name("default").experiment_id])
    history = {
        key: [(m.step, m.value) for m in client.get_metric_history(runs[0].info.run_id, key)]
        for key in ("train_loss", "grad_norm")
    }
    return runs, history


def _stable(metrics: dict) -> dict:
    return {k: v for k, v in metrics.items() if not any(s in k for s in ("runtime", "per_second", "wall"))}


def test_torchrun_two_cpu_processes_match_one_process_with_the_same_global_batch(tmp_path):
    single = _single(tmp_path / "single", "trainer.batch_size=4")
    assert single.returncode == 0, single.stderr[-3000:]
    ddp = _torchrun(tmp_path / "ddp", "trainer.batch_size=2", port=29631)
    assert ddp.returncode == 0, ddp.stderr[-3000:]
    assert ddp.stdout.count("finished: glue/mrpc") == 1  # the summary comes from rank 0 only

    runs, ddp_history = _history(tmp_path / "ddp")
    assert len(runs) == 1 and runs[0].info.status == "FINISHED"
    assert runs[0].data.params["trainer.batch_size"] == "2"
    _, single_history = _history(tmp_path / "single")
    for key, tol in (("train_loss", dict(abs=1e-5)), ("grad_norm", dict(rel=1e-4, abs=1e-7))):
        assert [s for s, _ in ddp_history[key]] == [s for s, _ in single_history[key]] == list(range(1, 7)), key
        assert [v for _, v in ddp_history[key]] == pytest.approx([v for _, v in single_history[key]], **tol), key

    a = json.loads((_run_dir(tmp_path / "single") / "metrics.json").read_text())
    b = json.loads((_run_dir(tmp_path / "ddp") / "metrics.json").read_text())
    assert b["run_id"] == runs[0].info.run_id
    assert set(_stable(a["metrics"])) == set(_stable(b["metrics"]))
    assert _stable(b["metrics"]) == pytest.approx(_stable(a["metrics"]), abs=1e-5)

    weights = {k: load_file(_run_dir(tmp_path / k) / "final_model" / "model.safetensors") for k in ("single", "ddp")}
    assert weights["single"].keys() == weights["ddp"].keys()
    gap = max((weights["single"][k] - weights["ddp"][k]).abs().max().item() for k in weights["single"])
    assert gap < 1e-5
    # ... while training moved them far more than that: epoch 1 -> epoch 2 checkpoints differ
    ckpts = sorted((_run_dir(tmp_path / "ddp") / "checkpoints").glob("checkpoint-*"), key=lambda p: int(p.name[11:]))
    first, last = (load_file(c / "model.safetensors") for c in (ckpts[0], ckpts[-1]))
    moved = max((first[k] - last[k]).abs().max().item() for k in first)
    assert moved > 100 * 1e-5

    # rank 0 wrote the run directory once: Hydra's files, the MLflow run id, one RNG state per rank
    run_dir = _run_dir(tmp_path / "ddp")
    assert (run_dir / ".hydra" / "config.yaml").is_file()
    assert (run_dir / "mlflow_run_id.txt").read_text().strip() == runs[0].info.run_id
    assert {p.name for p in ckpts[-1].glob("rng_state_*.pth")} == {"rng_state_0.pth", "rng_state_1.pth"}

    # the claim is rank 0's and shared: a rerun is refused by both ranks, with the same one line, not a hang
    again = _torchrun(tmp_path / "ddp", "trainer.batch_size=2", port=29632)
    assert again.returncode != 0
    refusals = [line for line in again.stderr.splitlines() if line.startswith("error: ")]
    assert len(refusals) == 2 and len(set(refusals)) == 1 and "resume=true" in refusals[0]
    assert len(_history(tmp_path / "ddp")[0]) == 1


def test_workers_skip_hydra_files_and_rank0_keeps_them(monkeypatch):
    monkeypatch.setenv("RANK", "0")
    assert distributed.worker_hydra_overrides(["task=glue/mrpc"]) == []
    monkeypatch.setenv("RANK", "1")
    assert distributed.worker_hydra_overrides(["task=glue/mrpc"]) == ["hydra.output_subdir=null",
                                                                      "hydra/job_logging=stdout"]  # fmt: skip
    # a user's own job-logging choice is kept (a second value for the group would be an error)
    assert distributed.worker_hydra_overrides(["hydra/job_logging=disabled"]) == ["hydra.output_subdir=null"]


def test_backend_is_chosen_from_config_or_device(monkeypatch):
    assert distributed.backend({"ddp_backend": "gloo"}) == "gloo"
    assert distributed.backend({"ddp_backend": None}) == ("nccl" if torch.cuda.is_available() else "gloo")
    assert distributed.backend({}) == distributed.backend({"ddp_backend": None})


@pytest.mark.parametrize(
    "trainer_cfg,needle",
    [({"ddp_backend": "smoke"}, "trainer.ddp_backend='smoke' is invalid; allowed"),
     ({"deepspeed": "no/such.json"}, "trainer.deepspeed='no/such.json': no such file")],
)  # fmt: skip
def test_bad_launch_settings_are_named(trainer_cfg, needle):
    problem = distributed.check_launch(trainer_cfg)
    assert problem is not None and needle in problem and "\n" not in problem


def test_launch_settings_that_work_here_pass(monkeypatch):
    assert distributed.check_launch({"ddp_backend": None, "deepspeed": None}) is None
    assert distributed.check_launch({"ddp_backend": "gloo"}) is None


def test_deepspeed_trainer_without_deepspeed_or_cuda_stops_before_loading(tmp_path):
    """`trainer=deepspeed_zero2` needs the extra and a GPU; here one of them is missing."""
    import importlib.util

    if importlib.util.find_spec("deepspeed") is not None and torch.cuda.is_available():
        pytest.skip("DeepSpeed and CUDA are both here: the preset would run")
    proc = _single(tmp_path / "out", "trainer=deepspeed_zero2")
    assert proc.returncode == 2, proc.stderr[-2000:]
    err = proc.stderr.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: trainer.deepspeed")
    expected = "not installed" if importlib.util.find_spec("deepspeed") is None else "needs CUDA"
    assert expected in err[0]
    assert not (tmp_path / "out" / "mlflow.db").exists()


def test_deepspeed_preset_is_zero2_with_cpu_optimizer_offload_on_the_released_schedule():
    """The released runs: ZeRO-2, optimizer states on the CPU, fp32; every number from the trainer config."""
    import yaml

    preset = yaml.safe_load((ROOT / "conf" / "trainer" / "deepspeed_zero2.yaml").read_text())
    assert preset["defaults"] == ["glue_released", "_self_"]
    ds = json.loads((ROOT / preset["deepspeed"]).read_text())
    assert ds["zero_optimization"]["stage"] == 2
    assert ds["zero_optimization"]["offload_optimizer"]["device"] == "cpu"
    assert "offload_param" not in ds["zero_optimization"]  # ZeRO-2 shards optimizer state and gradients only
    # no optimizer or scheduler section: camex's AdamW parameter groups and the configured schedule are used
    assert "optimizer" not in ds and "scheduler" not in ds
    # batch, accumulation, clipping and precision are "auto": filled from the trainer config, so the two
    # cannot disagree; the released schedule itself is fp32
    auto = [ds["train_micro_batch_size_per_gpu"], ds["gradient_accumulation_steps"], ds["gradient_clipping"],
            ds["fp16"]["enabled"], ds["bf16"]["enabled"]]  # fmt: skip
    assert auto == ["auto"] * 5
    released = yaml.safe_load((ROOT / "conf" / "trainer" / "glue_released.yaml").read_text())
    assert released["precision"] == "fp32" and released["learning_rate"] == 2.0e-4 and released["batch_size"] == 16


def test_an_error_line_reaches_stderr_in_one_write(monkeypatch):
    """Ranks share torchrun's stderr pipe; a line written as text then newline (as `print` does)
    can be split by the other rank's line, which is how the refusal test above once saw 1 line of 2."""
    from camex import exits

    writes: list[str] = []

    class Recorder:
        def write(self, text: str) -> int:
            writes.append(text)
            return len(text)

        def flush(self) -> None:
            pass

    monkeypatch.setattr(sys, "stderr", Recorder())
    exits.say_error("x already holds a run")
    assert writes == ["error: x already holds a run\n"]
