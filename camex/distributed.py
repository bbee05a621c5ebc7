"""Multi-process runs under `torchrun`: who is rank 0, one process group, and the launch checks.

`torchrun --nproc_per_node=N run.py ...` starts N copies of the same command. They compose the
same config, so they agree on the run directory; only rank 0 writes into it (Hydra's `.hydra/`
and log, the run-directory claim, `metrics.json`) and only rank 0 talks to MLflow. The others
train their data shard through the Trainer's DDP and wait for rank 0 where a decision is shared.

The Trainer would create the process group itself, but only once its arguments are built, and
the run-directory claim must happen before that; so the group is created here first, with the
same backend that is then handed to the Trainer (`ddp_backend`). torch is imported inside the
functions: `camex.tracking` asks `is_main()` and must stay importable without it.
"""

from __future__ import annotations

import importlib.util
import os
from pathlib import Path
from typing import Any

BACKENDS = ("nccl", "gloo", "mpi")


def world_size() -> int:
    return int(os.environ.get("WORLD_SIZE", "1"))


def rank() -> int:
    return int(os.environ.get("RANK", "0"))


def is_main() -> bool:
    """True in a single-process run and on rank 0 of a `torchrun` launch."""
    return rank() == 0


def backend(trainer_cfg: dict[str, Any]) -> str:
    """`trainer.ddp_backend`, or NCCL on GPUs and gloo on CPUs when it is null."""
    import torch

    chosen = trainer_cfg.get("ddp_backend")
    if chosen is not None:
        return chosen
    return "nccl" if torch.cuda.is_available() else "gloo"


def check_launch(trainer_cfg: dict[str, Any]) -> str | None:
    """A one-line problem with the multi-process or DeepSpeed settings, or None when they work here."""
    import torch

    chosen = trainer_cfg.get("ddp_backend")
    if chosen is not None and chosen not in BACKENDS:
        return f"trainer.ddp_backend={chosen!r} is invalid; allowed: null (auto) or one of {list(BACKENDS)}"
    if chosen == "nccl" and world_size() > 1 and not torch.cuda.is_available():
        return "trainer.ddp_backend='nccl' needs CUDA devices; use null (auto) or 'gloo' on CPUs"
    ds = trainer_cfg.get("deepspeed")
    if ds is None:
        return None
    if not Path(ds).is_file():
        return f"trainer.deepspeed={ds!r}: no such file; pass a DeepSpeed JSON, e.g. conf/deepspeed/zero2_offload.json"
    if importlib.util.find_spec("deepspeed") is None:
        return "trainer.deepspeed is set but DeepSpeed is not installed: pip install -c constraints.txt '.[deepspeed]'"
    if not torch.cuda.is_available():
        return "trainer.deepspeed needs CUDA devices; on CPUs use trainer.deepspeed=null (plain DDP)"
    return None


def init(trainer_cfg: dict[str, Any]) -> None:
    """Create the process group of a `torchrun` launch (no-op in a single process or when it exists)."""
    import torch

    if world_size() == 1 or torch.distributed.is_initialized():
        return
    chosen = backend(trainer_cfg)
    if chosen == "nccl":
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
    torch.distributed.init_process_group(backend=chosen)


def share_from_main(value: Any) -> Any:
    """Rank 0's `value` on every rank (any picklable object); the value itself in a single process."""
    import torch

    if world_size() == 1 or not torch.distributed.is_initialized():
        return value
    box = [value if is_main() else None]
    torch.distributed.broadcast_object_list(box, src=0)
    return box[0]


def barrier() -> None:
    """Wait for every rank (no-op in a single process)."""
    import torch

    if world_size() > 1 and torch.distributed.is_initialized():
        torch.distributed.barrier()


def worker_hydra_overrides(argv: list[str]) -> list[str]:
    """Command-line overrides that keep Hydra on ranks > 0 from writing into the shared run directory.

    Rank 0 writes `.hydra/` (the composed config) and the job log; the others would write the very
    same files at the same moment, so they skip `.hydra/` and log to the console only.
    """
    if is_main():
        return []
    extra = ["hydra.output_subdir=null"]
    if not any(arg.lstrip("+~").startswith("hydra/job_logging=") for arg in argv):
        extra.append("hydra/job_logging=stdout")
    return extra
