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
"""

from __future__ import annotations

import contextlib
import json
import os
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

SWEEP_KEY = "sweep"
TERMINAL = ("FINISHED", "FAILED", "KILLED")
# MLflow error codes that retrying cannot fix; anything else (connection refused, timeouts,
# 5xx, "database is locked") is an outage, and the op waits for the server to come back.
PERMANENT_ERRORS = ("INVALID_PARAMETER_VALUE", "RESOURCE_ALREADY_EXISTS", "RESOURCE_DOES_NOT_EXIST", "BAD_REQUEST")
BATCH = {"metrics": 1000, "params": 100, "tags": 100}  # MLflow's log_batch limits


_LIVE: dict[Path, Journal] = {}  # folder -> the journal this process opened on it


def live(folder: Path) -> Journal:
    """The journal this driver opened on `folder` (it opens each before any Tuner starts)."""
    return _LIVE[Path(folder).resolve()]


def read_meta(folder: Path) -> dict:
    """A sweep's facts ("meta" ops) from its journal folder, read only (nothing opened for writing)."""
    meta: dict = {}
    path = Path(folder) / "ops.jsonl"
    lines = path.read_bytes().splitlines(keepends=True) if path.is_file() else []
    for line in lines:
        try:
            op = json.loads(line) if line.endswith(b"\n") else None
        except ValueError:
            op = None
        if op is None:
            break  # a line a kill cut short, and anything after it (as the journal itself reads it)
        if op.get("op") == "meta":
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
        self.folder.mkdir(parents=True, exist_ok=True)
        self.ops_path, self.state_path = self.folder / "ops.jsonl", self.folder / "state.json"
        self.rejected_path = self.folder / "rejected.jsonl"
        state = json.loads(self.state_path.read_text()) if self.state_path.exists() else {}
        self.applied: int = state.get("applied", 0)
        self.run_ids: dict[str, str] = state.get("run_ids", {})
        self.experiment_id: str | None = state.get("experiment_id")
        self.trials: dict[str, TrialEntry] = {}
        self.aliases: dict[str, str] = {}  # Tune trial id -> key of the entry it continues
        self.meta: dict = {}  # "meta" ops: the sweep's own facts (tracking uri, flags)
        self.sweep_created = False
        self.seq = 0
        self._pending: list[dict] = []
        for op in self._read_ops():
            self.seq = op["seq"]
            self._index(op)
            if op["seq"] > self.applied:
                self._pending.append(op)
        self._file = open(self.ops_path, "a", encoding="utf-8")  # noqa: SIM115 (open for the journal's life)
        self._cv = threading.Condition()
        self._thread: threading.Thread | None = None
        self._stop = False
        self.offline_since: float | None = None
        self.rejected = 0
        self._client = None
        self.logged_models: dict[str, str] = {}  # "model" ops applied in this process: name -> model id
        self.registered: dict[str, str] = {}  # and their registered versions: registered name -> version
        _LIVE[self.folder.resolve()] = self  # what callbacks that Tune unpickled on --resume write through

    # --- the ledger ---------------------------------------------------------------------------

    def _read_ops(self) -> list[dict]:
        """The ops on file, in one pass. A line a kill left half-written (no newline, or not JSON) was
        never acknowledged to anyone: it and anything after it are cut, so the ops appended next
        start on a line of their own."""
        if not self.ops_path.exists():
            return []
        data = self.ops_path.read_bytes()
        ops, good = [], 0
        for line in data.splitlines(keepends=True):
            if not line.endswith(b"\n"):
                break
            try:
                ops.append(json.loads(line))
            except ValueError:
                break
            good += len(line)
        if good < len(data):
            with open(self.ops_path, "r+b") as f:
                f.truncate(good)
        return ops

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
                    self._say(f"warning: MLflow refused a {op['op']} of {op.get('key')}: {_one_line(e)}")
                    with open(self.rejected_path, "a", encoding="utf-8") as f:
                        f.write(json.dumps({**op, "error": _one_line(e)}, default=str) + "\n")
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

    def _save_state(self) -> None:
        tmp = self.state_path.with_suffix(".tmp")
        state = {"applied": self.applied, "run_ids": self.run_ids, "experiment_id": self.experiment_id}
        tmp.write_text(json.dumps(state))
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
        from mlflow.entities import Metric, Param, RunTag

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
            path = Path(op["path"])
            if not path.exists():
                raise FileNotFoundError(f"{path} is gone; it cannot be logged")
            c.log_artifact(self._run_id(key), str(path), op.get("dir"))
        elif kind == "model":  # a pyfunc model from code (sweeps/model.py builds the op), logged once per run
            from sweeps.registry import log_model

            log_model(self, self._run_id(key), op)
        else:
            raise ValueError(f"unknown journal op {kind!r}")


def _dataset_input(d: dict):
    from mlflow.entities import Dataset, DatasetInput, InputTag

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
