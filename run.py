"""camex entry point: `python run.py` (offline default) or `python run.py task=glue/sst2 merge=camex_ties`."""

from __future__ import annotations

import sys
from pathlib import Path

import hydra
from hydra.core.hydra_config import HydraConfig
from hydra.types import RunMode
from omegaconf import DictConfig, OmegaConf

import camex  # noqa: F401 - registers ${camex.inside:...}, which conf/config.yaml's hydra.run.dir uses


@hydra.main(version_base="1.3", config_path="conf", config_name="config")
def main(cfg: DictConfig) -> float | None:
    from camex import exits
    from camex.exits import classify, say_error
    from camex.train import train

    exits.job_started = True
    try:
        container = OmegaConf.to_container(cfg, resolve=True)
        hydra_cfg = HydraConfig.get()  # where Hydra recorded the command (None under torchrun's other ranks)
        pending = Path(hydra_cfg.runtime.output_dir) / hydra_cfg.output_subdir if hydra_cfg.output_subdir else None
        result = train(container, run_dir=Path(str(cfg.paths.run_dir)), hydra_pending=pending)
    except Exception as e:  # a known failure (camex/exits.py) is one line and an exit status; a bug raises
        known = classify(e)
        if known is None:
            raise
        say_error(known[1])
        if getattr(e, "every_rank", False):  # raised by every rank at one point, so this cannot deadlock:
            from camex import distributed  # none exits (and has torchrun kill the others mid-line) first

            distributed.barrier()
        if HydraConfig.get().mode == RunMode.MULTIRUN:
            raise  # one trial of a sweep: the sweeper records it as failed and goes on
        sys.exit(known[0])
    return result["metrics"].get(result["primary"])  # the objective a sweeper reads


if __name__ == "__main__":
    from camex.distributed import worker_hydra_overrides
    from camex.exits import run_cli

    sys.argv += worker_hydra_overrides(sys.argv[1:])  # under torchrun, only rank 0 writes Hydra's files
    run_cli(main)  # bad overrides and Ctrl-C end with one line and an exit status, not a traceback
