"""Fault injection for the reliability tests; inert unless `CNNCLF_FAULTS` is set.

`CNNCLF_FAULTS` holds a JSON list of faults. The driver reads it once and hands it to every
trial (through `tune.with_parameters`, so it reaches workers on any node). Each fault:

    {"kind": "raise" | "oom" | "kill" | "sleep",
     "at": "epoch_end" | "checkpoint" | "probe" | "start",   # after an epoch's metrics / inside the checkpoint
                                           # write / in the cost guard's probe, as if the timed steps took longer
                                           # (epoch 0) / as the trial's worker starts, before any import (epoch 0)
     "epoch": 2,                            # optional: only at this epoch
     "match": {"role": "trial", "batch_size": [">=", 64]},   # optional: on the trial's config
     "once": "/tmp/marker",                 # optional: fire only if this file is absent (then create it)
     "marker": "/tmp/writing",              # sleep: touch this file first (the test waits for it)
     "seconds": 30}                         # sleep: how long

`kill` is a real SIGKILL of the trial's worker process; `oom` raises torch's own
`OutOfMemoryError`; `raise` a RuntimeError. One fault acts in the driver instead:
`{"kind": "disk_full", "at": "journal", "after": 40}` makes the sweep's journal fail every write
after its 40th op with `OSError(ENOSPC)`, as a full `--out` disk does.
"""

from __future__ import annotations

import json
import os
import signal
import time
from pathlib import Path

ENV = "CNNCLF_FAULTS"
KINDS = ("raise", "oom", "kill", "sleep", "disk_full")
POINTS = ("epoch_end", "checkpoint", "probe", "start", "journal")


def load() -> list[dict]:
    """The faults in $CNNCLF_FAULTS (empty when unset); ValueError with a one-line reason when malformed."""
    raw = os.environ.get(ENV, "").strip()
    if not raw:
        return []
    try:
        faults = json.loads(raw)
    except json.JSONDecodeError as e:
        raise ValueError(f"{ENV} is not valid JSON ({e})") from None
    if not isinstance(faults, list) or not all(isinstance(f, dict) for f in faults):
        raise ValueError(f"{ENV} must be a JSON list of objects")
    for f in faults:
        if f.get("kind") not in KINDS or f.get("at", "epoch_end") not in POINTS:
            raise ValueError(f"{ENV}: unknown fault {f!r}; kinds {KINDS}, points {POINTS}")
    return faults


def disk_full_after() -> int | None:
    """The journal op after which every journal write fails as on a full disk; None without that fault."""
    try:
        faults = load()
    except ValueError:
        return None  # the driver refuses a malformed $CNNCLF_FAULTS itself, with one line
    found = [int(f.get("after", 0)) for f in faults if f["kind"] == "disk_full" and f.get("at") == "journal"]
    return min(found) if found else None


def _matches(match: dict, config: dict) -> bool:
    for k, want in match.items():
        have = config.get(k)
        if isinstance(want, list):
            op, value = want
            if have is None or not (have >= value if op == ">=" else have <= value):
                return False
        elif have != want:
            return False
    return True


def fire(faults: list[dict], at: str, config: dict, epoch: int) -> None:
    for f in faults:
        if f.get("at", "epoch_end") != at or f.get("epoch", epoch) != epoch or not _matches(f.get("match", {}), config):
            continue
        once = f.get("once")
        if once:
            if Path(once).exists():
                continue
            Path(once).touch()
        kind = f["kind"]
        if kind == "raise":
            raise RuntimeError(f"injected fault at epoch {epoch}")
        if kind == "oom":
            import torch

            raise torch.OutOfMemoryError(f"CUDA out of memory (injected at epoch {epoch})")
        if kind == "kill":
            os.kill(os.getpid(), signal.SIGKILL)
        if kind == "sleep":
            if f.get("marker"):
                Path(f["marker"]).touch()
            time.sleep(float(f.get("seconds", 30)))
