"""The Ray session of a sweep: started here or joined at --address (within --connect-timeout), SIGTERM
handled as Ctrl-C, MLflow's own HTTP retries off (the journal retries)."""

from __future__ import annotations

import errno
import logging
import os
import signal
import threading
from pathlib import Path


def disk_error(e: BaseException | None) -> OSError | None:
    """The full or read-only disk behind an exception, following its causes; None when there is none."""
    seen = 0
    while e is not None and seen < 20:
        if isinstance(e, OSError) and e.errno in (errno.ENOSPC, errno.EDQUOT, errno.EROFS):
            return e
        e, seen = e.__cause__ or e.__context__, seen + 1
    return None


class SweepFailed(Exception):
    """The sweep stopped on an unexpected error: its one-line cause, where the traceback is, how to resume."""


LOG_NAME = "sweep.log"  # beside the sweep's journal, in --out/<name>/
NOISY = ("ray", "mlflow", "optuna", "sweeps")  # loggers whose messages go to the log file instead of the console


def log_to_file(path: Path) -> Path:
    """Ray's, Tune's, MLflow's and Optuna's log records go to `path` (appended: a resumed sweep adds to it), not
    the console: their INFO lines, token warnings and a failed trial's traceback. The sweep's own lines
    (progress, outcomes, one-line errors) are printed."""
    path.parent.mkdir(parents=True, exist_ok=True)
    handler = logging.FileHandler(path, encoding="utf-8")
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    for name in NOISY:
        logger = logging.getLogger(name)
        for old in list(logger.handlers):
            logger.removeHandler(old)
        logger.addHandler(handler)
        logger.propagate = False
    return path


def sigterm_as_sigint() -> None:
    """SIGTERM (`kill`, `timeout`, `ray job stop`) takes Ctrl-C's path: trials stop, state is saved,
    runs are closed as KILLED, and the resume command is printed. A second signal is not softened."""

    def handler(signum, frame) -> None:
        signal.signal(signal.SIGTERM, signal.SIG_DFL)
        os.kill(os.getpid(), signal.SIGINT)

    if threading.current_thread() is threading.main_thread():  # signal handlers are the main thread's
        signal.signal(signal.SIGTERM, handler)


def quiet_mlflow_http() -> None:
    # The journal retries on its own, forever and in the background; MLflow's own retries
    # (7, with exponential backoff) would only hide an outage for minutes.
    os.environ.setdefault("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
    os.environ.setdefault("MLFLOW_HTTP_REQUEST_TIMEOUT", "15")
    # The logged model's input-example check downloads one artifact with a progress bar on the console.
    os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")
