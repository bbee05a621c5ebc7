"""How `run.py` ends: one line on stderr and a documented exit status, never a traceback for
something the user can fix. A traceback is kept for what is not understood here (a bug).

    0    finished
    2    bad input: an override, a config value, a data file, a model source, an unreachable
         tracking server (`error: <what> ...; allowed: ...`), found before training starts
    3    training diverged (NaN or infinite loss; the MLflow run is FAILED)
    4    storage failed: the tracking store (damaged, locked, unreachable mid-run), the disk (full,
         read-only) or an unreadable checkpoint; the root cause is named, never buried
    130  SIGINT (Ctrl-C), 143 SIGTERM: a checkpoint was saved, the MLflow run is KILLED;
         `resume=true` finishes it
"""

from __future__ import annotations

import errno
import os
import signal
import sys
from collections.abc import Callable
from typing import Any

USER_ERROR = 2
job_started = False  # set by the job function: failures before it are Hydra reading the command line
DIVERGED = 3
STORAGE = 4
STORAGE_ERRNOS = {errno.ENOSPC: "no space left on device", errno.EDQUOT: "disk quota exceeded",
                  errno.EROFS: "read-only file system", errno.EIO: "input/output error"}  # fmt: skip
_FULL_ERROR = "HYDRA_FULL_ERROR"
_OURS = "CAMEX_SET_HYDRA_FULL_ERROR"  # marks HYDRA_FULL_ERROR as set by us, not by the user


def say_error(message: str) -> None:
    """`error: <message>` on stderr as one write, newline included: under torchrun every rank
    shares one stderr pipe, and `print` writes the text and its newline separately, so two ranks
    refusing at once could run their lines together."""
    sys.stderr.write(f"error: {message}\n")
    sys.stderr.flush()


def one_line(exc: BaseException) -> str:
    """The message of an exception (and of its cause, for Hydra's wrapped OmegaConf errors) on one
    line, without OmegaConf's `full_key:` / `object_type=` detail lines."""
    parts: list[str] = []
    for e in (exc, exc.__cause__):
        if e is None:
            continue
        for line in str(e).splitlines():
            line = line.strip()
            if line and not line.startswith(("full_key:", "object_type=", "reference_type=")) and line not in parts:
                parts.append(line)
    override = getattr(exc, "override", None)  # Hydra's parse errors name the override apart from the message
    if isinstance(override, str):
        parts.insert(0, f"cannot parse the override {override!r}:")
    text = ""
    for part in parts:
        text += part if not text else (" " if text.endswith((".", ":")) else "; ") + part
    return text or type(exc).__name__


def _chain(exc: BaseException) -> list[BaseException]:
    """The exception and everything it was raised from or while handling, outermost first."""
    seen: list[BaseException] = []
    while exc is not None and exc not in seen:
        seen.append(exc)
        exc = exc.__cause__ or exc.__context__
    return seen


def storage_failure(exc: BaseException) -> str | None:
    """One line for a storage failure anywhere in the chain (MLflow wraps SQLite's and the disk's
    errors in its own), naming the root cause; None when the failure is not about storage."""
    from camex.checkpoints import CheckpointError
    from camex.tracking import StoreError, StoreLost

    chain = _chain(exc)
    for e in chain:  # the real cause first: a full disk under an MLflow, SQLite or safetensors error
        code = e.errno if isinstance(e, OSError) and e.errno in STORAGE_ERRNOS else None
        # libraries that are not Python (safetensors, SQLite) keep only the system's words for it
        code = code or next((c for c in STORAGE_ERRNOS if os.strerror(c) in str(e)), None)
        if code is not None:
            name = getattr(e, "filename", None)
            where = f" ({name})" if name else ""
            return (f"storage failed: {STORAGE_ERRNOS[code]}{where}; free space (or point paths.output_root "
                    "elsewhere) and continue with resume=true")  # fmt: skip
    for e in chain:
        if isinstance(e, (StoreError, StoreLost, CheckpointError)):
            return one_line(e)
    for e in chain:
        module = type(e).__module__
        if module.startswith(("sqlalchemy", "sqlite3", "safetensors")) or (
            module.startswith("requests") and "Connection" in type(e).__name__
        ):
            return f"storage failed: {type(e).__name__}: {one_line(e)}"
    return None


def classify(exc: BaseException, *, composing: bool = False) -> tuple[int, str] | None:
    """(exit status, one-line message) for a failure the user can act on; None for a bug.
    The message is redacted (`camex/redact.py`): a URI password or a secret value never reaches
    the console.

    `composing`: the failure happened while Hydra read the command line, before any camex code
    ran (e.g. `experiment=false`, a group override Hydra refuses with a plain ValueError).
    """
    from camex.redact import redact_text

    known = _classify(exc, composing=composing)
    return None if known is None else (known[0], redact_text(known[1]))


def _classify(exc: BaseException, *, composing: bool) -> tuple[int, str] | None:
    from hydra.errors import HydraException
    from omegaconf.errors import OmegaConfBaseException

    from camex.config import ConfigError
    from camex.faults import RunInterrupted, TrainingDiverged
    from camex.models import ModelError
    from camex.tasks import TaskError

    if isinstance(exc, RunInterrupted):
        return exc.exit_code, str(exc)
    if isinstance(exc, KeyboardInterrupt):  # Ctrl-C before training started: nothing to save
        return 128 + signal.SIGINT, "interrupted"
    if isinstance(exc, TrainingDiverged):
        return DIVERGED, str(exc)
    if isinstance(exc, (ConfigError, TaskError, ModelError)):
        return USER_ERROR, one_line(exc)
    if composing or isinstance(exc, (HydraException, OmegaConfBaseException)):  # a bad override or interpolation
        return USER_ERROR, one_line(exc)
    storage = storage_failure(exc)
    if storage is not None:
        return STORAGE, storage
    return None


def run_cli(main: Callable[[], Any]) -> None:
    """Call a `@hydra.main` function, printing a known failure as one line and exiting with its status.

    Hydra prints composition errors itself over several lines; HYDRA_FULL_ERROR makes it raise them
    to us instead. A user who sets HYDRA_FULL_ERROR gets Hydra's full traceback as usual.
    """
    user_wants_traceback = bool(os.environ.get(_FULL_ERROR)) and not os.environ.get(_OURS)
    if not user_wants_traceback:
        os.environ[_FULL_ERROR] = os.environ[_OURS] = "1"
    global job_started
    job_started = False
    try:
        main()
    except (Exception, KeyboardInterrupt) as e:
        known = None if user_wants_traceback else classify(e, composing=not job_started)
        if known is None:
            raise
        code, message = known
        say_error(message)
        sys.exit(code)
