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
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
import stat
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

from mlflow.entities import Dataset, DatasetInput, InputTag, Metric, Param, RunTag

from cnnclf.args import UsageError
from cnnclf.config import name_error
from sweeps import faults
from sweeps.registry import CODE, REQUIREMENT

SWEEP_KEY = "sweep"
TERMINAL = ("FINISHED", "FAILED", "KILLED")
STATUSES = ("RUNNING", "SCHEDULED", *TERMINAL)
# MLflow error codes that retrying cannot fix; anything else (connection refused, timeouts,
# 5xx, "database is locked") is an outage, and the op waits for the server to come back.
PERMANENT_ERRORS = ("INVALID_PARAMETER_VALUE", "RESOURCE_ALREADY_EXISTS", "RESOURCE_DOES_NOT_EXIST", "BAD_REQUEST")
BATCH = {"metrics": 1000, "params": 100, "tags": 100}  # MLflow's log_batch limits


class JournalError(UsageError):
    """A journal file that is not what a journal writes (not JSON, wrong types, a bad name, a link): exit 2
    with this one line, which names the file."""


class Refused(ValueError):
    """An op naming code other than sweeps/model.py, or a file outside the sweep's own folder: counted and
    written to rejected.jsonl with this reason, never applied (a ValueError: `_permanent`, never retried)."""


def read_meta(folder: Path) -> dict:
    """A sweep's facts ("meta" ops) from its journal folder, read only (nothing opened for writing).
    JournalError when its ops or its state are not what a journal writes: `--resume` and `--sync` call
    this first, so such a journal stops them before anything is written."""
    _, ops, _, _ = _read_journal(Path(folder))
    meta: dict = {}
    for op in ops:
        if op["op"] == "meta":
            meta.update(op["data"])
    return meta


def trial_key(trial_id: str) -> str:
    return f"trial:{trial_id}"


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


class Journal:
    def __init__(self, folder: Path, tracking_uri: str, experiment: str, sweep: str, verbose: bool = True) -> None:
        self.folder, self.tracking_uri, self.experiment, self.sweep = Path(folder), tracking_uri, experiment, sweep
        self.verbose = verbose
        self._full_after = faults.disk_full_after()  # None unless a reliability test injects a full disk
        self.folder.mkdir(parents=True, exist_ok=True)
        self.root = self.folder.absolute().parent.resolve()  # the sweep's own folder: <out>/<sweep>
        self.ops_path, self.state_path = self.folder / "ops.jsonl", self.folder / "state.json"
        self.rejected_path = self.folder / "rejected.jsonl"
        state, ops, good, size = _read_journal(self.folder)
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

    # --- the writer thread --------------------------------------------------------------------

    def start(self) -> None:
        if self._thread is None:
            self._thread = threading.Thread(target=self._run, name="mlflow-journal", daemon=True)
            self._thread.start()

    def flush(self, timeout: float) -> bool:
        """Wait until every op is applied, or `timeout` seconds; True when nothing is left."""
        self.start()
        deadline = time.monotonic() + timeout
        with self._cv:
            while self._pending and time.monotonic() < deadline:
                self._cv.wait(timeout=min(0.5, max(0.01, deadline - time.monotonic())))
            return not self._pending

    def close(self, timeout: float) -> int:
        """Flush for up to `timeout` seconds (when the writer was started), stop it; returns how many
        ops are still spooled."""
        if self._thread is not None:
            self.flush(timeout)
        with self._cv:
            self._stop = True
            self._cv.notify_all()
        if self._thread is not None:
            self._thread.join(timeout=30)
        with contextlib.suppress(OSError):
            self._file.close()
        return len(self._pending)

    def _run(self) -> None:
        backoff = 0.5
        while True:
            with self._cv:
                while not self._pending and not self._stop:
                    self._cv.wait()
                if self._stop:
                    return
                op = self._pending[0]
            try:
                self._apply(op)
            except Exception as e:
                if _permanent(e):
                    self.rejected += 1
                    who = "the journal" if isinstance(e, Refused) else "MLflow"
                    self._say(f"warning: {who} refused a {op['op']} of {op.get('key')}: {_one_line(e)}")
                    self._reject(op, e)
                else:
                    if self.offline_since is None:
                        self.offline_since = time.monotonic()
                        self._say(
                            f"warning: MLflow at {self.tracking_uri} is unreachable ({_one_line(e)[:160]}); training "
                            f"goes on, writes are spooled in {self.ops_path} and retried"
                        )
                    deadline = time.monotonic() + backoff  # new ops notify too: they must not cut the wait short
                    with self._cv:
                        while not self._stop and time.monotonic() < deadline:
                            self._cv.wait(timeout=deadline - time.monotonic())
                        if self._stop:
                            return
                    backoff = min(backoff * 2, 5.0)
                    continue
            if self.offline_since is not None:
                self._say(f"MLflow is reachable again after {time.monotonic() - self.offline_since:.0f} s; catching up")
                self.offline_since = None
            backoff = 0.5
            with self._cv:
                self._pending.pop(0)
                self.applied = op["seq"]
                self._save_state()
                self._cv.notify_all()

    def _say(self, msg: str) -> None:
        if self.verbose:
            print(msg, file=sys.stderr, flush=True)

    def _reject(self, op: dict, e: BaseException) -> None:
        line = json.dumps({**op, "error": _one_line(e)}, default=str) + "\n"
        try:  # O_NOFOLLOW: a link planted at rejected.jsonl is not written through
            fd = os.open(self.rejected_path, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_NOFOLLOW, 0o644)
            with os.fdopen(fd, "a", encoding="utf-8") as f:
                f.write(line)
        except OSError as err:
            self._say(f"warning: cannot write {self.rejected_path} ({err.strerror or err})")

    def _save_state(self) -> None:
        tmp = self.state_path.with_suffix(".tmp")
        state = {"applied": self.applied, "run_ids": self.run_ids, "experiment_id": self.experiment_id}
        with contextlib.suppress(FileNotFoundError):
            tmp.unlink()  # a leftover, or a planted link: never written through
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o644)
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(json.dumps(state))
        os.replace(tmp, self.state_path)

    # --- applying one op to MLflow ------------------------------------------------------------

    @property
    def client(self):
        if self._client is None:
            from mlflow.tracking import MlflowClient

            self._client = MlflowClient(tracking_uri=self.tracking_uri)
        return self._client

    def experiment_id_now(self) -> str:
        """The experiment's id, created in MLflow if it is not there yet."""
        if self.experiment_id is None:
            exp = self.client.get_experiment_by_name(self.experiment)
            if exp is None:
                try:
                    self.experiment_id = self.client.create_experiment(self.experiment)
                except Exception:  # created meanwhile by another process
                    self.experiment_id = self.client.get_experiment_by_name(self.experiment).experiment_id
            else:
                self.experiment_id = exp.experiment_id
        return self.experiment_id

    def _run_id(self, key: str) -> str:
        if key not in self.run_ids:
            raise RuntimeError(f"MLflow run {key!r} was never created")  # a bug: create_run comes first
        return self.run_ids[key]

    def _apply(self, op: dict) -> None:

        kind, key, c = op["op"], op.get("key"), self.client
        if kind in ("meta", "alias"):
            return
        if kind == "create_run":
            if key in self.run_ids:
                return  # applied whole before: run_ids gets the key only once the params are in
            exp = self.experiment_id_now()
            marker = f"{self.sweep}/{key}"
            found = c.search_runs([exp], f"tags.`cnnclf.key` = '{marker}'", max_results=1)
            if found:  # created before a crash or a lost reply: the same run, its params maybe cut short
                run_id, existing = found[0].info.run_id, found[0].data.params
            else:
                tags = {**op.get("tags", {}), "cnnclf.key": marker}
                if key != SWEEP_KEY:
                    tags["mlflow.parentRunId"] = self._run_id(SWEEP_KEY)
                run_id = c.create_run(exp, start_time=op["ts"], tags=tags, run_name=op.get("name")).info.run_id
                existing = {}
            params = [Param(k, str(v)[:6000]) for k, v in sorted(op.get("params", {}).items()) if k not in existing]
            for i in range(0, len(params), BATCH["params"]):
                c.log_batch(run_id, params=params[i : i + BATCH["params"]])
            self.run_ids[key] = run_id  # only now: a retry of this op completes the params
        elif kind == "log":
            run_id = self._run_id(key)
            metrics = [Metric(k, v, ts, step) for k, v, ts, step in op.get("metrics", [])]
            params = [Param(k, str(v)[:6000]) for k, v in op.get("params", [])]
            if params:  # params are write-once: a resumed sweep may log one it logged before
                existing = c.get_run(run_id).data.params
                params = [p for p in params if p.key not in existing]
            tags = [RunTag(k, str(v)[:5000]) for k, v in op.get("tags", [])]
            for name, items in (("metrics", metrics), ("params", params), ("tags", tags)):
                for i in range(0, len(items), BATCH[name]):
                    c.log_batch(run_id, **{name: items[i : i + BATCH[name]]})
        elif kind == "status":
            run_id = self._run_id(key)
            if op["status"] in TERMINAL:
                c.set_terminated(run_id, status=op["status"], end_time=op["ts"])
            else:
                c.update_run(run_id, status=op["status"])
        elif kind == "inputs":  # datasets: the Datasets column and filter of MLflow's runs table
            c.log_inputs(self._run_id(key), datasets=[_dataset_input(d) for d in op["datasets"]])
        elif kind == "experiment_tags":
            for k, v in op["tags"].items():
                c.set_experiment_tag(self.experiment_id_now(), k, str(v)[:5000])
        elif kind == "artifact":
            path = self.inside(op["path"])
            if not path.exists():
                raise FileNotFoundError(f"{path} is gone; it cannot be logged")
            if not path.is_file():
                raise Refused(f"{path} is not a file")
            c.log_artifact(self._run_id(key), str(path), op.get("dir"))
        elif kind == "model":  # a pyfunc model from code (sweeps/model.py builds the op), logged once per run
            from sweeps.registry import log_model

            log_model(self, self._run_id(key), self._model_op(op))
        else:
            raise ValueError(f"unknown journal op {kind!r}")

    def inside(self, path: str) -> Path:
        """`path` (relative: to the sweep's folder) with every link resolved; Refused unless that is inside
        the sweep's own folder, `<out>/<sweep>/`."""
        real = (self.root / path).resolve()
        if not real.is_relative_to(self.root):
            via = f" (a link to {real})" if real != Path(os.path.abspath(self.root / path)) else ""
            raise Refused(f"{path}{via} is outside the sweep's folder {self.root}")
        return real

    def _model_op(self, op: dict) -> dict:
        """A "model" op as it is logged: its code is sweeps/model.py (any other file named is Refused, never
        run), its checkpoint and input example are files inside the sweep's folder, and its requirements pin
        only the packages that code imports (they are installed wherever the model is served)."""

        if (self.root / op.get("code", CODE)).resolve() != CODE:
            raise Refused(f"a model's code is {CODE}, not {op['code']}")
        if bad := [r for r in op["requirements"] if not REQUIREMENT.fullmatch(r)]:
            raise Refused(f"a model's requirements pin only what {CODE.name} imports, not {bad[0]!r}")
        return {
            **op,
            "code": str(CODE),
            "checkpoint": str(self.inside(op["checkpoint"])),
            "example": str(self.inside(op["example"])),
        }


# --- reading the journal's files back: data, checked before any of it is used ---------------------


def _read_file(path: Path) -> bytes | None:
    """A journal file's bytes (None when there is none); JournalError for a link (a journal's files are its
    own: a link would read, append to or truncate another file) or anything else not a readable file."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC)
    except FileNotFoundError:
        return None
    except OSError as e:
        if e.errno == errno.ELOOP:
            raise JournalError(f"{path}: a symbolic link, not the journal's own file") from None
        raise JournalError(f"{path}: cannot be read ({e.strerror})") from None
    with os.fdopen(fd, "rb") as f:
        if not stat.S_ISREG(os.fstat(f.fileno()).st_mode):
            raise JournalError(f"{path}: not a regular file")
        return f.read()


def _read_journal(folder: Path) -> tuple[dict, list[dict], int, int]:
    """(state, ops, bytes of the whole lines they fill, ops.jsonl's size), each checked. The state is read
    first: every op it counts as applied was on file before it was written, even while a sweep runs."""
    state = _read_file(folder / "state.json")
    ops, good, size = _read_ops(folder / "ops.jsonl")
    return _check_state(folder / "state.json", state, ops), ops, good, size


def _read_ops(path: Path) -> tuple[list[dict], int, int]:
    """(ops, bytes of the whole lines they fill, the file's size). A last line a kill cut short (no
    newline, or not JSON, with no op after it) was never acknowledged, and is left out; anything else
    that is not an op as the journal writes it is a JournalError naming the file and line."""
    data = _read_file(path) or b""
    lines = data.splitlines(keepends=True)
    ops: list[dict] = []
    good = 0
    for n, line in enumerate(lines, 1):
        try:
            op = json.loads(line) if line.endswith(b"\n") else None
        except ValueError:
            op = None
        if op is None:
            if any(_is_json(later) for later in lines[n:]):
                raise JournalError(f"{path} line {n}: not a journal op (not JSON), and ops follow it")
            break  # a torn tail
        try:
            _check_op(op)
            if ops and op["seq"] <= ops[-1]["seq"]:
                raise ValueError(f"seq {op['seq']} after {ops[-1]['seq']}")
        except ValueError as e:
            raise JournalError(f"{path} line {n}: not a journal op ({e})") from None
        ops.append(op)
        good += len(line)
    return ops, good, len(data)


def _check_state(path: Path, data: bytes | None, ops: list[dict]) -> dict:
    """state.json's `data`, checked against the ops it counts; JournalError naming it when it is not the journal's."""
    if data is None:
        return {}
    try:
        state = json.loads(data)
        if not isinstance(state, dict):
            raise ValueError("not a JSON object")
        applied, run_ids = state.get("applied", 0), state.get("run_ids", {})
        last = ops[-1]["seq"] if ops else 0
        if not (_int(applied) and 0 <= applied <= last):
            raise ValueError(f"applied {applied!r}, and the ops end at {last}")
        if not (isinstance(run_ids, dict) and all(isinstance(v, str) for v in run_ids.values())):
            raise ValueError("run_ids is not an object of run ids")
        for key in run_ids:
            _key(key)
        if not isinstance(state.get("experiment_id"), str | None):
            raise ValueError("experiment_id is not a string")
    except ValueError as e:  # json's own errors too
        why = _one_line(e) if isinstance(e, json.JSONDecodeError) else str(e)
        raise JournalError(
            f"{path}: not the journal's state ({why}); remove it to replay every op (replays are harmless)"
        ) from None
    return state


NAME_TAGS = ("sweep", "trial_id", "previous_trial_id", "confirm_of", "best.trial_id")  # tags whose values are names
KEYED = ("create_run", "log", "status", "inputs", "artifact", "model", "alias")  # ops on one run


def _check_op(op) -> None:
    """ValueError saying what is wrong with `op` as read back: its shape (what `_index` and `_apply` use),
    and every name in it that becomes a path or a tag, checked as the flags are."""
    if not isinstance(op, dict) or not _int(op.get("seq")) or not isinstance(op.get("op"), str):
        raise ValueError("not an object with an integer seq and an op name")
    kind, get = op["op"], op.get
    if kind in KEYED or "key" in op:
        _key(get("key"))
    if kind == "meta":
        _check_meta(get("data"))
    elif kind == "create_run":
        _need(
            _int(get("ts")) and isinstance(get("tags", {}), dict) and isinstance(get("params", {}), dict),
            "bad ts, tags or params",
        )
        _name(get("name"), "the run's name", empty=True)
        _tags(get("tags", {}).items())
        if op["key"] != SWEEP_KEY:
            _name(get("trial_id"), "trial_id")
            _need(op["key"] == trial_key(op["trial_id"]), f"key {op['key']!r} is not its trial's")
            _need(isinstance(get("config"), dict), "bad config")
            _name(op["config"].get("confirm_of"), "confirm_of", empty=True)
            _name(get("experiment"), "experiment", empty=True)
    elif kind == "log":
        metrics = _rows(get("metrics"), "metrics", 4)
        _need(all(_num(v) and _int(ts) and _int(step) for _, v, ts, step in metrics), "bad metrics")
        _rows(get("params"), "params", 2)
        _tags(_rows(get("tags"), "tags", 2))
    elif kind == "status":
        _need(get("status") in STATUSES and (get("status") not in TERMINAL or _int(get("ts"))), "bad status")
    elif kind == "inputs":
        _check_datasets(get("datasets"))
    elif kind == "experiment_tags":
        _need(isinstance(get("tags"), dict), "bad tags")
    elif kind == "artifact":
        _need(isinstance(get("path"), str), "bad path")
        if get("dir") is not None:  # a folder of the run's artifacts
            _need(isinstance(get("dir"), str), "bad dir")
            for part in op["dir"].split("/"):
                _name(part, "dir")
    elif kind == "model":
        _name(get("name"), "the model's name")
        _name(get("register"), "register", empty=True)
        files = [get(f) for f in ("code", "checkpoint", "example") if f in op or f != "code"]
        _need(all(isinstance(f, str) for f in files), "bad code, checkpoint or example")
        _need(
            isinstance(get("requirements"), list) and all(isinstance(r, str) for r in op["requirements"]),
            "bad requirements",
        )
        _need(isinstance(get("signature"), dict) and isinstance(get("metadata"), dict), "bad signature or metadata")
        _need(isinstance(get("params"), dict | None), "bad params")
        _need(
            all(isinstance(get(f), str | None) for f in ("digest", "model_type", "metric_prefix")),
            "bad digest, model_type or metric_prefix",
        )
    elif kind == "alias":
        _need(op["key"] != SWEEP_KEY, "an alias of the sweep's run")
        _name(get("trial_id"), "trial_id")


def _check_meta(data) -> None:
    _need(isinstance(data, dict), "bad data")
    _need(all(isinstance(data.get(k, ""), str) for k in ("tracking_uri", "task")), "bad tracking_uri or task")
    if "experiment" in data:  # an MLflow experiment's name, as --experiment takes it
        e = data["experiment"]
        _need(isinstance(e, str) and e.strip() != "" and e.isprintable() and len(e) <= 500, "bad experiment")
    phases = data.get("phases", [])
    _need(isinstance(phases, list) and all(_int(n) and n > 0 for n in phases), "bad phases")
    _need(isinstance(data.get("provenance", {}), dict), "bad provenance")
    if data.get("datasets") is not None:
        _check_datasets(data["datasets"])
    if data.get("warm_start") is not None:
        warm = data["warm_start"]
        _need(
            isinstance(warm, dict) and isinstance(warm.get("file"), str) and isinstance(warm.get("sources"), list),
            "bad warm_start",
        )
        for source in warm["sources"]:
            _name(source, "warm_start source")


def _check_datasets(datasets) -> None:
    fields = ("name", "digest", "source_type", "source", "context")
    ok = isinstance(datasets, list) and all(
        isinstance(d, dict) and all(isinstance(d.get(f), str) for f in fields) for d in datasets
    )
    _need(ok, "bad datasets")


def _key(key) -> None:
    """A run key: "sweep", or "trial:<trial id>" with a valid name as its id."""
    if key != SWEEP_KEY:
        _need(isinstance(key, str) and key.startswith("trial:"), f"key {key!r} is neither {SWEEP_KEY!r} nor trial:<id>")
        _name(key.removeprefix("trial:"), "the key's trial id")


def _name(value, what: str, empty: bool = False) -> None:
    if empty and value in (None, ""):
        return
    _need(isinstance(value, str), f"{what} is not a string")
    if why := name_error(value):
        raise ValueError(f"{what}: {why}")


def _tags(pairs) -> None:
    for k, v in pairs:
        if k in NAME_TAGS:
            _name(v, f"tag {k}")


def _rows(value, what: str, width: int) -> list:
    rows = [] if value is None else value
    ok = isinstance(rows, list) and all(isinstance(r, list) and len(r) == width and isinstance(r[0], str) for r in rows)
    _need(ok, f"bad {what}")
    return rows


def _need(ok: bool, what: str) -> None:
    if not ok:
        raise ValueError(what)


def _int(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _num(v) -> bool:
    return _int(v) or isinstance(v, float)


def _is_json(line: bytes) -> bool:
    try:
        json.loads(line)
    except ValueError:
        return False
    return True


def _dataset_input(d: dict):

    fields = {k: d[k] for k in ("name", "digest", "source_type", "source", "schema", "profile") if k in d}
    return DatasetInput(Dataset(**fields), [InputTag("mlflow.data.context", d["context"])])


def _one_line(e: BaseException) -> str:
    text = str(e).strip().splitlines()
    return f"{type(e).__name__}: {text[0] if text else ''}"[:300]


def _permanent(e: BaseException) -> bool:
    if isinstance(e, FileNotFoundError | ValueError | RuntimeError) and not _is_mlflow(e):
        return True
    return _is_mlflow(e) and getattr(e, "error_code", "") in PERMANENT_ERRORS


def _is_mlflow(e: BaseException) -> bool:
    return type(e).__module__.startswith("mlflow")


def now_ms() -> int:
    return int(time.time() * 1000)
