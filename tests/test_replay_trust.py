"""A sweep's journal read back (`--sync`, `--resume`, a restarted writer) is data, never code: a planted
"model" op never runs the file it names, an "artifact" op never uploads a file outside the sweep's own
folder (links followed), names are checked as the flags are, and a journal file that is garbage stops
the command with one line naming it (exit 2), before anything is written (sweeps/journal.py).

The journals are written by the real Journal and applied to a real MLflow SQLite store; the ops an
attacker plants are appended to ops.jsonl as raw lines, as anyone who can write `reports/out` could.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
from mlflow.tracking import MlflowClient

from tests.conftest import write_cifar_folders

ROOT = Path(__file__).resolve().parents[1]
T0 = int(time.time() * 1000)


def journal_of(tmp: Path, name: str = "j"):
    """A sweep's journal (`<tmp>/out/<name>/journal`) holding a meta op and its parent run, and the store's
    uri; the experiment keeps its artifacts under `<tmp>/artifacts`."""
    from sweeps.journal import SWEEP_KEY, Journal

    uri = f"sqlite:///{tmp / 'mlflow.db'}"
    client = MlflowClient(uri)
    if client.get_experiment_by_name("cifar10") is None:
        client.create_experiment("cifar10", artifact_location=(tmp / "artifacts").as_uri())
    j = Journal(tmp / "out" / name / "journal", uri, "cifar10", name, verbose=False)
    j.append("meta", data={"tracking_uri": uri, "experiment": "cifar10", "task": "cifar10"})
    j.append("create_run", SWEEP_KEY, name=name, ts=T0, tags={"sweep": name, "role": "sweep"}, params={"seed": 0})
    return j, uri


def plant(folder: Path, *ops: dict) -> None:
    """Append ops to a journal's ops.jsonl as raw lines, numbered after its last op."""
    path = folder / "ops.jsonl"
    seq = max(json.loads(line)["seq"] for line in path.read_text().splitlines())
    with open(path, "a") as f:
        for i, op in enumerate(ops, 1):
            f.write(json.dumps({"seq": seq + i, **op}) + "\n")


def replay(j, uri: str):
    """Close `j` as a sweep that never reached MLflow would, then apply its ops as `--sync` does."""
    from sweeps.journal import Journal

    j._file.close()
    again = Journal(j.folder, uri, "cifar10", j.sweep, verbose=False)
    again.start()
    assert again.close(timeout=120) == 0
    return again


def rejected(j) -> list[dict]:
    return [json.loads(line) for line in j.rejected_path.read_text().splitlines()] if j.rejected_path.exists() else []


def uploaded(tmp: Path) -> dict[str, bytes]:
    """Every file in the store's artifacts, by its path under the artifact root."""
    root = tmp / "artifacts"
    return {str(p.relative_to(root)): p.read_bytes() for p in root.rglob("*") if p.is_file()}


@pytest.fixture(autouse=True)
def in_tmp(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # anything MLflow would put in ./mlruns stays here


def test_a_planted_model_op_never_runs_the_file_it_names(tmp_path):
    from sweeps import logged_model as model

    j, uri = journal_of(tmp_path)
    root = j.folder.parent
    marker = tmp_path / "ran"
    evil = tmp_path / "evil.py"  # outside the sweep; a copy inside it is refused alike (the code must be model.py)
    evil.write_text(f"from pathlib import Path\nPath({str(marker)!r}).write_text('ran')\n")
    (root / "best_model.pt").write_bytes(b"weights")
    import numpy as np

    np.save(root / "model_input_example.npy", np.zeros((1, 32, 32, 3), np.uint8), allow_pickle=False)
    good = {
        "name": "model",
        "checkpoint": str(root / "best_model.pt"),
        "example": str(root / "model_input_example.npy"),
        "signature": model.signature([f"c{i}" for i in range(10)], 32).to_dict(),
        "metadata": {},
        "requirements": model.requirements(),
        "params": {},
        "model_type": "cnnclf-image-classifier",
        "metric_prefix": "best/",
        "register": None,
    }
    inside = root / "evil.py"
    inside.write_text(evil.read_text())
    plant(j.folder, {"op": "model", "key": "sweep", **good, "code": str(evil)})
    plant(j.folder, {"op": "model", "key": "sweep", **good, "code": str(inside)})
    again = replay(j, uri)
    assert not marker.exists()
    assert again.rejected == 2 and [r["op"] for r in rejected(again)] == ["model", "model"]
    assert all("model.py" in r["error"] and r["error"].count("\n") == 0 for r in rejected(again))
    client = MlflowClient(uri)
    assert client.search_logged_models([client.get_experiment_by_name("cifar10").experiment_id]) == []

    # What is logged is always sweeps/model.py; requirements name only what it imports
    op = again._model_op({"seq": 1, "op": "model", "key": "sweep", **good, "code": str(model.CODE)})
    assert op["code"] == str(model.CODE) and Path(op["checkpoint"]) == (root / "best_model.pt").resolve()
    from sweeps.journal import Refused

    with pytest.raises(Refused, match="requirements"):
        again._model_op({**good, "requirements": ["torch==2.14.1", "evil-package==1.0"]})
    with pytest.raises(Refused, match="outside the sweep's folder"):
        again._model_op({**good, "checkpoint": str(evil)})


def test_an_artifact_op_outside_the_sweep_is_refused_and_never_uploaded(tmp_path):
    j, uri = journal_of(tmp_path)
    root = j.folder.parent
    secret = tmp_path / "secret.txt"
    secret.write_bytes(b"not the sweep's")
    (root / "summary.json").write_text("{}")
    plant(
        j.folder,
        {"op": "artifact", "key": "sweep", "path": "/etc/passwd", "dir": None},
        {"op": "artifact", "key": "sweep", "path": str(secret), "dir": None},
        {"op": "artifact", "key": "sweep", "path": str(root / ".." / ".." / "secret.txt"), "dir": "report"},
        {"op": "artifact", "key": "sweep", "path": str(root / "summary.json"), "dir": None},  # its own: uploaded
    )
    again = replay(j, uri)
    assert again.rejected == 3
    assert all("outside the sweep's folder" in r["error"] for r in rejected(again))
    files = uploaded(tmp_path)
    assert [Path(p).name for p in files] == ["summary.json"]
    assert b"not the sweep's" not in files.values() and not any(b"root:" in v for v in files.values())


def test_a_link_inside_the_sweep_to_a_file_outside_is_refused(tmp_path):
    j, uri = journal_of(tmp_path)
    root = j.folder.parent
    secret = tmp_path / "secret.txt"
    secret.write_bytes(b"not the sweep's")
    (root / "eval").mkdir()
    (root / "report.html").symlink_to(secret)
    (root / "eval" / "up").symlink_to(tmp_path, target_is_directory=True)  # a linked folder, too
    plant(
        j.folder,
        {"op": "artifact", "key": "sweep", "path": str(root / "report.html"), "dir": "report"},
        {"op": "artifact", "key": "sweep", "path": str(root / "eval" / "up" / "secret.txt"), "dir": "eval"},
    )
    again = replay(j, uri)
    assert again.rejected == 2
    assert all(f"a link to {secret.resolve()}" in r["error"] for r in rejected(again))
    assert uploaded(tmp_path) == {}


def test_a_linked_journal_file_is_refused_and_its_target_untouched(tmp_path):
    from cnnclf.args import UsageError  # JournalError is one: exit 2 with one line
    from sweeps.journal import Journal

    folder = tmp_path / "out" / "j" / "journal"
    folder.mkdir(parents=True)
    victim = tmp_path / "notes.txt"
    victim.write_text("the user's own file\n")
    (folder / "ops.jsonl").symlink_to(victim)  # read as a torn tail, it would be truncated to nothing
    with pytest.raises(UsageError, match=r"ops\.jsonl"):
        Journal(folder, "sqlite:///unused.db", "cifar10", "j", verbose=False)
    assert victim.read_text() == "the user's own file\n"


def sweep(tmp: Path, *args: str | Path, timeout: int = 600) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, str(ROOT / "sweeps" / "cifar10.py"), *map(str, args)],
        capture_output=True,
        text=True,
        timeout=timeout,
        cwd=tmp,
        env={**os.environ, "PYTHONUNBUFFERED": "1"},
    )


def finished_sweep(tmp: Path, name: str = "j"):
    """A sweep whose parent and one trial ran to the end, all of it written to MLflow."""
    from sweeps.journal import SWEEP_KEY, trial_key

    j, uri = journal_of(tmp, name)
    key = trial_key("a_00000")
    tags = {"sweep": name, "trial_id": "a_00000", "role": "trial"}
    j.append("create_run", key, name="trial-a_00000", ts=T0, trial_id="a_00000", config={}, tags=tags, params={})
    j.append("log", key, metrics=[["val/acc", 0.5, T0 + 1000, 1]])
    j.append("status", key, status="FINISHED", ts=T0 + 2000)
    j.append("status", SWEEP_KEY, status="FINISHED", ts=T0 + 3000)
    replay(j, uri)
    return j.folder, uri


GARBAGE_OPS = {
    "a line that is not JSON, ops after it": lambda lines: [lines[0], b"{not json\n", *lines[1:]],
    "wrong types": lambda lines: [*lines, b'{"seq": 99, "op": "log", "key": "sweep", "metrics": 5}\n'],
    "a trial id that is a path": lambda lines: [
        *lines,
        b'{"seq": 99, "op": "create_run", "key": "trial:../../x", "trial_id": "../../x", "ts": 1, "config": {}}\n',
    ],
}


@pytest.mark.slow
@pytest.mark.parametrize("garbage", list(GARBAGE_OPS))
def test_sync_of_garbage_ops_is_one_line_exit_2_and_changes_nothing(tmp_path, garbage):
    folder = tmp_path / "out" / "j" / "journal"
    folder.mkdir(parents=True)
    ops = [{"seq": 1, "op": "meta", "data": {"tracking_uri": f"sqlite:///{tmp_path / 'mlflow.db'}", "task": "cifar10"}}]
    ops += [{"seq": 2, "op": "create_run", "key": "sweep", "name": "j", "ts": T0, "tags": {}, "params": {}}]
    lines = [json.dumps(op).encode() + b"\n" for op in ops]
    (folder / "ops.jsonl").write_bytes(b"".join(GARBAGE_OPS[garbage](lines)))
    before = (folder / "ops.jsonl").read_bytes()
    r = sweep(tmp_path, "--sync", "--name", "j", "--out", tmp_path / "out", "--mlflow-wait", "5", timeout=300)
    assert r.returncode == 2, r.stderr[-3000:]
    err = r.stderr.strip().splitlines()
    assert len(err) == 1 and "ops.jsonl line" in err[0], r.stderr[-3000:]
    assert (folder / "ops.jsonl").read_bytes() == before  # not cut at the garbage
    assert not (tmp_path / "mlflow.db").exists()


@pytest.mark.slow
def test_resume_with_a_garbage_state_is_one_line_exit_2_and_leaves_nothing_running(tmp_path):
    folder, uri = finished_sweep(tmp_path)
    data = write_cifar_folders(tmp_path / "cifar", 4, 2)
    (folder / "state.json").write_text('{"applied": 3, "run_ids": {"sweep": ')  # cut short, or any garbage
    before = (folder / "ops.jsonl").read_bytes()
    args = ["--resume", "--name", "j", "--out", tmp_path / "out", "--tracking-uri", uri]
    args += ["--storage-path", tmp_path / "ray_results", "--data-dir", data, "--no-download", "--num-samples", "1"]
    r = sweep(tmp_path, *args)
    assert r.returncode == 2, r.stderr[-3000:]
    err = r.stderr.strip().splitlines()
    assert len(err) == 1 and "state.json" in err[0] and "remove it" in err[0], r.stderr[-3000:]
    assert (folder / "ops.jsonl").read_bytes() == before  # nothing journaled, so nothing reopened
    client = MlflowClient(uri)
    all_runs = client.search_runs([client.get_experiment_by_name("cifar10").experiment_id])
    assert len(all_runs) == 2 and {r.info.status for r in all_runs} == {"FINISHED"}


@pytest.mark.parametrize(
    "state",
    ["garbage", "[]", '{"applied": "3"}', '{"applied": 99}', '{"applied": 1, "run_ids": {"../x": "r"}}'],
)
def test_a_garbage_state_is_a_journal_error_naming_it(tmp_path, state):
    from cnnclf.args import UsageError  # JournalError is one: exit 2 with one line
    from sweeps.journal import SWEEP_KEY, Journal, read_meta

    folder = tmp_path / "out" / "j" / "journal"
    j = Journal(folder, "sqlite:///unused.db", "cifar10", "j", verbose=False)  # never started: nothing applied
    j.append("create_run", SWEEP_KEY, name="j", ts=T0, tags={"sweep": "j", "role": "sweep"}, params={})
    j._file.close()
    (folder / "state.json").write_text(state)
    for read in (lambda: read_meta(folder), lambda: Journal(folder, "sqlite:///unused.db", "cifar10", "j")):
        with pytest.raises(UsageError, match=r"state\.json: not the journal's state") as e:
            read()
        assert "\n" not in str(e.value)
