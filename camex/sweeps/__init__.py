"""Optuna sweeps: what the Hydra sweeper plugin (`hydra_plugins/camex_optuna_sweeper`) and the
`python -m camex.sweeps` command share: study storage and locking, worker bookkeeping, reading a
trial's outcome, the MLflow parent run, and picking the best configuration per (task, model, merge).
"""

from camex.sweeps.outcome import Outcome, read_outcome
from camex.sweeps.study import Best, best_per_group, default_storage, open_storage

__all__ = ["Best", "Outcome", "best_per_group", "default_storage", "open_storage", "read_outcome"]
