"""The curvature's passes one by one, compiled CPU kernels against PyTorch's GEMMs, side by side.

Every mode product (with the factor and with its transpose, as forward and backward use them)
and every factor gradient (contraction) of one block of experts at a layer's mode sizes, timed
in interleaved rounds of one process (`--threads N`: on N threads, wall clock):

    OMP_NUM_THREADS=1 python -m benchmarks.cpu_kernels --clock cpu      # T5-base FFN: [2, 48, 64, 24, 32]
"""

from __future__ import annotations

import argparse
import functools

import torch

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
from camex.kernels import cpu_kron
from camex.merging import curvature, nearest_factors

SHAPES = {"t5": (768, 3072), "gpt2": (768, 3072), "minilm": (384, 1536)}


def on(kernels: bool, fn):
    """`fn` run with the compiled kernels (True) or PyTorch's GEMMs (False)."""

    def run() -> None:
        curvature.CPU_KERNELS = None if kernels else False
        fn()

    return run


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--shape", default="t5", choices=list(SHAPES), help="the FFN linear whose modes are timed")
    p.add_argument("--experts", type=int, default=2, help="experts per block (the 24 MiB block holds 2 at T5)")
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--repeats", type=int, default=7)
    p.add_argument("--tiny", action="store_true", help="toy mode sizes, for smoke tests")
    add_clock(p)
    add_host_memory(p)
    p.add_argument("--out", default=None, help="JSON path (default benchmarks/results/cpu_kernels_cpu.json)")
    p.add_argument("--threads", type=int, default=1, help="torch.set_num_threads: the kernels use as many")
    p.set_defaults(device="cpu")
    args = p.parse_args(argv)
    apply_process_settings(args)
    if not cpu_kron.available():
        p.exit(2, f"benchmarks.cpu_kernels: the CPU kernels do not run here: {cpu_kron.why_unavailable()}\n")
    inp, out_dim = (12, 20) if args.tiny else SHAPES[args.shape]
    dims = (*nearest_factors(out_dim), *nearest_factors(inp))
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(args.experts, *dims, generator=gen)
    g = torch.randn(args.experts, *dims, generator=gen)
    buf = torch.empty_like(x)
    cases, flops = [], {}
    for k, d in enumerate(dims):
        f = torch.randn(args.experts, d, d, generator=gen)
        work = {
            f"mode {k} (d={d})": functools.partial(curvature._mode_into, x, f, k, buf),
            f"mode {k} (d={d}), factor transposed": functools.partial(curvature._mode_into, x, f.mT, k, buf),
            f"contraction {k} (d={d})": functools.partial(curvature._contract_into, g, x, k, f.clone()),
        }
        for name, fn in work.items():
            flops[name] = 2 * x.numel() * d
            cases += [Case(f"{name} | kernel", on(True, fn), info={"pass": name, "kernels": "auto"}),
                      Case(f"{name} | pytorch", on(False, fn), info={"pass": name, "kernels": "off"})]  # fmt: skip
    kept = curvature.CPU_KERNELS
    try:
        time_cases(cases, torch.device("cpu"), warmup=args.warmup, repeats=args.repeats)
    finally:
        curvature.CPU_KERNELS = kept
    rows, table = {}, []
    for kernel, reference in zip(cases[::2], cases[1::2]):
        name = kernel.info["pass"]
        row = {
            "kernel_ms": kernel.median_ms,
            "pytorch_ms": reference.median_ms,
            "kernel_gflop_per_s": flops[name] / kernel.median_ms / 1e6,
            "pytorch_gflop_per_s": flops[name] / reference.median_ms / 1e6,
            "speedup": round_ratio(reference, kernel),  # median of per-round PyTorch ÷ kernel
            "kernel_times_ms": kernel.times_ms,
            "pytorch_times_ms": reference.times_ms,
        }
        rows[name] = row
        table.append([name, row["pytorch_gflop_per_s"], row["kernel_gflop_per_s"], row["speedup"]])
    result = {
        "benchmark": "cpu_kernels",
        "environment": environment(torch.device("cpu")),
        "settings": {
            **{key: getattr(args, key) for key in ("shape", "experts", "clock", "warmup", "repeats", "tiny")},
            "dims": dims,
        },
        "passes": rows,
    }
    header = ["pass", "PyTorch GFLOP/s", "kernel GFLOP/s", "PyTorch time ÷ kernel time"]
    print(markdown_table(header, table) + "\n", flush=True)
    return save(result, args.out, "cpu_kernels_cpu.json")


if __name__ == "__main__":
    main()
