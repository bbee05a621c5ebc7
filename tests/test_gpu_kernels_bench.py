"""`scripts/gpu_kernels.py` (the fused kernels against the PyTorch paths, a step of
`scripts/gpu_check.sh`) in its CPU dry mode: Triton's interpreter at toy shapes writes the JSON
the GPU check's summary reads, with both paths agreeing; real shapes on the CPU are refused."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "scripts" / "gpu_kernels.py"


def _run(*args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    return subprocess.run([sys.executable, str(SCRIPT), *args], env=env, capture_output=True, text=True, timeout=300)


def test_gpu_kernels_dry_run_writes_what_the_gpu_check_summary_reads(tmp_path):
    pytest.importorskip("triton")
    out = tmp_path / "kernels.json"
    proc = _run("--device", "cpu", "--tiny", "--ranks", "1", "--repeats", "1", "--warmup", "0", "--out", str(out))
    assert proc.returncode == 0, proc.stderr[-3000:]
    data = json.loads(out.read_text())
    assert set(data["curvature"]) == {"60x15/r1", "15x60/r1"}
    for row in data["curvature"].values():
        assert row["fits"] and row["max_rel_diff"] < 1e-5 and row["torch_ms"] > 0 and row["fused_ms"] > 0
    assert data["merged_linear"]["fp32"]["max_rel_diff"] < 1e-5
    assert data["merged_linear"]["bf16"]["max_rel_diff"] < 2e-2  # bf16 tokens: rounding only

    sys.path.insert(0, str(ROOT / "scripts"))
    import gpu_check_summary

    (tmp_path / "steps.tsv").write_text("kernels\t0\t10\n")
    assert gpu_check_summary.main([str(tmp_path)]) == 0
    kernels = json.loads((tmp_path / "gpu_check.json").read_text())["kernels"]
    assert kernels["merged linear bf16"]["fused_ms"] == data["merged_linear"]["bf16"]["fused_ms"]
    assert kernels["curvature 60x15/r1"]["fused_x_torch"] == data["curvature"]["60x15/r1"]["fused_x_torch"]


def test_gpu_kernels_refuses_real_shapes_on_the_cpu(tmp_path):
    proc = _run("--device", "cpu", "--out", str(tmp_path / "kernels.json"))
    assert proc.returncode == 2 and "--device cpu: only with --tiny" in proc.stderr
    assert len(proc.stderr.strip().splitlines()) == 1 and not (tmp_path / "kernels.json").exists()
