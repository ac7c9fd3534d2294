"""The sweep's journal: every MLflow write is made durable on local disk first, then applied by one
background thread of the driver, so a slow or unreachable tracking server never stalls training
and a killed driver loses nothing.

    <out>/<sweep>/journal/ops.jsonl       append-only, one numbered JSON op per line
    <out>/<sweep>/journal/state.json      how far the ops were applied; run key -> MLflow run id
    <out>/<sweep>/journal/rejected.jsonl  ops the server refused (bad values), with the reason

Ops name runs by key ("sweep", "trial:<trial_id>"), not by MLflow run id, because a run may have
to be created while the server is down. Replaying an op is harmless: runs are found again by
their `cnnclf.key` tag, metrics carry their original timestamps (MLflow merges exact repeats),
and tags and statuses are overwritten with the same values.

The ops are also the sweep's ledger (`Journal.trials`): which trials started with which config
and storage folder, the last epoch each logged, and how each ended. `--resume` reconciles Ray's
restored state with it (trials that began after Tune's last snapshot are adopted, not rerun),
and `--sync` replays what a sweep could not write.

What is read back is data, never trusted like code (docs/security.md): a "model" op always logs
sweeps/model.py whatever code it names, an op's files (an artifact, a model's checkpoint and input
example) must resolve, links followed, inside the sweep's own folder (the journal folder's parent),
or the op is refused (`Refused`: counted and written to rejected.jsonl like a write MLflow refused,
never applied), and every name in an op that becomes a path or a tag is checked as the flags are
(`cnnclf.config.name_error`). Files that are not what a journal writes (not JSON, wrong types, a
link) are a `JournalError`: exit 2 with one line naming the file, before anything is written.

The ledger is here: the ops, their index, the durable append, a torn last line repaired. The writer thread
that applies the ops to MLflow is sweeps/journal_writer.py (`MLflowWriter`, Journal's base); the checks of
what is read back are sweeps/journal_checks.py.
"""

from __future__ import annotations

import errno
import json
import os
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

from sweeps import faults
from sweeps.journal_checks import (
    SWEEP_KEY,
    TERMINAL,
    Refused,  # noqa: F401 (imported from here, as before the split)
    read_journal,
    read_meta,  # noqa: F401 (imported from here, as before: it reads without MLflow from journal_checks)
    trial_key,
)
from sweeps.journal_writer import MLflowWriter


@dataclass
class TrialEntry:
    """What the journal knows of one trial (one child run)."""

    key: str
    trial_id: str
    config: dict  # the Tune config the trial was started with
    last_step: int = 0  # last epoch whose metrics were journaled
    status: str | None = None  # MLflow status of its last terminal op, None while open
    adopted_by: list[str] = field(default_factory=list)  # later Tune trial ids that continued it
    experiment: str | None = None  # the Tune experiment it ran in (None: a journal from before extensions)


class Journal(MLflowWriter):
    def __init__(self, folder: Path, tracking_uri: str, experiment: str, sweep: str, verbose: bool = True) -> None:
        self.folder, self.tracking_uri, self.experiment, self.sweep = Path(folder), tracking_uri, experiment, sweep
        self.verbose = verbose
        self._full_after = faults.disk_full_after()  # None unless a reliability test injects a full disk
        self.folder.mkdir(parents=True, exist_ok=True)
        self.root = self.folder.absolute().parent.resolve()  # the sweep's own folder: <out>/<sweep>
        self.ops_path, self.state_path = self.folder / "ops.jsonl", self.folder / "state.json"
        self.rejected_path = self.folder / "rejected.jsonl"
        state, ops, good, size = read_journal(self.folder)
        self.applied: int = state.get("applied", 0)
        self.run_ids: dict[str, str] = state.get("run_ids", {})
        self.experiment_id: str | None = state.get("experiment_id")
        self.trials: dict[str, TrialEntry] = {}
        self.aliases: dict[str, str] = {}  # Tune trial id -> key of the entry it continues
        self.meta: dict = {}  # "meta" ops: the sweep's own facts (tracking uri, flags)
        self.sweep_created = False
        self.seq = 0
        self._pending: list[dict] = []
        for op in ops:
            self.seq = op["seq"]
            self._index(op)
            if op["seq"] > self.applied:
                self._pending.append(op)
        fd = os.open(self.ops_path, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC, 0o644)
        if good < size:  # a line a kill left half-written was never acknowledged: the next op starts a line
            os.ftruncate(fd, good)
        self._file = os.fdopen(fd, "a", encoding="utf-8")  # open for the journal's life
        self._cv = threading.Condition()
        self._thread: threading.Thread | None = None
        self._stop = False
        self.offline_since: float | None = None
        self.rejected = 0
        self._client = None
        self.logged_models: dict[str, str] = {}  # "model" ops applied in this process: name -> model id
        self.registered: dict[str, str] = {}  # and their registered versions: registered name -> version

    # --- the ledger ---------------------------------------------------------------------------

    def _index(self, op: dict) -> None:
        kind, key = op["op"], op.get("key")
        if kind == "meta":
            self.meta.update(op["data"])
        elif kind == "create_run" and key == SWEEP_KEY:
            self.sweep_created = True
        elif kind == "create_run" and key != SWEEP_KEY and key not in self.trials:
            self.trials[key] = TrialEntry(key, op["trial_id"], op["config"], experiment=op.get("experiment"))
        elif kind == "log" and key in self.trials:
            steps = [m[3] for m in op.get("metrics", [])]
            self.trials[key].last_step = max([self.trials[key].last_step, *steps])
        elif kind == "status" and key in self.trials:
            self.trials[key].status = op["status"] if op["status"] in TERMINAL else None
        elif kind == "alias":
            self.aliases[op["trial_id"]] = key
            if key in self.trials:
                self.trials[key].adopted_by.append(op["trial_id"])

    def has_run(self, key: str) -> bool:
        return self.sweep_created if key == SWEEP_KEY else key in self.trials

    def key_of(self, trial_id: str) -> str:
        return self.aliases.get(trial_id, trial_key(trial_id))

    def finished_trial_ids(self) -> frozenset[str]:
        """Tune ids of trials whose runs ended FINISHED (completed, or stopped by ASHA)."""
        ended = [t for t in self.trials.values() if t.status == "FINISHED"]
        return frozenset(i for t in ended for i in (t.trial_id, *t.adopted_by))

    def open_trials(self) -> list[TrialEntry]:
        return [t for t in self.trials.values() if t.status is None]

    # --- writing ops --------------------------------------------------------------------------

    def append(self, op: str, key: str | None = None, **data) -> None:
        """Make the op durable (the ops file), update the ledger, and queue it for the writer."""
        with self._cv:
            if self._full_after is not None and self.seq >= self._full_after:  # sweeps/faults.py: disk_full
                raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(self.ops_path))
            self.seq += 1
            entry = {"seq": self.seq, "op": op, **({"key": key} if key is not None else {}), **data}
            self._file.write(json.dumps(entry, default=str) + "\n")
            self._file.flush()
            self._index(entry)
            self._pending.append(entry)
            self._cv.notify_all()

    def pending(self) -> int:
        with self._cv:
            return len(self._pending)


def now_ms() -> int:
    return int(time.time() * 1000)
