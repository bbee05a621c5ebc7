"""camex's Optuna sweeper for Hydra, built on Optuna's ask/tell interface.

Select it with `hydra/sweeper=camex_optuna` (config in `conf/hydra/sweeper/camex_optuna.yaml`) or
a sweep file (`+sweeps=paper_grid_glue`, files in the repository's `sweeps/`). Hydra finds this
package through the `hydra_plugins` namespace package.
"""
