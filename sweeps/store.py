"""The MLflow tracking store: one set of checks for the sweeps (which write it) and the reports (which read it).

Every function raises StoreError with a one-line message; each CLI names its own flag in front.
MLflow itself (a second to import) is imported only by the functions that use it, so that a bad URI, or any
other flag's mistake of a sweep script, is refused at once.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import sqlite3
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path
from urllib.parse import unquote, urlparse

DEFAULT_URI = "sqlite:///mlflow.db"
SCHEMES = ("http", "https", "sqlite", "file", "postgresql", "mysql", "mssql", "databricks")
SQLITE_HEADER = b"SQLite format 3\x00"


class StoreError(ValueError):
    """The tracking store cannot be used; the message is one line, without the flag's name."""


def absolute(uri: str) -> str:
    """A SQLite URI with an absolute path: `mlflow ui` run from another folder, or a resumed sweep, then
    opens the same store instead of silently making a new, empty one."""
    db = sqlite_path(uri)
    return f"sqlite:///{db.resolve()}" if db is not None else uri


def missing_artifacts(uri: str) -> list[str]:
    """Local artifact folders that finished sweeps wrote to and that are gone (a store moved or copied
    without them keeps absolute artifact paths, and MLflow then lists no artifacts, without an error).

    Only a finished sweep's parent run is known to have artifacts (MLflow makes folders lazily)."""
    from mlflow.tracking import MlflowClient

    c, gone = MlflowClient(tracking_uri=uri), []
    for exp in c.search_experiments():
        done = c.search_runs([exp.experiment_id], "tags.role = 'sweep' and tags.status = 'completed'", max_results=1)
        loc = done[0].info.artifact_uri if done else ""
        if loc.startswith(("file:", "/")):  # a server's or a bucket's artifacts are not ours to look at
            folder = Path(unquote(urlparse(loc).path) if loc.startswith("file:") else loc)
            if not folder.exists():
                gone.append(f"{exp.name}: {folder}")
    return gone


def ui_urls(uri: str, experiment_id: str, run_id: str) -> tuple[str, str, str | None]:
    """(the parent run's page, the experiment's runs table in model-training mode, the command that
    serves them): a server's own address, or `mlflow ui` on this machine for a local store."""
    serve = None
    base = uri.rstrip("/") if uri.startswith(("http://", "https://")) else "http://127.0.0.1:5000"
    if not uri.startswith(("http://", "https://")):
        serve = f"mlflow ui --backend-store-uri {uri} --workers 1"
    exp = f"{base}/#/experiments/{experiment_id}"
    mode = "workflowType=machine_learning"  # MLflow 3's UI defaults to its GenAI layout without it
    return f"{exp}/runs/{run_id}?{mode}", f"{exp}/runs?{mode}", serve


def sqlite_path(uri: str) -> Path | None:
    return Path(uri.removeprefix("sqlite:///")).expanduser() if uri.startswith("sqlite:///") else None


def check(uri: str, *, write: bool) -> None:
    """Refuse, before any training or reading, a store that cannot be reached or is not MLflow's.

    write=False (reports): the store must already exist, and reading it must create nothing.
    write=True (sweeps): a new SQLite database may be created in a writable folder.
    """
    scheme = uri.split("://", 1)[0].split("+", 1)[0] if "://" in uri else ""
    if not uri.strip():  # MLflow would fall back to its default store and create ./mlflow.db
        raise StoreError("expected a URI, got an empty string")
    if scheme and scheme not in SCHEMES:
        raise StoreError(f"{uri!r} is not an MLflow tracking URI ({', '.join(SCHEMES)})")
    if (db := sqlite_path(uri)) is not None:
        _check_sqlite(db, write)
    elif scheme in ("http", "https"):
        try:
            with urllib.request.urlopen(uri.rstrip("/") + "/health", timeout=5) as r:
                if r.status != 200:
                    raise OSError(f"HTTP {r.status}")
        except (urllib.error.URLError, OSError) as e:
            raise StoreError(f"cannot reach {uri} ({getattr(e, 'reason', e)})") from None
    elif scheme in ("postgresql", "mysql", "mssql"):
        _check_driver(uri)
    elif uri.startswith(("file:", "/", "./")) or (not scheme and uri != "databricks"):
        path = Path(uri.removeprefix("file://").removeprefix("file:")).expanduser()
        if write:
            # A file store keeps each metric in a file named by its key: `test/acc/airplane` is a folder
            # there, and the sweep would fail at its first trial's end, after training.
            raise StoreError(
                f"{uri!r} is a file store (or a path without a scheme), which cannot hold metric names with a "
                "slash such as test/acc/<class>; use a SQLite database (sqlite:///mlflow.db) or an http:// server"
            )
        if not path.is_dir():
            raise StoreError(f"no MLflow file store at {path}")
        os.environ.setdefault("MLFLOW_ALLOW_FILE_STORE", "true")  # MLflow 3 refuses a file store otherwise


def _check_driver(uri: str) -> None:
    """A database URI whose Python driver is installed (SQLAlchemy loads it only at the first write)."""
    try:
        from sqlalchemy.engine import make_url

        make_url(uri).get_dialect().import_dbapi()
    except ImportError as e:
        raise StoreError(f"{uri.split('://', 1)[0]}: its database driver is not installed ({e.name or e})") from None
    except Exception as e:  # a malformed URL
        raise StoreError(f"{uri!r} is not a database URI SQLAlchemy can use ({type(e).__name__}: {e})") from None


def _check_sqlite(db: Path, write: bool) -> None:
    if db.is_dir():
        raise StoreError(f"{db} is a folder, not a database file")
    if write:
        folder = db.resolve().parent
        if not folder.is_dir() or not os.access(folder, os.W_OK):
            raise StoreError(f"{folder} is not a writable folder")
    elif not db.is_file():
        raise StoreError(f"no MLflow database at {db}")
    # MLflow would add its tables to another program's database, or make an empty file one of its own.
    if db.is_file() and (db.stat().st_size > 0 or not write) and mlflow_tables(db) is None:
        raise StoreError(f"{db} is not an MLflow database")


def sqlite_tables(path: Path) -> set[str] | None:
    """The tables of a SQLite file, or None when it is not one.

    A writer killed mid-transaction leaves a hot journal that a read-only connection cannot roll back
    ("attempt to write a readonly database"); a read-write one rolls it back first, as any SQLite
    client would, so a sweep's database stays readable after a crash.
    """
    with open(path, "rb") as f:
        if f.read(len(SQLITE_HEADER)) != SQLITE_HEADER:
            return None
    writable = os.access(path, os.W_OK) and os.access(path.resolve().parent, os.W_OK)
    for mode in ("rw", "ro") if writable else ("ro",):
        try:
            with contextlib.closing(sqlite3.connect(f"{path.resolve().as_uri()}?mode={mode}", uri=True)) as db:
                return {r[0] for r in db.execute("SELECT name FROM sqlite_master WHERE type = 'table'")}
        except sqlite3.Error:
            continue
    return None


def mlflow_tables(db: Path) -> set[str] | None:
    """The tables of an MLflow SQLite database, maybe half-made by a killed migration; None for any other file."""
    from mlflow.store.db.base_sql_model import Base
    from mlflow.store.db.utils import InitialBase

    tables = sqlite_tables(db)
    ours = set(Base.metadata.tables) | set(InitialBase.metadata.tables) | {"alembic_version"}
    # MLflow's first table is experiments; one that holds runs also has its schema's revision.
    if tables is None or not ((tables <= ours and "experiments" in tables) or {"alembic_version", "runs"} <= tables):
        return None  # another program's database, which MLflow would add its tables to
    return tables


def prepare(uri: str) -> None:
    """Make a SQLite tracking database ready, once all input is checked and before any training.

    MLflow builds its schema in some 60 migrations that are not crash-safe: a sweep killed while they
    ran leaves a database MLflow cannot open again. Such a database holds no run (runs come after the
    last migration), so it is set aside and made anew; the sweep's journal holds everything to write.
    Two sweeps starting at once on one database take turns, under a lock beside it.
    """
    db = sqlite_path(uri)
    if db is None:
        return

    # The lock lives beside the database (a folder `check` found writable), not at a fixed name in a
    # shared /tmp; O_NOFOLLOW refuses a planted symlink and nothing is ever truncated.
    lock_path = db.with_name(db.name + ".lock")
    try:
        fd = os.open(lock_path, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600)
    except OSError as e:
        raise StoreError(f"cannot use the lock file {lock_path} ({e.strerror})") from None
    with os.fdopen(fd, "r+b") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # released when the file closes, or when the process dies
        _repair(uri, db)


def _repair(uri: str, db: Path) -> None:
    from mlflow.exceptions import MlflowException
    from mlflow.tracking import MlflowClient

    tables = mlflow_tables(db) if db.is_file() and db.stat().st_size > 0 else None
    revision, has_runs = _schema(db, tables) if tables else (None, False)
    head = schema_head()
    if tables and revision != head and has_runs:
        raise StoreError(
            f"{db} has MLflow schema {revision}, this MLflow needs {head}; "
            f"back it up, then run: mlflow db upgrade {uri}"
        )
    if tables and revision != head:
        aside = db.with_name(f"{db.name}.unfinished-{time.strftime('%Y%m%d-%H%M%S')}")
        for suffix in ("", "-journal", "-wal", "-shm"):
            if (part := Path(f"{db}{suffix}")).exists():
                os.replace(part, f"{aside}{suffix}")
        print(
            f"MLflow: {db} was left half-made by a killed process and holds no run; "
            f"set aside as {aside.name}, starting a fresh one",
            file=sys.stderr,
            flush=True,
        )
    try:
        MlflowClient(tracking_uri=uri).search_experiments(max_results=1)  # makes the schema if new
    except MlflowException as e:
        raise StoreError(f"{db}: {' '.join(e.message.split())}") from None
    for where in missing_artifacts(uri):
        print(
            f"warning: MLflow's artifact folder of experiment {where} is missing; its runs list no artifacts",
            file=sys.stderr,
            flush=True,
        )


def schema_head() -> str:
    """The schema revision this MLflow writes (the head of its migrations). Private: MLflow has no
    public call for it (docs/internals.md lists it with the test that catches its change)."""
    from mlflow.store.db.utils import _get_latest_schema_revision

    return _get_latest_schema_revision()


def _schema(db: Path, tables: set[str]) -> tuple[str | None, bool]:
    """The database's schema revision, and whether it holds any run."""
    with contextlib.closing(sqlite3.connect(f"{db.resolve().as_uri()}?mode=ro", uri=True)) as c:
        revision = None
        if "alembic_version" in tables:
            row = c.execute("SELECT version_num FROM alembic_version").fetchone()
            revision = row[0] if row else None
        has_runs = "runs" in tables and c.execute("SELECT 1 FROM runs LIMIT 1").fetchone() is not None
    return revision, has_runs
