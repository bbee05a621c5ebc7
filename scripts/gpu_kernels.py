"""The fused Triton kernels against the PyTorch paths they replace, timed side by side (issue 20).

    python scripts/gpu_kernels.py --device cuda --out OUT/kernels.json   # what scripts/gpu_check.sh runs
    python scripts/gpu_kernels.py --device cpu --tiny                    # dry run: Triton's interpreter, toy shapes

Curvature (forward + backward, n = 7 experts): `kronecker_apply` with the PyTorch passes
(`camex.merging.curvature.FUSED = False`) against the fused kernels (`kronecker_triton`), on the
paper's FFN weights 3072 × 768 and 768 × 3072 (factors 48·64 and 24·32), r = 1 and 8.

Merged linear (T5-base's FFN `wi`: 16 units × 128 tokens, 768 → 3072, n = 7, merged around the
base as Euclidean merging does): `merged_linear` as it runs by default against the merge fused
into the token GEMM (`camex.merging.merge.FUSED_GEMM = True`), fp32 and under bf16 autocast,
forward + backward and forward alone (evaluation), with `F.linear` (`dense`) for reference.

Each pair also records the largest difference between the two paths' outputs, relative to the
largest entry. Writes a JSON (the figures, settings and environment) and prints a table.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

EXPERTS = 7
# (out, in) of the curvature's weights, and the merged linear's (units, tokens, in, out)
SHAPES = {"paper": ([(3072, 768), (768, 3072)], (16, 128, 768, 3072)), "tiny": ([(60, 15), (15, 60)], (2, 5, 15, 60))}


def parse(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--device", default="cuda", choices=["cuda", "cpu"])
    p.add_argument("--tiny", action="store_true", help="toy shapes (the only ones --device cpu takes)")
    p.add_argument("--ranks", nargs="+", type=int, default=[1, 8])
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--out", default=None, help="JSON path (default benchmarks/results/gpu_kernels_<device>.json)")
    args = p.parse_args(argv)
    if args.device == "cpu" and not args.tiny:
        sys.stderr.write("--device cpu: only with --tiny (Triton's interpreter is far too slow for real shapes)\n")
        raise SystemExit(2)
    if any(r < 1 for r in args.ranks) or args.repeats < 1 or args.warmup < 0:
        sys.stderr.write("--ranks: integers ≥ 1; --repeats ≥ 1; --warmup ≥ 0\n")
        raise SystemExit(2)
    return args


def main(argv: list[str] | None = None) -> dict:
    args = parse(argv)
    if args.device == "cpu":
        os.environ["TRITON_INTERPRET"] = "1"  # read when triton is first imported, below
    import torch

    from benchmarks.common import environment, markdown_table, pick_device, save

    device = pick_device(args.device)
    torch.manual_seed(0)
    curv_shapes, gemm_shape = SHAPES["tiny" if args.tiny else "paper"]
    results = {
        "benchmark": "gpu_kernels",
        "environment": environment(device),
        "settings": {"experts": EXPERTS, "warmup": args.warmup, "repeats": args.repeats, "tiny": args.tiny},
        "tf32": device.type == "cuda" and torch.backends.cuda.matmul.allow_tf32,
        "curvature": {},
        "merged_linear": {},
    }
    for out, inp in curv_shapes:
        for rank in args.ranks:
            results["curvature"][f"{out}x{inp}/r{rank}"] = _curvature(out, inp, rank, device, args)
    for precision in ("fp32", "bf16"):
        results["merged_linear"][precision] = _merged_linear(gemm_shape, precision, device, args)
    print(_table(results, markdown_table), flush=True)
    return save(results, args.out, f"gpu_kernels_{device.type}.json")


def _timed(cases: dict, device, args) -> dict:
    """Median ms of each case (interleaved rounds, `benchmarks.common.time_cases`)."""
    from benchmarks.common import Case, time_cases

    timed = [Case(name, run) for name, run in cases.items()]
    time_cases(timed, device, warmup=args.warmup, repeats=args.repeats)
    return {c.name: c.median_ms for c in timed}


def _rel_diff(a, b) -> float:
    return ((a.float() - b.float()).abs().max() / b.float().abs().max().clamp_min(1e-30)).item()


def _curvature(out: int, inp: int, rank: int, device, args) -> dict:
    import torch

    from camex.kernels import kronecker
    from camex.merging import curvature

    dims = (*curvature.nearest_factors(out), *curvature.nearest_factors(inp))
    tau = torch.randn(EXPERTS, out, inp, device=device, requires_grad=True)
    factors = [
        (torch.eye(d, device=device) + 0.02 * torch.randn(rank, EXPERTS, d, d, device=device)).requires_grad_()
        for d in dims
    ]
    grad = torch.randn(EXPERTS, out, inp, device=device)
    curvature.FUSED = False  # kronecker_apply: the PyTorch passes

    def torch_path():
        y = curvature.kronecker_apply(tau, factors)
        torch.autograd.grad(y, [tau, *factors], grad)
        return y

    def fused_path():
        y = kronecker.kronecker_triton(tau.view(EXPERTS, *dims), factors).view_as(tau)
        torch.autograd.grad(y, [tau, *factors], grad)
        return y

    ms = _timed({"torch": torch_path, "fused": fused_path}, device, args)
    return {
        "dims": list(dims),
        "fits": kronecker.fits(tau.view(EXPERTS, *dims), factors),
        "torch_ms": ms["torch"],
        "fused_ms": ms["fused"],
        "fused_x_torch": ms["fused"] / ms["torch"],
        "max_rel_diff": _rel_diff(fused_path(), torch_path()),
    }


def _merged_linear(shape: tuple, precision: str, device, args) -> dict:
    import torch
    import torch.nn.functional as F

    from camex.kernels import merged_gemm
    from camex.merging import merge

    if device.type == "cpu":  # dry run: the interpreter runs the kernel on CPU tensors
        merged_gemm.usable = lambda *operands: merged_gemm.available()
    units, tokens, inp, out = shape
    x = torch.randn(units, tokens, inp, device=device, requires_grad=True)
    base = (0.02 * torch.randn(out, inp, device=device)).requires_grad_()
    experts = (base.detach() + 0.002 * torch.randn(EXPERTS, out, inp, device=device)).requires_grad_()
    scores = torch.softmax(torch.randn(units, EXPERTS, device=device), -1).requires_grad_()
    grad = torch.randn(units, tokens, out, device=device)
    params = [x, base, experts, scores]
    amp = (
        torch.autocast(device.type, dtype=torch.bfloat16) if precision == "bf16" else contextlib.nullcontext()
    )  # fmt: skip

    def step(fused: bool, backward: bool):
        def run():
            merge.FUSED_GEMM = fused
            try:
                with amp, torch.set_grad_enabled(backward):
                    y = merge.merged_linear(x, base, experts, scores, around=True)
                if backward:
                    torch.autograd.grad(y, params, grad.to(y.dtype))
                return y
            finally:
                merge.FUSED_GEMM = False

        return run

    def dense(backward: bool):
        def run():
            with amp, torch.set_grad_enabled(backward):
                y = F.linear(x, base)
            if backward:
                torch.autograd.grad(y, [x, base], grad.to(y.dtype))
            return y

        return run

    cases = {"dense": dense(True), "torch": step(False, True), "fused": step(True, True)}
    cases |= {"eval_dense": dense(False), "eval_torch": step(False, False), "eval_fused": step(True, False)}
    ms = _timed(cases, device, args)
    result = {f"{name}_ms": value for name, value in ms.items()}
    result |= {
        "shape": {"units": units, "tokens": tokens, "in": inp, "out": out},
        "fused_x_torch": ms["fused"] / ms["torch"],
        "torch_x_dense": ms["torch"] / ms["dense"],
        "fused_x_dense": ms["fused"] / ms["dense"],
        "eval_fused_x_torch": ms["eval_fused"] / ms["eval_torch"],
        "eval_fused_x_dense": ms["eval_fused"] / ms["eval_dense"],
        "max_rel_diff": _rel_diff(step(True, False)(), step(False, False)()),
    }
    return result


def _table(results: dict, markdown_table) -> str:
    rows = [
        [f"curvature {key}", r["torch_ms"], r["fused_ms"], r["fused_x_torch"], None, r["max_rel_diff"]]
        for key, r in results["curvature"].items()
    ]
    for precision, r in results["merged_linear"].items():
        rows.append([f"merged linear {precision}", r["torch_ms"], r["fused_ms"], r["fused_x_torch"],
                     r["fused_x_dense"], r["max_rel_diff"]])  # fmt: skip
        rows.append([f"merged linear {precision}, eval", r["eval_torch_ms"], r["eval_fused_ms"],
                     r["eval_fused_x_torch"], r["eval_fused_x_dense"], None])  # fmt: skip
    headers = ["case", "PyTorch ms", "fused ms", "fused × PyTorch", "fused × dense", "max rel. diff"]
    return markdown_table(headers, rows)


if __name__ == "__main__":
    main()
