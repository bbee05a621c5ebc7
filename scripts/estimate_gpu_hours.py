"""Estimated A100-hours per paper table, from FLOPs: an ESTIMATE, not a measurement.

    python scripts/estimate_gpu_hours.py                 # the Markdown table in docs/gpu.md
    python scripts/estimate_gpu_hours.py --mfu 0.5 --precision bf16

For every run of a table's sweep (read from its experiment preset in conf/experiment), the FLOPs of
training (forward + backward, every epoch) and of evaluation (after every epoch and once more at
the end) are counted per token and multiplied by the tokens the run processes:

- dense part: 6 x non-embedding parameters (2 per multiply-add, x3 for forward + backward) plus
  attention scores, 12 x attention layers x context x d_model (forward 4 x ..., x3);
- merged-expert overhead: `camex.accounting` FLOPs per token of each upcycled FFN linear for the
  run's variant, rank and routed-unit size, less the dense linear's, times the FFN blocks;
- seconds = FLOPs / (peak TFLOP/s x assumed MFU) on one GPU.

Assumptions (peak throughput, MFU, model shapes, data-set sizes) live in scripts/gpu_hours.yaml;
everything a run is configured with (grid, model, epochs, batch, lengths, merge options) is read
from conf/. Run from anywhere; prints Markdown.
"""

from __future__ import annotations

import argparse
import itertools
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from camex.accounting import Linear, flops_per_token  # noqa: E402
from camex.variants import get_variant  # noqa: E402

CONF = ROOT / "conf"
VIT_PATCH = 16  # ViT-S/16 and Swin's 4x4 patches merged to 16x16-equivalent tokens at the last stage


def _yaml(path: Path) -> dict[str, Any]:
    if not path.is_file():
        raise SystemExit(f"error: {path.relative_to(ROOT)} does not exist")
    return yaml.safe_load(path.read_text()) or {}


def _override(defaults: list, group: str) -> str | None:
    """`override /group: name` (or `override /group@_global_.group: name`) in a defaults list."""
    for entry in defaults or []:
        if isinstance(entry, dict):
            for key, value in entry.items():
                if key.startswith(f"override /{group}"):
                    return value
    return None


def _kind(variant: str) -> str:
    v = get_variant(variant)
    return {"dense": "dense", "smoe": "smoe", "ep": "ep_camex"}.get(v.layer, "camex" if v.curvature else "merged")


@dataclass
class Run:
    task: str
    model: str
    trainer: str
    merge: dict[str, Any]


def table_runs(preset: str) -> list[Run]:
    """Every run of an experiment preset's sweep grid (task x merge x any merge.* values)."""
    exp = _yaml(CONF / "experiment" / f"{preset}.yaml")
    params = (exp.get("hydra") or {}).get("sweeper", {}).get("params")
    if not params:
        raise SystemExit(f"error: conf/experiment/{preset}.yaml has no hydra.sweeper.params grid to estimate")
    grid = {key: [v.strip() for v in str(values).split(",")] for key, values in params.items()}
    fixed_task = _override(exp.get("defaults"), "task")
    grid.setdefault("task", [fixed_task])
    options = _yaml(CONF / "merge" / "_options.yaml") | (exp.get("merge") or {})
    runs = []
    for values in itertools.product(*grid.values()):
        point = dict(zip(grid, values))
        task = _yaml(CONF / "task" / f"{point['task']}.yaml")
        model = _override(exp.get("defaults"), "model") or _override(task.get("defaults"), "model")
        trainer = _override(exp.get("defaults"), "trainer") or _override(task.get("defaults"), "trainer")
        merge = dict(options) | _yaml(CONF / "merge" / f"{point['merge']}.yaml")
        merge.pop("defaults", None)
        merge |= {k.removeprefix("merge."): yaml.safe_load(v) for k, v in point.items() if k.startswith("merge.")}
        runs.append(Run(point["task"], model, trainer, merge))
    return runs


def run_flops(run: Run, assumptions: dict[str, Any]) -> tuple[float, float]:
    """(FLOPs, training tokens) of one run."""
    shape = assumptions["models"].get(run.model)
    if shape is None:
        raise SystemExit(f"error: scripts/gpu_hours.yaml has no shape for model {run.model!r}")
    data = assumptions["datasets"][run.task]
    task = _yaml(CONF / "task" / f"{run.task}.yaml")
    trainer = _yaml(CONF / "trainer" / f"{run.trainer}.yaml")
    model_cfg = _yaml(CONF / "model" / f"{run.model}.yaml")
    epochs, batch = trainer["epochs"], trainer["batch_size"]

    if "train_tokens" in data:  # language modelling: blocks of block_size tokens
        length = task["block_size"]
        train_tokens, eval_tokens = data["train_tokens"], data["eval_tokens"]
    else:
        length = task.get("max_length") or (model_cfg["image_size"] // VIT_PATCH) ** 2 + 1
        train_tokens, eval_tokens = data["train"] * length, data["eval"] * length
        eval_tokens += data["eval"] * (task.get("generation") or {}).get("max_new_tokens", 0)

    kind = _kind(run.merge["variant"])
    unit = run.merge["segment_len"] if shape.get("causal", run.model.startswith("gpt2")) else length
    chain = shape["ep_chain"] if kind == "ep_camex" else 1
    common = dict(n=run.merge["num_experts"], rank=run.merge["rank"], top_k=run.merge.get("top_k") or 2,
                  tokens_per_unit=min(unit, length), tokens_per_batch=batch * length, chain_length=chain)  # fmt: skip

    def moe_extra(training: bool) -> float:
        if kind == "dense":
            return 0.0
        extra = 0.0
        for fan_in, fan_out in shape["ffn_linears"]:
            layer = Linear(fan_in, fan_out)
            ours = flops_per_token(kind, layer, training=training, cached=not training, **common)["total"] / chain
            extra += ours - flops_per_token("dense", layer)["total"]
        return shape["ffn_blocks"] * extra

    attention = 4.0 * shape["attention_layers"] * length * shape["d_model"]
    forward_dense = 2.0 * shape["nonembedding_params"] + attention
    train_per_token = 3.0 * (forward_dense + moe_extra(True))
    eval_per_token = forward_dense + moe_extra(False)
    flops = epochs * train_tokens * train_per_token + (epochs + 1) * eval_tokens * eval_per_token
    return flops, epochs * train_tokens


def estimate(assumptions: dict[str, Any], *, precision: str, mfu: float) -> list[dict[str, Any]]:
    throughput = assumptions["gpu"]["peak_tflops"][precision] * 1e12 * mfu
    rows = []
    for preset in assumptions["tables"]:
        runs = table_runs(preset)
        costs = [run_flops(run, assumptions) for run in runs]
        flops = sum(c[0] for c in costs)
        rows.append({
            "table": preset,
            "runs": len(runs),
            "models": ", ".join(sorted({r.model for r in runs})),
            "train_tokens": sum(c[1] for c in costs),
            "pflop": flops / 1e15,
            "gpu_hours": flops / throughput / 3600,
        })  # fmt: skip
    return rows


def markdown(rows: list[dict[str, Any]], assumptions: dict[str, Any], *, precision: str, mfu: float) -> str:
    gpu = assumptions["gpu"]
    peak = gpu["peak_tflops"][precision]
    lines = [
        f"Estimate, not a measurement: FLOPs / ({peak:g} TFLOP/s {precision} peak x {mfu:g} assumed MFU) "
        f"on one {gpu['name']}.",
        "",
        "| table | runs | model | training tokens (B) | PFLOP | A100-hours (est.) |",
        "|---|---:|---|---:|---:|---:|",
    ]
    for r in rows:
        lines.append(f"| `{r['table']}` | {r['runs']} | {r['models']} | {r['train_tokens'] / 1e9:,.1f} "
                     f"| {r['pflop']:,.0f} | {r['gpu_hours']:,.0f} |")  # fmt: skip
    total = sum(r["gpu_hours"] for r in rows)
    lines.append(f"| all | {sum(r['runs'] for r in rows)} | | | {sum(r['pflop'] for r in rows):,.0f} | {total:,.0f} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--assumptions", type=Path, default=ROOT / "scripts" / "gpu_hours.yaml")
    parser.add_argument("--precision", default=None, help="fp32 (the released runs) or bf16")
    parser.add_argument("--mfu", type=float, default=None, help="assumed model-FLOPs utilisation, 0 < mfu <= 1")
    args = parser.parse_args(argv)
    assumptions = _yaml(args.assumptions)
    precision = args.precision or "fp32"
    mfu = args.mfu if args.mfu is not None else assumptions["gpu"]["mfu"]
    if precision not in assumptions["gpu"]["peak_tflops"]:
        parser.error(f"--precision {precision!r} is invalid; allowed: {list(assumptions['gpu']['peak_tflops'])}")
    if not 0 < mfu <= 1:
        parser.error(f"--mfu {mfu} is invalid; allowed: 0 < mfu <= 1")
    rows = estimate(assumptions, precision=precision, mfu=mfu)
    print(markdown(rows, assumptions, precision=precision, mfu=mfu))


if __name__ == "__main__":
    main()
