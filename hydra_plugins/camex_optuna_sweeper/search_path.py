"""Puts the repository root on Hydra's config search path, so the sweep files in `sweeps/` are the
options of a config group `sweeps`: `python run.py -m +sweeps=paper_grid_glue`."""

from __future__ import annotations

from pathlib import Path

from hydra.core.config_search_path import ConfigSearchPath
from hydra.plugins.search_path_plugin import SearchPathPlugin

REPO = Path(__file__).resolve().parents[2]


class CamexSweepsSearchPath(SearchPathPlugin):
    def manipulate_search_path(self, search_path: ConfigSearchPath) -> None:
        if (REPO / "sweeps").is_dir():  # a checkout (an installed wheel has no sweeps/)
            search_path.append(provider="camex-sweeps", path=f"file://{REPO}")
