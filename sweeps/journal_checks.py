"""The journal's ops as they are read back (sweeps/journal.py): data, never trusted like code (docs/security.md).
Every op and the state file are checked for the shape the journal's ledger and writer use, and every name in
them that becomes a path or a tag is checked as the flags are (`cnnclf.config.name_error`); a file that is not
what a journal writes is a `JournalError` (exit 2, one line naming it). Also the run keys and statuses that
ops carry, shared by the ledger and the writer.
"""

from __future__ import annotations

import errno
import json
import os
import stat
from pathlib import Path

from cnnclf.args import UsageError
from cnnclf.config import name_error

SWEEP_KEY = "sweep"
TERMINAL = ("FINISHED", "FAILED", "KILLED")
STATUSES = ("RUNNING", "SCHEDULED", *TERMINAL)


class JournalError(UsageError):
    """A journal file that is not what a journal writes (not JSON, wrong types, a bad name, a link): exit 2
    with this one line, which names the file."""


class Refused(ValueError):
    """An op naming code other than sweeps/model.py, or a file outside the sweep's own folder: counted and
    written to rejected.jsonl with this reason, never applied (a ValueError: `permanent`, never retried)."""


def trial_key(trial_id: str) -> str:
    return f"trial:{trial_id}"


def check_state(path: Path, data: bytes | None, ops: list[dict]) -> dict:
    """state.json's `data`, checked against the ops it counts; JournalError naming it when it is not the journal's."""
    if data is None:
        return {}
    try:
        state = json.loads(data)
        if not isinstance(state, dict):
            raise ValueError("not a JSON object")
        applied, run_ids = state.get("applied", 0), state.get("run_ids", {})
        last = ops[-1]["seq"] if ops else 0
        if not (is_int(applied) and 0 <= applied <= last):
            raise ValueError(f"applied {applied!r}, and the ops end at {last}")
        if not (isinstance(run_ids, dict) and all(isinstance(v, str) for v in run_ids.values())):
            raise ValueError("run_ids is not an object of run ids")
        for key in run_ids:
            _key(key)
        if not isinstance(state.get("experiment_id"), str | None):
            raise ValueError("experiment_id is not a string")
    except ValueError as e:  # json's own errors too
        why = one_line(e) if isinstance(e, json.JSONDecodeError) else str(e)
        raise JournalError(
            f"{path}: not the journal's state ({why}); remove it to replay every op (replays are harmless)"
        ) from None
    return state


NAME_TAGS = ("sweep", "trial_id", "previous_trial_id", "confirm_of", "best.trial_id")  # tags whose values are names
KEYED = ("create_run", "log", "status", "inputs", "artifact", "model", "alias")  # ops on one run


def check_op(op) -> None:
    """ValueError saying what is wrong with `op` as read back: its shape (what `_index` and `_apply` use),
    and every name in it that becomes a path or a tag, checked as the flags are."""
    if not isinstance(op, dict) or not is_int(op.get("seq")) or not isinstance(op.get("op"), str):
        raise ValueError("not an object with an integer seq and an op name")
    kind, get = op["op"], op.get
    if kind in KEYED or "key" in op:
        _key(get("key"))
    if kind == "meta":
        _check_meta(get("data"))
    elif kind == "create_run":
        _need(
            is_int(get("ts")) and isinstance(get("tags", {}), dict) and isinstance(get("params", {}), dict),
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
        _need(all(_num(v) and is_int(ts) and is_int(step) for _, v, ts, step in metrics), "bad metrics")
        _rows(get("params"), "params", 2)
        _tags(_rows(get("tags"), "tags", 2))
    elif kind == "status":
        _need(get("status") in STATUSES and (get("status") not in TERMINAL or is_int(get("ts"))), "bad status")
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
    _need(isinstance(phases, list) and all(is_int(n) and n > 0 for n in phases), "bad phases")
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


def is_int(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _num(v) -> bool:
    return is_int(v) or isinstance(v, float)


def one_line(e: BaseException) -> str:
    text = str(e).strip().splitlines()
    return f"{type(e).__name__}: {text[0] if text else ''}"[:300]


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


def read_journal(folder: Path) -> tuple[dict, list[dict], int, int]:
    """(state, ops, bytes of the whole lines they fill, ops.jsonl's size), each checked. The state is read
    first: every op it counts as applied was on file before it was written, even while a sweep runs."""
    state = _read_file(folder / "state.json")
    ops, good, size = _read_ops(folder / "ops.jsonl")
    return check_state(folder / "state.json", state, ops), ops, good, size


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
            check_op(op)
            if ops and op["seq"] <= ops[-1]["seq"]:
                raise ValueError(f"seq {op['seq']} after {ops[-1]['seq']}")
        except ValueError as e:
            raise JournalError(f"{path} line {n}: not a journal op ({e})") from None
        ops.append(op)
        good += len(line)
    return ops, good, len(data)


def _is_json(line: bytes) -> bool:
    try:
        json.loads(line)
    except ValueError:
        return False
    return True


def read_meta(folder: Path) -> dict:
    """A sweep's facts ("meta" ops) from its journal folder, read only (nothing opened for writing).
    JournalError when its ops or its state are not what a journal writes: `--resume` and `--sync` call
    this first, so such a journal stops them before anything is written."""
    _, ops, _, _ = read_journal(Path(folder))
    meta: dict = {}
    for op in ops:
        if op["op"] == "meta":
            meta.update(op["data"])
    return meta
