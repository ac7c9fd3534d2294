"""A SQLite tracking database left behind by a killed process: what the sweeps accept, repair or refuse.

Real MLflow, real SQLite, and real SIGKILLs of a subprocess in the middle of a write.
"""

from __future__ import annotations

import contextlib
import signal
import sqlite3
import subprocess
import sys
from pathlib import Path

import pytest
from mlflow.store.db.utils import _get_latest_schema_revision
from mlflow.tracking import MlflowClient

from sweeps.cli import UsageError, tracking
from sweeps.store import mlflow_tables


def check_tracking(uri: str) -> None:
    tracking("check", uri)


def prepare_tracking(uri: str) -> None:
    tracking("prepare", uri)


# Kills its own process (SIGKILL, no clean-up) at the Nth schema statement MLflow runs while it
# creates a database: with MLflow 3.17, N=200 falls inside a migration, which leaves a hot journal.
KILL_AT_SCHEMA_STATEMENT = r"""
import os, signal, sys, sqlalchemy
from sqlalchemy import event

count = [0]

@event.listens_for(sqlalchemy.engine.Engine, "before_cursor_execute")
def _kill(conn, cursor, statement, *args):
    if statement.lstrip().upper().startswith(("CREATE", "ALTER", "DROP")):
        count[0] += 1
        if count[0] == int(sys.argv[2]):
            os.kill(os.getpid(), signal.SIGKILL)

from mlflow.tracking import MlflowClient
MlflowClient(sys.argv[1]).search_experiments()
"""

# Holds a big write transaction open on a finished database, then waits to be killed.
WRITE_AND_WAIT = r"""
import sqlite3, sys, time
db = sqlite3.connect(sys.argv[1], isolation_level=None)
db.execute("PRAGMA cache_size = 10")  # spill changed pages into the file before the commit
db.execute("BEGIN IMMEDIATE")
db.execute("UPDATE tags SET value = value || ?", ("x" * 2000,))
db.executemany("INSERT INTO tags (key, value, run_uuid) SELECT key || ?, value, run_uuid FROM tags",
               [(f"#{i}",) for i in range(6)])
print("writing", flush=True)
time.sleep(600)
"""


def revision(db: Path) -> str | None:
    with contextlib.closing(sqlite3.connect(db)) as c:
        row = c.execute("SELECT version_num FROM alembic_version").fetchone()
    return row[0] if row else None


def test_a_database_half_made_by_a_killed_process_is_set_aside_and_made_anew(tmp_path):
    db = tmp_path / "mlflow.db"
    uri = f"sqlite:///{db}"
    p = subprocess.run([sys.executable, "-c", KILL_AT_SCHEMA_STATEMENT, uri, "200"], capture_output=True)
    assert p.returncode == -signal.SIGKILL
    assert db.is_file() and revision(db) != _get_latest_schema_revision()  # killed mid-migration

    check_tracking(uri)  # the half-made database is MLflow's own, not another program's
    prepare_tracking(uri)

    aside = [p for p in tmp_path.iterdir() if p.name.startswith("mlflow.db.unfinished-")]
    assert len([p for p in aside if not p.name.endswith("-journal")]) == 1, aside  # its journal goes with it
    assert not Path(f"{db}-journal").exists()
    assert revision(db) == _get_latest_schema_revision()
    client = MlflowClient(uri)
    run = client.create_run(client.create_experiment("cifar10"))
    client.set_terminated(run.info.run_id)
    assert client.get_run(run.info.run_id).info.status == "FINISHED"


def test_a_write_killed_mid_transaction_leaves_a_database_that_opens_with_its_runs(tmp_path):
    db = tmp_path / "mlflow.db"
    uri = f"sqlite:///{db}"
    client = MlflowClient(uri)
    exp = client.create_experiment("cifar10")
    runs = []
    for i in range(20):
        run = client.create_run(exp, tags={f"t{j}": "v" * 200 for j in range(20)}, run_name=f"trial-{i}")
        client.log_metric(run.info.run_id, "val/acc", 0.5, step=1)
        client.set_terminated(run.info.run_id)
        runs.append(run.info.run_id)
    del client

    proc = subprocess.Popen([sys.executable, "-c", WRITE_AND_WAIT, str(db)], stdout=subprocess.PIPE, text=True)
    assert proc.stdout.readline().strip() == "writing"
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=30)
    proc.stdout.close()
    journal = Path(f"{db}-journal")
    assert journal.is_file() and journal.stat().st_size > 0  # a hot journal: a read-only open fails on it
    with (
        pytest.raises(sqlite3.OperationalError),
        contextlib.closing(sqlite3.connect(f"{db.as_uri()}?mode=ro", uri=True)) as c,
    ):
        c.execute("SELECT count(*) FROM runs").fetchone()

    # The report's check rolls the journal back and reads the tables.
    assert {"experiments", "runs"} <= mlflow_tables(db)
    check_tracking(uri)
    prepare_tracking(uri)
    assert not any(p.name.startswith("mlflow.db.unfinished-") for p in tmp_path.iterdir())  # nothing set aside
    client = MlflowClient(uri)
    for run_id in runs:
        run = client.get_run(run_id)
        assert run.info.status == "FINISHED" and run.data.metrics["val/acc"] == 0.5
        assert run.data.tags["t0"] == "v" * 200  # the killed update was rolled back


def test_a_database_of_an_older_schema_that_holds_runs_is_refused_with_the_upgrade_command(tmp_path):
    db = tmp_path / "mlflow.db"
    uri = f"sqlite:///{db}"
    client = MlflowClient(uri)
    client.create_run(client.create_experiment("cifar10"))
    del client
    with contextlib.closing(sqlite3.connect(db)) as c:
        c.execute("UPDATE alembic_version SET version_num = '6f8d9c3b2a1e'")  # an older MLflow's schema
        c.commit()

    with pytest.raises(UsageError, match=r"mlflow db upgrade") as e:
        prepare_tracking(uri)
    assert "\n" not in str(e.value)
    assert revision(db) == "6f8d9c3b2a1e"  # refused, not altered or set aside
    assert sorted(p.name for p in tmp_path.iterdir()) == ["mlflow.db", "mlflow.db.lock"]  # the lock stays, empty
    assert (tmp_path / "mlflow.db.lock").stat().st_size == 0


def test_another_programs_database_is_refused_and_left_alone(tmp_path):
    db = tmp_path / "app.db"
    with contextlib.closing(sqlite3.connect(db)) as c:
        c.execute("CREATE TABLE runs (id INTEGER, note TEXT)")  # a generic name MLflow also uses
        c.execute("INSERT INTO runs VALUES (1, 'mine')")
        c.commit()
    before = db.read_bytes()
    with pytest.raises(UsageError, match="is not an MLflow database"):
        check_tracking(f"sqlite:///{db}")
    assert db.read_bytes() == before
