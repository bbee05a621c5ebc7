"""Shared harness: interleaved timing, peak-memory probes, environment record, JSON and Markdown.

Timing. Every case of a run is set up first, then warmed up, then measured in interleaved rounds
(case 1, case 2, ..., case 1, case 2, ...), so slow drifts of a shared machine hit every case
alike; each figure is the median over rounds, and ratios are medians of the same rounds. On CUDA
each call is bracketed by `torch.cuda.synchronize()`. `--clock cpu` times CPU cases by the
process's CPU time (user + system, page faults included) instead of the wall clock: with one
thread on a machine whose cores other jobs share, it leaves out the time spent waiting for a core,
which the wall clock adds to whichever case happened to wait.

Peak memory. On CUDA: `torch.cuda.max_memory_allocated()` during one call, minus what was
allocated before it. On CPU PyTorch keeps no allocator statistics, so one extra (untimed) call
runs under `torch.profiler` with `profile_memory=True`, which records every allocation and free
made through PyTorch's CPU allocator (kernel-internal buffers included, not only tensors seen at
the Python level); the peak is the maximum of the running sum of those events, i.e. the most
memory the call held at once beyond what existed before it (parameters and inputs excluded, the
parameter gradients it creates included).
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import platform
import statistics
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

os.environ.setdefault("KINETO_LOG_LEVEL", "5")  # keep the profiler's start/stop chatter out of the table

import torch  # noqa: E402

from camex.host_memory import reuse_freed_memory  # noqa: E402
from camex.tracking import git_commit  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results"
ENV_PREFIXES = ("OMP_", "MKL_", "MALLOC_", "THP_MEM_ALLOC")


@dataclass
class Case:
    """One measured configuration: `run()` does the work once (e.g. forward + backward)."""

    name: str
    run: Callable[[], object]
    info: dict = field(default_factory=dict)
    times_ms: list[float] = field(default_factory=list)
    peak_mb: float | None = None
    gflop: float | None = None

    @property
    def median_ms(self) -> float:
        return statistics.median(self.times_ms)


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


CLOCKS = {"wall": time.perf_counter, "cpu": time.process_time}
_clock = CLOCKS["wall"]


def set_clock(name: str) -> None:
    """Time with the wall clock (`wall`) or the process's CPU time (`cpu`; CPU cases only)."""
    global _clock
    _clock = CLOCKS[name]


def time_cases(cases: list[Case], device: torch.device, *, warmup: int, repeats: int) -> None:
    """Warm every case up, then time `repeats` interleaved rounds of all of them."""
    for case in cases:
        for _ in range(warmup):
            case.run()
    sync(device)
    for _ in range(repeats):
        for case in cases:
            sync(device)
            start = _clock()
            case.run()
            sync(device)
            case.times_ms.append((_clock() - start) * 1e3)


def peak_memory_mb(run: Callable[[], object], device: torch.device, attempts: int = 3) -> float:
    """Most memory held at once during one `run()`, beyond what was allocated before it (MiB)."""
    gc.collect()
    if device.type == "cuda":
        sync(device)
        torch.cuda.reset_peak_memory_stats(device)
        before = torch.cuda.memory_allocated(device)
        run()
        sync(device)
        return (torch.cuda.max_memory_allocated(device) - before) / 2**20
    peak = 0.0
    for _ in range(attempts):  # the profiler occasionally hands back no allocation events: try again
        peak = _profiled_peak(run)
        if peak > 0:
            break
    return peak


def _profiled_peak(run: Callable[[], object]) -> float:
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        run()
    events = [e for e in prof.profiler.kineto_results.events() if e.name() == "[memory]" and e.device_index() == -1]
    events.sort(key=lambda e: e.start_ns())
    live = peak = 0
    for e in events:
        live += e.nbytes()
        peak = max(peak, live)
    return peak / 2**20


def measure_memory(cases: list[Case], device: torch.device) -> None:
    for case in cases:
        case.peak_mb = peak_memory_mb(case.run, device)


def matmul_gflop(run: Callable[[], object]) -> float:
    """GFLOP of the matrix products one `run()` executes, forward and backward alike, as counted by
    `torch.utils.flop_counter.FlopCounterMode` (one multiply-add is 2 FLOPs; elementwise work is
    not counted). This is the work a case does, not a model of it: recomputations count."""
    from torch.utils.flop_counter import FlopCounterMode

    with FlopCounterMode(display=False) as counter:  # the compiled CPU kernels step aside under it
        run()
    return counter.get_total_flops() / 1e9


def measure_flops(cases: list[Case]) -> None:
    for case in cases:
        case.gflop = matmul_gflop(case.run)


def environment(device: torch.device) -> dict:
    env = {
        "torch": torch.__version__,
        "device": str(device),
        "threads": torch.get_num_threads(),
        "cpu": platform.processor() or platform.machine(),
        "python": platform.python_version(),
        "time": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "commit": git_commit(),  # the code the figures were measured on
        # threading and allocator settings change CPU timings (docs/gpu_path.md, "CPU threads")
        "env": {k: v for k, v in sorted(os.environ.items()) if k.startswith(ENV_PREFIXES)},
        "load_average": os.getloadavg() if hasattr(os, "getloadavg") else None,
    }
    if device.type == "cuda":
        env["gpu"] = torch.cuda.get_device_name(device)
    else:
        try:
            for line in Path("/proc/cpuinfo").read_text().splitlines():
                if line.startswith("model name"):
                    env["cpu"] = line.split(":", 1)[1].strip()
                    break
        except OSError:
            pass
    return env


def write_json(path: Path, payload: dict) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(payload, indent=2) + "\n")
    return path


def save(results: dict, out: str | None, default_name: str) -> dict:
    """Write `results` to `out` (or `RESULTS/<default_name>`), say where, and return them."""
    path = write_json(Path(out) if out else RESULTS / default_name, results)
    print(f"wrote {path}")
    return results


def shape_parser(description: str, *, shapes: list[str], cases: list[str], repeats: int) -> argparse.ArgumentParser:
    """The command line of the benchmarks that time one layer at fixed shapes (layer, eval)."""
    p = argparse.ArgumentParser(description=description)
    p.add_argument("--device", default="cpu")
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    p.add_argument("--shapes", nargs="+", default=["t5", "gpt2"], choices=shapes)
    p.add_argument("--cases", nargs="+", default=cases, choices=cases)
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--repeats", type=int, default=repeats)
    p.add_argument("--no-memory", action="store_true", help="skip the peak-memory pass")
    p.add_argument("--tiny", action="store_true", help="toy shapes, for smoke tests")
    p.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (CPU)")
    add_clock(p)
    add_host_memory(p)
    p.add_argument("--out", default=None, help="JSON path (default benchmarks/results/<benchmark>_<device>.json)")
    return p


def add_clock(p: argparse.ArgumentParser) -> None:
    p.add_argument("--clock", default="wall", choices=list(CLOCKS), help="cpu: process CPU time (1 thread, CPU)")


def add_host_memory(p: argparse.ArgumentParser) -> None:
    p.add_argument("--host-memory", default="reuse", choices=["reuse", "system"],
                   help="reuse: keep freed CPU memory, as training does (trainer.reuse_host_memory); "
                        "system: the C library's default")  # fmt: skip


def apply_host_memory(args: argparse.Namespace) -> None:
    """Allocate host memory as a training run does (camex/host_memory.py), unless told otherwise."""
    reuse_freed_memory(args.host_memory == "reuse")


def apply_clock(args: argparse.Namespace) -> None:
    """Refuse `--clock cpu` where it does not measure the step (a GPU, several threads)."""
    if args.clock == "cpu" and (args.device != "cpu" or (args.threads or torch.get_num_threads()) != 1):
        sys.stderr.write("--clock cpu: only for --device cpu with one thread (--threads 1); allowed: wall, cpu\n")
        raise SystemExit(2)
    set_clock(args.clock)


def apply_process_settings(args: argparse.Namespace) -> None:
    """What every benchmark sets for its whole process before timing: threads, clock, allocator."""
    if args.threads:
        torch.set_num_threads(args.threads)
    apply_clock(args)
    apply_host_memory(args)


def run_shapes(benchmark: str, args: argparse.Namespace, *, shapes: dict, run_shape: Callable, table: Callable) -> dict:
    """Run `run_shape` for every shape asked for, print each table, and save the JSON."""
    apply_process_settings(args)
    device = pick_device(args.device)
    dtype = getattr(torch, args.dtype)
    results = {
        "benchmark": benchmark,
        "environment": environment(device),
        "settings": {
            "dtype": args.dtype,
            "autocast": getattr(args, "autocast", False),
            "clock": args.clock,
            "host_memory": args.host_memory,
            "warmup": args.warmup,
            "repeats": args.repeats,
            "tiny": args.tiny,
        },
        "shapes": {},
    }
    for name in args.shapes:
        result = run_shape(
            shapes[name], args.cases, device, dtype, warmup=args.warmup, repeats=args.repeats, memory=not args.no_memory
        )
        results["shapes"][name] = result
        print(table(result) + "\n", flush=True)
    return save(results, args.out, f"{benchmark}_{device.type}.json")


def markdown_table(headers: list[str], rows: list[list]) -> str:
    def cell(v) -> str:
        if v is None:
            return "–"
        if isinstance(v, float):
            return f"{v:.3g}" if abs(v) < 100 else f"{v:.0f}"
        return str(v)

    lines = ["| " + " | ".join(headers) + " |", "|" + "|".join("---" for _ in headers) + "|"]
    lines += ["| " + " | ".join(cell(v) for v in row) + " |" for row in rows]
    return "\n".join(lines)


def pick_device(name: str) -> torch.device:
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda asked for, but CUDA is not available")
    return device


def ratio(a: float | None, b: float | None) -> float | None:
    return None if a is None or not b else a / b


def median(values: list[float]) -> float:
    return statistics.median(values)


def round_ratio(case: Case, ref: Case | None) -> float | None:
    """Median over rounds of `case / ref`, each round having timed both side by side."""
    if ref is None or not case.times_ms:
        return None
    return statistics.median(a / b for a, b in zip(case.times_ms, ref.times_ms))
