"""Eval benchmark: forward time (autograd off, eval mode) with and without the reparameterisation cache.

    python -m benchmarks.eval                 # T5-base and GPT-2 shapes on CPU
    python -m benchmarks.eval --device cuda

Outside training `α·M_i(mask(τ_i))` depends on parameters only, so `MergedExpertLinear` caches it
until a parameter changes (SPEC §4): a CAMEx eval forward should then cost what a Euclidean one
costs. Cases (shapes and layers as in `benchmarks.layer`):

* `dense` – the dense linear.
* `euclid` – Euclidean merging; its domain vectors are cached the same way.
* `euclid_nocache` – Euclidean merging recomputing `τ = E − E_m` every call.
* `camex_r1`, `camex_r8`, `camex_ties_r1` – CAMEx with the cache (the operands are built in the
  warm-up call and reused).
* `camex_r1_nocache`, `camex_r8_nocache` – CAMEx rebuilding `M_i(τ_i)` every call
  (`layer.eval_cache = False`).
* `released_r1` – the released-code formulation (`benchmarks.layer.ReleasedMergedLinear`), which
  has no cache.
"""

from __future__ import annotations

import torch

from benchmarks.common import (
    Case,
    markdown_table,
    measure_memory,
    round_ratio,
    run_shapes,
    shape_parser,
    time_cases,
)
from benchmarks.layer import SHAPES, TINY, Shape, build_module, gates, make_inputs

CASES = {
    "dense": ("dense", True),
    "euclid": ("euclid", True),
    "euclid_nocache": ("euclid", False),
    "camex_r1": ("camex_r1", True),
    "camex_r1_nocache": ("camex_r1", False),
    "camex_r8": ("camex_r8", True),
    "camex_r8_nocache": ("camex_r8", False),
    "camex_ties_r1": ("camex_ties_r1", True),
    "released_r1": ("released_r1", False),
}


def eval_step(module: torch.nn.Module, x: torch.Tensor):
    gs = gates(module)

    def run() -> None:
        with torch.no_grad():
            module(x)
        for g in gs:
            g.pop_aux()

    return run


def run_shape(shape: Shape, names: list[str], device, dtype, *, warmup: int, repeats: int, memory: bool) -> dict:
    x, _ = make_inputs(shape, device, dtype, grad=False)
    cases = []
    for name in names:
        layer_case, cache = CASES[name]
        module = build_module(layer_case, shape).to(device, dtype).eval()
        for m in module.modules():
            if hasattr(m, "eval_cache"):
                m.eval_cache = cache
        cases.append(Case(name, eval_step(module, x), info={"cache": cache}))
    time_cases(cases, device, warmup=max(warmup, 1), repeats=repeats)  # the first call fills the cache
    if memory:
        measure_memory(cases, device)
    by = {c.name: c for c in cases}

    def rel(case, ref):
        return round_ratio(case, by.get(ref))

    rows = {
        c.name: {
            "median_ms": c.median_ms,
            "times_ms": c.times_ms,
            "peak_mb": c.peak_mb,
            "cache": c.info["cache"],
            "x_dense_time": rel(c, "dense"),
            "x_euclid_time": rel(c, "euclid"),
            "x_euclid_nocache_time": rel(c, "euclid_nocache"),
        }
        for c in cases
    }
    checks = []
    if "camex_r1" in rows and rows["camex_r1"]["x_euclid_time"] is not None:
        value = rows["camex_r1"]["x_euclid_time"]
        checks.append({"target": "camex_r1 (cached) eval × euclid eval", "bound": 1.1, "measured": value})
        checks[-1]["met"] = value <= 1.1
    return {"shape": {**shape.__dict__, "tokens": shape.tokens, "units": shape.units}, "cases": rows, "targets": checks}


def table(result: dict) -> str:
    s = result["shape"]
    title = f"**{s['name']}** eval forward: {s['in_features']}→{s['out_features']}, {s['batch']}×{s['length']} tokens"
    rows = [
        [name, r["median_ms"], r["x_dense_time"], r["x_euclid_time"], r["x_euclid_nocache_time"], r["peak_mb"]]
        for name, r in result["cases"].items()
    ]
    headers = ["case", "fwd ms", "× dense", "× euclid", "× euclid (no cache)", "peak MiB"]
    text = title + "\n\n" + markdown_table(headers, rows)
    if result["targets"]:
        checks = [
            [t["target"], f"≤ {t['bound']:.3g}", t["measured"], "yes" if t["met"] else "NO"] for t in result["targets"]
        ]
        text += "\n\n" + markdown_table(["target", "bound", "measured", "met"], checks)
    return text


def main(argv=None) -> dict:
    args = shape_parser(__doc__.split("\n\n")[0], shapes=list(SHAPES), cases=list(CASES), repeats=10).parse_args(argv)
    return run_shapes("eval", args, shapes=TINY if args.tiny else SHAPES, run_shape=run_shape, table=table)


if __name__ == "__main__":
    main()
