"""CPU work budgets of the merged layers, side by side: every merged case at every budget pair,
with and without the compiled CPU kernels.

The merged linear builds its weights a tile of output rows at a time (`merge.CPU_BLOCK_BYTES`) and
the curvature walks blocks of experts (`curvature.CPU_BLOCK_BYTES`; here also its cap for experts
that fit the cache, `CPU_CACHE_BLOCK_BYTES`, so a block is at most the budget given, whatever the
expert's size). Smaller budgets keep a tile in the cache; larger ones mean fewer, larger BLAS
calls, i.e. fewer OpenMP regions for the threads to wait in. Each (case, budget) pair is timed
with dense in interleaved rounds of one process:

    python -m benchmarks.budgets --threads 2 --budgets 8,12 32,48     # MiB: merge,curvature
    python -m benchmarks.budgets --threads 1 --clock cpu --budgets 16,24 --cpu-kernels auto off
    python -m benchmarks.budgets --threads 1 --clock cpu --shape minilm --budgets 48,24 48,4   # MiniLM-L6's FFN

`--cpu-kernels` chooses the compiled CPU kernels per case, side by side: `auto` all of them,
`curvature` only the curvature's mode products and contractions (`camex.kernels.cpu_kron`; the
merged linear's merge and reductions on PyTorch's ops), `off` none (PyTorch's GEMMs throughout).
"""

from __future__ import annotations

import argparse

import torch

from benchmarks import layer
from benchmarks.common import (
    Case,
    add_clock,
    add_host_memory,
    apply_process_settings,
    environment,
    markdown_table,
    round_ratio,
    save,
    time_cases,
)
from camex.merging import curvature, merge

MIB = 2**20


def budget_pair(text: str) -> tuple[int, int]:
    """`"8,12"` -> (8, 12): the merged linear's tile and the curvature's block, in MiB."""
    try:
        tile, block = (int(v) for v in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"budget {text!r}: two whole MiB counts: merge,curvature") from None
    if tile < 1 or block < 1:
        raise argparse.ArgumentTypeError(f"budget {text!r}: both MiB counts must be at least 1")
    return tile, block


def under_budget(step, tile_mib: int, block_mib: int, kernels: str = "auto"):
    """`step` run with these budgets and CPU kernel setting (module constants, read at every call)."""

    def run() -> None:
        merge.CPU_BLOCK_BYTES, curvature.CPU_BLOCK_BYTES = tile_mib * MIB, block_mib * MIB
        curvature.CPU_CACHE_BLOCK_BYTES = block_mib * MIB
        curvature.CPU_KERNELS = None if kernels in ("auto", "curvature") else False
        merge.CPU_KERNELS = None if kernels == "auto" else False  # the merge and its reductions (cpu_merge)
        step()

    return run


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--shape", default="t5", choices=list(layer.SHAPES))
    p.add_argument("--cases", nargs="+", default=["euclid", "camex_r1"], choices=list(layer.VARIANTS))
    p.add_argument("--budgets", nargs="+", type=budget_pair, default=[(8, 12), (32, 48)], help="MiB: merge,curvature")
    p.add_argument("--cpu-kernels", nargs="+", default=["auto"], choices=["auto", "curvature", "off"],
                   help="auto: all compiled CPU kernels; curvature: its own only; off: none")  # fmt: skip
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--repeats", type=int, default=9)
    p.add_argument("--threads", type=int, default=None, help="torch.set_num_threads")
    p.add_argument("--tiny", action="store_true", help="toy shape, for smoke tests")
    add_clock(p)
    add_host_memory(p)
    p.add_argument("--out", default=None, help="JSON path (default benchmarks/results/budgets_cpu.json)")
    p.set_defaults(device="cpu")  # the budgets are CPU settings
    args = p.parse_args(argv)
    apply_process_settings(args)
    torch.manual_seed(0)
    shape = (layer.TINY if args.tiny else layer.SHAPES)[args.shape]
    x, grad_y = layer.make_inputs(shape, torch.device("cpu"), torch.float32, grad=True)
    dense = Case("dense", layer.train_step(layer.build_module("dense", shape).train(), x, grad_y))
    cases = [dense]
    for name in args.cases:
        step = layer.train_step(layer.build_module(name, shape).train(), x, grad_y)
        for t, b in args.budgets:
            for kernels in args.cpu_kernels:
                label = f"{name} {t},{b}" + ("" if kernels == "auto" else f" kernels {kernels}")
                info = {"case": name, "tile_mib": t, "block_mib": b, "cpu_kernels": kernels}
                cases.append(Case(label, under_budget(step, t, b, kernels), info=info))
    settings_kept = [(merge, "CPU_BLOCK_BYTES"), (merge, "CPU_KERNELS"), (curvature, "CPU_BLOCK_BYTES"),
                     (curvature, "CPU_CACHE_BLOCK_BYTES"), (curvature, "CPU_KERNELS")]  # fmt: skip
    kept = [getattr(module, name) for module, name in settings_kept]
    try:
        time_cases(cases, torch.device("cpu"), warmup=args.warmup, repeats=args.repeats)
    finally:
        for (module, name), value in zip(settings_kept, kept):
            setattr(module, name, value)
    rows = {c.name: {**c.info, "median_ms": c.median_ms, "times_ms": c.times_ms, "x_dense_time": round_ratio(c, dense)}
            for c in cases}  # fmt: skip
    settings = {"shape": shape.name, "clock": args.clock, "host_memory": args.host_memory,
                "warmup": args.warmup, "repeats": args.repeats, "tiny": args.tiny}  # fmt: skip
    result = {
        "benchmark": "budgets",
        "environment": environment(torch.device("cpu")),
        "settings": settings,
        "cases": rows,
    }
    table = [[name, row.get("tile_mib"), row.get("block_mib"), row.get("cpu_kernels"), row["median_ms"],
              row["x_dense_time"]] for name, row in rows.items()]  # fmt: skip
    header = ["case", "tile MiB", "block MiB", "CPU kernels", "fwd+bwd ms", "× dense"]
    print(markdown_table(header, table) + "\n", flush=True)
    return save(result, args.out, "budgets_cpu.json")


if __name__ == "__main__":
    main()
