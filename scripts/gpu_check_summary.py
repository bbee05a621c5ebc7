"""Gather what `scripts/gpu_check.sh` produced into one JSON and print the table for the docs.

    python scripts/gpu_check_summary.py OUT_DIR     # writes OUT_DIR/gpu_check.json

Reads OUT_DIR/steps.tsv (each step's exit status and seconds), tests.xml (the gpu-marked tests),
layer_*.json, kernels.json (fused Triton kernels against the PyTorch paths) and model_*.json
(benchmarks) and the runs' metrics.json. Nothing is filled in that a
step did not produce: a missing figure stays null and shows as "–".
"""

from __future__ import annotations

import json
import subprocess
import sys
import xml.etree.ElementTree as ET
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmarks.common import markdown_table  # noqa: E402


def _load(path: Path) -> dict | None:
    return json.loads(path.read_text()) if path.exists() else None


def _steps(out: Path) -> dict:
    rows = {}
    for line in (out / "steps.tsv").read_text().splitlines() if (out / "steps.tsv").exists() else []:
        name, rc, seconds = line.split("\t")
        rows[name] = {"exit": int(rc) if rc.isdigit() else rc, "seconds": int(seconds)}
    return rows


def _tests(out: Path) -> dict | None:
    if not (out / "tests.xml").exists():
        return None
    suite = ET.parse(out / "tests.xml").getroot()
    suite = suite if suite.tag == "testsuite" else suite.find("testsuite")
    keys = ("tests", "failures", "errors", "skipped")
    return {k: int(suite.get(k, 0)) for k in keys}


def _layer(out: Path) -> dict:
    result = {}
    for precision in ("fp32", "bf16"):
        data = _load(out / f"layer_{precision}.json")
        if data is None:
            continue
        for shape, r in data["shapes"].items():
            result[f"{shape}/{precision}"] = {
                "cases": {name: {"ms": c["median_ms"], "x_dense": c["x_dense_time"]} for name, c in r["cases"].items()},
                "targets": r["targets"],
            }
    return result


def _model(out: Path) -> dict:
    result = {}
    for name in ("model_float32", "model_bfloat16", "model_bfloat16_r8"):
        data = _load(out / f"{name}.json")
        if data is None:
            continue
        for family, r in data["models"].items():
            v = r["variants"]
            domain = v.get("domain", {}).get("median_ms")
            result[f"{family}/{name.removeprefix('model_')}"] = {
                variant: {
                    "ms": row["median_ms"],
                    "tokens_per_s": row["tokens_per_s"],
                    "x_dense": row["x_dense_time"],
                    "x_domain": None if not domain else row["median_ms"] / domain,
                    "mfu": row["mfu"],
                }
                for variant, row in v.items()
            }
    return result


def _kernels(out: Path) -> dict | None:
    """Fused kernels × the PyTorch paths they replace (`scripts/gpu_kernels.py`)."""
    data = _load(out / "kernels.json")
    if data is None:
        return None
    keys = ("torch_ms", "fused_ms", "fused_x_torch", "fused_x_dense", "eval_fused_x_torch", "max_rel_diff")
    rows = {f"curvature {k}": v for k, v in data["curvature"].items()}
    rows |= {f"merged linear {k}": v for k, v in data["merged_linear"].items()}
    return {name: {k: r.get(k) for k in keys} for name, r in rows.items()}


def _runs(out: Path) -> dict:
    runs = {}
    for metrics in sorted(out.glob("runs*/**/metrics.json")):
        data = json.loads(metrics.read_text())
        key = "/".join(metrics.relative_to(out).parts[:-1])
        runs[key] = {"primary": data.get("primary"), "metrics": data.get("metrics", {})}
    return runs


def summarise(out: Path) -> dict:
    commit = subprocess.run(["git", "rev-parse", "HEAD"], cwd=ROOT, capture_output=True, text=True).stdout.strip()
    gpu = (out / "gpu.txt").read_text().strip() if (out / "gpu.txt").exists() else None
    return {
        "commit": commit or None,
        "gpu": gpu,
        "steps": _steps(out),
        "tests": _tests(out),
        "layer": _layer(out),
        "kernels": _kernels(out),
        "model": _model(out),
        "runs": _runs(out),
    }


def table(summary: dict) -> str:
    rows = []
    for key, r in summary["layer"].items():
        c = r["cases"]
        rows.append([f"layer {key}", *(c.get(n, {}).get("x_dense") for n in ("euclid", "camex_r1", "camex_r8"))])
        rows[-1].append(c.get("released_r1", {}).get("x_dense"))
    headers = ["benchmark", "euclid × dense", "camex r=1 × dense", "camex r=8 × dense", "released r=1 × dense"]
    text = markdown_table(headers, rows)
    kernel_rows = [
        [name, r["torch_ms"], r["fused_ms"], r["fused_x_torch"], r["eval_fused_x_torch"], r["max_rel_diff"]]
        for name, r in (summary["kernels"] or {}).items()
    ]
    text += "\n\n" + markdown_table(
        ["fused kernel", "PyTorch ms", "fused ms", "fused × PyTorch", "eval fused × PyTorch", "max rel. diff"],
        kernel_rows,
    )
    model_rows = []
    for key, v in summary["model"].items():
        for variant, r in v.items():
            model_rows.append([key, variant, r["ms"], r["tokens_per_s"], r["x_dense"], r["x_domain"], r["mfu"]])
    text += "\n\n" + markdown_table(
        ["model", "variant", "step ms", "tokens/s", "× dense", "× domain", "MFU"], model_rows
    )
    steps = [[name, s["exit"], s["seconds"]] for name, s in summary["steps"].items()]
    text += "\n\n" + markdown_table(["step", "exit", "seconds"], steps)
    head = f"commit {summary['commit']}, {summary['gpu']}, gpu tests: {summary['tests']}"
    return head + "\n\n" + text


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if len(argv) != 1 or not Path(argv[0]).is_dir():
        print("usage: python scripts/gpu_check_summary.py OUT_DIR (the folder scripts/gpu_check.sh wrote)")
        return 2
    out = Path(argv[0])
    summary = summarise(out)
    (out / "gpu_check.json").write_text(json.dumps(summary, indent=2) + "\n")
    print(table(summary))
    print(f"\nwrote {out / 'gpu_check.json'}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
