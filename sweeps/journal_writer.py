"""The journal's writer (sweeps/journal.py): one background thread of the driver applies the journaled ops to
MLflow in order, in batches of MLflow's limits. An outage (connection refused, timeouts, 5xx, "database is
locked") is retried with a backoff until the server is back, while training goes on; a write MLflow refuses
(a bad value) or the journal refuses (`Refused`: code other than sweeps/model.py, a file outside the sweep's
folder) is counted, written to rejected.jsonl with its reason, and never retried.
"""

from __future__ import annotations

import contextlib
import json
import os
import sys
import threading
import time
from pathlib import Path

from mlflow.entities import Dataset, DatasetInput, InputTag, Metric, Param, RunTag

from cnnclf.files import atomic_write
from sweeps.journal_checks import SWEEP_KEY, TERMINAL, Refused, one_line
from sweeps.registry import CODE, REQUIREMENT

# MLflow error codes that retrying cannot fix; anything else (connection refused, timeouts,
# 5xx, "database is locked") is an outage, and the op waits for the server to come back.
PERMANENT_ERRORS = ("INVALID_PARAMETER_VALUE", "RESOURCE_ALREADY_EXISTS", "RESOURCE_DOES_NOT_EXIST", "BAD_REQUEST")
BATCH = {"metrics": 1000, "params": 100, "tags": 100}  # MLflow's log_batch limits


class MLflowWriter:
    """The half of a `Journal` that applies its ops to MLflow: the writer thread, its retries, the state file.
    It works on the Journal's own attributes (its ops queue `_pending` under `_cv`, `run_ids`, `applied`, ...),
    which `Journal.__init__` sets."""

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
                    self._say(f"warning: {who} refused a {op['op']} of {op.get('key')}: {one_line(e)}")
                    self._reject(op, e)
                else:
                    if self.offline_since is None:
                        self.offline_since = time.monotonic()
                        self._say(
                            f"warning: MLflow at {self.tracking_uri} is unreachable ({one_line(e)[:160]}); training "
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
        line = json.dumps({**op, "error": one_line(e)}, default=str) + "\n"
        try:  # O_NOFOLLOW: a link planted at rejected.jsonl is not written through
            fd = os.open(self.rejected_path, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_NOFOLLOW, 0o644)
            with os.fdopen(fd, "a", encoding="utf-8") as f:
                f.write(line)
        except OSError as err:
            self._say(f"warning: cannot write {self.rejected_path} ({err.strerror or err})")

    def _save_state(self) -> None:
        state = {"applied": self.applied, "run_ids": self.run_ids, "experiment_id": self.experiment_id}
        # After every applied op, under the lock `append` waits on: no fsync (a state file older than the ops only
        # replays some, which MLflow takes twice as the same values). A leftover temp or planted link goes first.
        with atomic_write(self.state_path, durable=False) as tmp:
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o644)
            with os.fdopen(fd, "w", encoding="utf-8") as f:
                f.write(json.dumps(state))

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


def _dataset_input(d: dict):

    fields = {k: d[k] for k in ("name", "digest", "source_type", "source", "schema", "profile") if k in d}
    return DatasetInput(Dataset(**fields), [InputTag("mlflow.data.context", d["context"])])


def _permanent(e: BaseException) -> bool:
    if isinstance(e, FileNotFoundError | ValueError | RuntimeError) and not _is_mlflow(e):
        return True
    return _is_mlflow(e) and getattr(e, "error_code", "") in PERMANENT_ERRORS


def _is_mlflow(e: BaseException) -> bool:
    return type(e).__module__.startswith("mlflow")
