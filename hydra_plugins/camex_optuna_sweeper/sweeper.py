"""The Hydra-facing sweeper class. Hydra imports every module of `hydra_plugins` at start-up, so
this one stays light; the loop (`_core.py`: Optuna, MLflow, camex) loads when a sweep starts."""

from __future__ import annotations

from typing import Any

from hydra.plugins.sweeper import Sweeper
from hydra.types import HydraContext, TaskFunction
from omegaconf import DictConfig


class CamexOptunaSweeper(Sweeper):
    def __init__(self, **options: Any) -> None:
        self.options = options  # see conf/hydra/sweeper/camex_optuna.yaml

    def setup(self, *, hydra_context: HydraContext, task_function: TaskFunction, config: DictConfig) -> None:
        from hydra_plugins.camex_optuna_sweeper._core import SweepLoop

        self.loop = SweepLoop(**self.options)
        self.loop.setup(hydra_context=hydra_context, task_function=task_function, config=config)

    def sweep(self, arguments: list[str]) -> Any:
        return self.loop.sweep(arguments)
