"""camex entry point: `python run.py` (offline default) or `python run.py task=glue/sst2 merge=camex_ties`."""

from __future__ import annotations

import sys
from pathlib import Path

import hydra
from omegaconf import DictConfig, OmegaConf


@hydra.main(version_base="1.3", config_path="conf", config_name="config")
def main(cfg: DictConfig) -> float | None:
    from camex.config import ConfigError
    from camex.train import train

    container = OmegaConf.to_container(cfg, resolve=True)
    try:
        result = train(container, run_dir=Path(cfg.paths.run_dir))
    except ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
    return result["metrics"].get(result["primary"])  # the objective a sweeper reads


if __name__ == "__main__":
    main()
