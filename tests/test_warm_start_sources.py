"""--warm-start sources are only read: an empty, corrupt or foreign `optuna.db` is one line naming it
(exit 2 on the command line) and is never modified; a trial whose value is NaN or whose params lie
outside their distributions is left out with a counted reason.

Real files: studies written by Optuna, another program's SQLite database written by sqlite3, an empty
file, random bytes, and an Optuna database whose rows were then edited with sqlite3 as a corrupt or
hostile writer would.
"""

from __future__ import annotations

import hashlib
import os
import sqlite3
import subprocess
import sys
from pathlib import Path

import optuna
import pytest

from cnnclf.args import UsageError
from cnnclf.config import TrainConfig
from sweeps import warmstart
from sweeps.spec import Ranges
from sweeps.warmstart import SETTINGS_ATTR, load, settings_of, study_path
from tests.conftest import write_cifar_folders

ROOT = Path(__file__).resolve().parents[1]
OURS = settings_of(TrainConfig(task="cifar10", epochs=3), {"width": 8}, Ranges((32, 64), (2, 4), (8, 16)), {})
LR = optuna.distributions.FloatDistribution(1e-4, 1e-2, log=True)

optuna.logging.set_verbosity(optuna.logging.WARNING)


def fingerprint(path: Path) -> tuple:
    """What must not change: the bytes, the mtime, and the files beside it (no -journal, no -wal left)."""
    st = path.stat()
    return hashlib.sha256(path.read_bytes()).hexdigest(), st.st_mtime_ns, sorted(os.listdir(path.parent))


def real_study(out: Path, name: str = "old", n: int = 3) -> Path:
    path = study_path(out, name)
    path.parent.mkdir(parents=True)
    study = optuna.create_study(study_name=name, storage=f"sqlite:///{path}", direction="maximize")
    for i in range(n):
        params, attrs = {"lr": 1e-3 * (i + 1)}, {SETTINGS_ATTR: OURS}
        study.add_trial(optuna.trial.create_trial(params=params, distributions={"lr": LR}, value=0.5, user_attrs=attrs))
    return path


def edit(path: Path, *sql: str) -> None:
    with sqlite3.connect(path) as db:
        for statement in sql:
            db.execute(statement)
    db.close()


def foreign(path: Path) -> None:
    with sqlite3.connect(path) as db:
        db.execute("CREATE TABLE notes (id INTEGER PRIMARY KEY, body TEXT)")
        db.execute("INSERT INTO notes (body) VALUES ('another program wrote this')")
    db.close()


def corrupt(path: Path) -> None:
    """A real Optuna database with its later pages overwritten: the header still says SQLite."""
    data = bytearray(path.read_bytes())
    data[4096:] = os.urandom(len(data) - 4096)
    path.write_bytes(bytes(data))


def deep_attr(path: Path) -> None:
    """A user attribute nested 100k deep, as JSON: Optuna's json.loads ends in RecursionError."""
    edit(path, f"UPDATE trial_user_attributes SET value_json = '{'[' * 100_000 + ']' * 100_000}'")


BAD = {
    "empty": (lambda p: p.write_bytes(b""), "is empty"),
    "random bytes": (lambda p: p.write_bytes(os.urandom(8192)), "is not an SQLite database"),
    "another program's database": (foreign, "is not an Optuna study"),
    "corrupt": (corrupt, "SQLite database"),
    "nested 100k deep": (deep_attr, "cannot be read as an Optuna"),
}


@pytest.mark.parametrize("kind", list(BAD))
def test_an_unusable_source_is_one_line_naming_it_and_left_as_it_was(tmp_path, kind):
    make, why = BAD[kind]
    path = study_path(tmp_path, "old")
    if kind in ("corrupt", "nested 100k deep"):
        real_study(tmp_path)
    else:
        path.parent.mkdir(parents=True)
    make(path)
    before = fingerprint(path)
    steps = {"check": lambda: warmstart.check(path, "old"), "load": lambda: load(["old"], tmp_path, OURS)}
    if kind == "nested 100k deep":
        steps.pop("check")()  # its tables are Optuna's: only reading its rows finds them unusable
    for step in steps.values():
        with pytest.raises(UsageError) as e:
            step()
        message = str(e.value)
        assert "\n" not in message and str(path) in message and why in message, message
        assert message.startswith("argument --warm-start: ")
    assert fingerprint(path) == before


def test_a_study_of_another_name_is_refused(tmp_path):
    path = real_study(tmp_path, "other")
    before = fingerprint(path)
    (tmp_path / "old").mkdir()
    os.link(path, study_path(tmp_path, "old"))  # the same file, under the name asked for
    with pytest.raises(UsageError, match="holds no Optuna study named 'old'"):
        load(["old"], tmp_path, OURS)
    assert fingerprint(path) == before


def test_a_real_source_is_read_without_being_written(tmp_path):
    path = real_study(tmp_path)
    os.chmod(path, 0o444)  # read-only, as another user's sweep folder may be
    before = fingerprint(path)
    warmstart.check(path, "old")
    priors = load(["old"], tmp_path, OURS)
    assert [r["params"] for r in priors.records] == [{"lr": 1e-3}, {"lr": 2e-3}, {"lr": 3e-3}]
    assert fingerprint(path) == before


@pytest.mark.parametrize(
    "sql",
    [
        "UPDATE trial_values SET value = NULL WHERE trial_id = 2",  # NaN reads back as NULL from SQLite
        "UPDATE trial_values SET value = 'NaN' WHERE trial_id = 2",
    ],
)
def test_a_nan_value_is_left_out_and_counted(tmp_path, sql):
    path = real_study(tmp_path)
    edit(path, sql)
    before = fingerprint(path)
    priors = load(["old"], tmp_path, OURS)
    assert [r["number"] for r in priors.records] == [0, 2]
    assert priors.left_out == [{"sweep": "old", "count": 1, "why": "a value that is not a finite number"}]
    assert "left out 1 trial(s) of sweep old: a value that is not a finite number" in priors.lines()[1]
    assert fingerprint(path) == before


def test_an_out_of_range_param_is_left_out_and_counted(tmp_path):
    path = real_study(tmp_path)
    edit(path, "UPDATE trial_params SET param_value = 5.0 WHERE trial_id = 1")  # lr 5.0, its range 1e-4..1e-2
    priors = load(["old"], tmp_path, OURS)
    assert [r["number"] for r in priors.records] == [1, 2]
    assert priors.left_out == [{"sweep": "old", "count": 1, "why": "a param outside its own recorded distribution"}]


@pytest.mark.slow
def test_a_sweep_warm_started_from_another_programs_database_exits_2_and_leaves_it(tmp_path):
    data = write_cifar_folders(tmp_path / "cifar", 4, 1)
    out = tmp_path / "out"
    source = study_path(out, "src")
    source.parent.mkdir(parents=True)
    foreign(source)
    before = fingerprint(source)
    args = ["--smoke-test", "--data-dir", data, "--no-download", "--name", "new", "--warm-start", "src", "--out", out]
    args += ["--tracking-uri", f"sqlite:///{tmp_path / 'mlflow.db'}", "--storage-path", tmp_path / "ray"]
    r = subprocess.run(
        [sys.executable, str(ROOT / "sweeps" / "cifar10.py"), *map(str, args)],
        capture_output=True,
        text=True,
        timeout=600,
        cwd=tmp_path,
    )
    assert r.returncode == 2, r.stderr[-3000:]
    assert "Traceback" not in r.stderr, r.stderr[-3000:]
    last = r.stderr.strip().splitlines()[-1]
    assert str(source) in last and "is not an Optuna study" in last, last
    assert fingerprint(source) == before
