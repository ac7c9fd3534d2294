"""One sweep, one driver, the same sweep on resume: the checks that need the sweep's own files. Light: no torch,
Ray or MLflow, so that a flag's mistake is answered at once (`--sync` is sweeps/sync.py).

- `claim`: the sweep's name taken for this process (`<out>/<name>/driver.lock`, flock), then checked: a new
  sweep's name is free, a resumed sweep exists and is the sweep it was (`same_sweep`).
- `tracking`: the tracking store's checks as exit 2 naming --tracking-uri.
"""

from __future__ import annotations

import argparse
import dataclasses
import fcntl
import os
from pathlib import Path

from cnnclf.args import UsageError
from sweeps import store
from sweeps.journal_checks import read_meta
from sweeps.settings import STATE_FORMAT, Settings, resume_record


def claim(s: Settings, args: argparse.Namespace) -> Settings:
    """Take the sweep's name for this process, then check it: a new sweep's name is free; a resumed sweep exists
    and is the sweep it was (the flags that shape its results are those it ran with; only --num-samples may grow).

    The lock (`<out>/<name>/driver.lock`, flock) is held until the process exits, so a second driver with the
    same name stops here, before it writes anything of the sweep. Returns the Settings to run (a resume keeps
    its recorded confirmation defaults)."""
    name, storage, out = s.name, s.storage, s.out
    fd = hold_lock(out / name / "driver.lock", name)
    journal_dir = out / name / "journal"
    exists = ("://" not in storage and (Path(storage) / name).exists()) or journal_dir.exists()
    try:
        if not s.resume:
            if exists:
                raise UsageError(f"argument --name: a sweep named {name!r} already exists; add --resume to continue it")
            return s
        meta = read_meta(journal_dir) if (journal_dir / "ops.jsonl").exists() else {}
        return same_sweep(s, args, meta)
    except UsageError:
        _HELD.remove(fd)
        os.close(fd)  # refused: the name is free again
        raise


def same_sweep(s: Settings, args: argparse.Namespace, meta: dict) -> Settings:
    """The resumed sweep's Settings, or UsageError naming every flag that differs from what it ran with."""
    was = meta.get("settings") or {k: meta[k] for k in ("task", "experiment", "tracking_uri") if k in meta}
    if not was:
        return s
    if was.get("format") != STATE_FORMAT:
        raise UsageError(
            f"argument --resume: sweep {s.name!r} was saved by another version of this project (state format "
            f"{was.get('format', 1)}; this one reads {STATE_FORMAT}) and cannot be resumed; run it again under "
            "a new --name"
        )
    if args.confirm is None and args.confirm_top is None and "confirm" in was:  # defaults: keep the sweep's
        s = dataclasses.replace(s, confirm=was["confirm"], confirm_top=was["confirm_top"])
    now = resume_record(s)
    differ = []
    for key, old in was.items():
        new = now.get(key)
        if new == old:
            continue
        if key == "trial":
            parts = [k for k in old if old.get(k) != new.get(k)]
            fields = [f for f in (old.get("train") or {}) if (old.get("train") or {}).get(f) != new["train"].get(f)]
            what = ", ".join(fields or parts)
            differ.append(f"--fix/--subset/--smoke-test (the trials' settings: {what})")
        elif key == "task":
            differ.append(f"the script (sweep {s.name!r} is a {old} sweep, not {new})")
        else:
            differ.append(f"--{key.replace('_', '-')} {_shown(new)} (it ran with {_shown(old)})")
    if differ:
        raise UsageError(
            f"argument --resume: sweep {s.name!r} ran with other settings; these differ: {'; '.join(differ)}. "
            "Resume with the flags it ran with (its parent run's `command` tag); only --num-samples may grow"
        )
    return s


def _shown(v: object) -> str:
    return ",".join(map(str, v)) if isinstance(v, list) else str(v)


def lock_holder(path: Path) -> str | None:
    """The pid written in a sweep's lock when another process holds it; None when it is free (or absent)."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW)
    except OSError:
        return None
    try:
        fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
        return None
    except OSError:
        return os.read(fd, 64).decode(errors="replace").strip() or "?"
    finally:
        os.close(fd)  # a shared lock taken only to look is released with it


def hold_lock(path: Path, name: str) -> int:
    """An exclusive flock on `path`, kept for the life of this process; UsageError when another process has it."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        holder = os.read(fd, 64).decode(errors="replace").strip() or "?"
        os.close(fd)
        raise UsageError(
            f"argument --name: sweep {name!r} is being run by another process (pid {holder}); wait for it, or "
            "give another --name"
        ) from None
    os.ftruncate(fd, 0)
    os.write(fd, str(os.getpid()).encode())
    _HELD.append(fd)  # not closed: the OS releases the lock when the process ends, however it ends
    return fd


_HELD: list[int] = []


def tracking(step: str, uri: str) -> None:
    """store.check (`check`) or store.prepare (`prepare`), its error as exit 2 naming --tracking-uri."""
    try:
        store.check(uri, write=True) if step == "check" else store.prepare(uri)
    except store.StoreError as e:
        raise UsageError(f"argument --tracking-uri: {e}") from None
