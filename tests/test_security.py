"""Files and ports a user does not control: nothing loaded runs code, names never leave their folder,
locks never follow a planted symlink, and an address that does not answer costs seconds, not an hour.

The code-execution tests use pickles whose only payload writes a marker file: the marker must never
appear, whatever the command says.
"""

from __future__ import annotations

import hashlib
import json
import os
import socket
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import pytest
import torch

from tests.conftest import write_cifar_folders

ROOT = Path(__file__).resolve().parents[1]


class Payload:
    """Unpickling this runs `exec`: it writes the marker file. torch.save pickles it like any object."""

    def __init__(self, marker: Path) -> None:
        self.marker = str(marker)

    def __reduce__(self):
        return exec, (f"open({self.marker!r}, 'w').write('code ran')",)


def cli(*args, cwd: Path | None = None, timeout: float = 300) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "cnnclf", *map(str, args)], capture_output=True, text=True, timeout=timeout, cwd=cwd
    )


@pytest.fixture(scope="module")
def trained(tmp_path_factory) -> tuple[Path, Path]:
    root = tmp_path_factory.mktemp("sec")
    data = write_cifar_folders(root / "cifar", 8, 2)
    ckpt = root / "model.pt"
    args = ["--model", "cnn", "--depth", "2", "--width", "8", "--batch-size", "32", "--epochs", "1"]
    r = cli("train", "--task", "cifar10", "--data-dir", data, "--no-download", *args, "--save", ckpt)
    assert r.returncode == 0, r.stderr
    return data, ckpt


@pytest.fixture
def planted(tmp_path, trained) -> dict[str, Path]:
    """A bare payload pickle, and a real checkpoint with one extra key holding the payload."""
    marker = tmp_path / "marker"
    bare = tmp_path / "bare.pt"
    torch.save({"config": Payload(marker), "epoch": 1}, bare)
    extra = tmp_path / "extra.pt"
    state = torch.load(trained[1], weights_only=True)  # the project's own checkpoint loads this way
    torch.save({**state, "note": Payload(marker)}, extra)
    return {"marker": marker, "bare": bare, "extra": extra}


def _one_line_exit_2(r: subprocess.CompletedProcess, *needles: str) -> str:
    lines = r.stderr.strip().splitlines()
    assert r.returncode == 2, r.stderr[-2000:]
    assert len(lines) == 1, r.stderr[-2000:]
    assert all(n in lines[0] for n in needles), lines[0]
    return lines[0]


def test_the_payload_really_runs_when_unpickled(planted):
    # The test's premise: a plain unpickle of these files runs the payload.
    torch.load(planted["extra"], weights_only=False)
    assert planted["marker"].read_text() == "code ran"


@pytest.mark.parametrize("kind", ["bare", "extra"])
def test_predict_refuses_a_pickle_that_would_run_code(planted, trained, kind):
    data, _ = trained
    image = next((data / "test" / "cat").iterdir())
    r = cli("predict", "--checkpoint", planted[kind], image)
    _one_line_exit_2(r, "--checkpoint", str(planted[kind]), "not a cnnclf checkpoint")
    assert not planted["marker"].exists()


@pytest.mark.parametrize("kind", ["bare", "extra"])
def test_resume_refuses_a_pickle_that_would_run_code(planted, trained, kind, tmp_path):
    data, _ = trained
    args = ["--model", "cnn", "--depth", "2", "--width", "8", "--batch-size", "32", "--epochs", "2"]
    r = cli("train", "--task", "cifar10", "--data-dir", data, "--no-download", *args, "--resume", planted[kind])
    _one_line_exit_2(r, "--resume", str(planted[kind]))
    assert not planted["marker"].exists()


def test_sweep_trial_restore_and_best_model_samples_refuse_it(planted, trained, tmp_path, capsys):
    from cnnclf.data import load_task
    from cnnclf.train import CheckpointError
    from sweeps.finish import sample_predictions
    from sweeps.trainable import CHECKPOINT_FILE, METRICS_FILE, read_checkpoint

    # A trial folder in the storage path as Tune's restore and the orphan adoption read it.
    folder = tmp_path / "checkpoint_000001"
    folder.mkdir()
    (folder / CHECKPOINT_FILE).write_bytes(planted["extra"].read_bytes())
    (folder / METRICS_FILE).write_text(json.dumps({"epoch": 1, "val/acc": 0.5}))
    assert read_checkpoint(folder) is None  # the trial trains without it
    assert "ignoring checkpoint" in capsys.readouterr().err
    with pytest.raises(CheckpointError, match=r"extra\.pt"):
        sample_predictions(planted["extra"], load_task("cifar10", trained[0], download_missing=False))
    assert not planted["marker"].exists()


def test_a_real_checkpoint_loads_weights_only(trained):
    from cnnclf.train import load_checkpoint

    state = load_checkpoint(trained[1])
    assert state["epoch"] == 1 and isinstance(state["rng"]["torch"], torch.Tensor)
    assert state["metrics"]["val/acc"] > 0 and "test/acc" in state["metrics"]


# --- names ------------------------------------------------------------------------------------


def test_reports_never_write_outside_out_for_a_sweep_name_from_the_store(tmp_path):
    """An old sweep named `..` in the store (older versions let --name .. through): no folder for it."""
    from mlflow.tracking import MlflowClient

    db = tmp_path / "mlflow.db"
    c = MlflowClient(f"sqlite:///{db}")
    exp = c.create_experiment("cifar10", artifact_location=(tmp_path / "artifacts").as_uri())
    run = c.create_run(exp, run_name="..", tags={"sweep": "..", "role": "sweep", "status": "completed"})
    c.set_terminated(run.info.run_id)
    out = tmp_path / "a" / "out"
    out.mkdir(parents=True)
    before = sorted(p.name for p in (tmp_path / "a").iterdir())
    r = subprocess.run(
        [sys.executable, "-m", "reports", "--tracking-uri", f"sqlite:///{db}", "--out", out],
        capture_output=True,
        text=True,
        timeout=300,
        cwd=tmp_path,
    )
    _one_line_exit_2(r, "--sweep", "'..'")
    assert sorted(p.name for p in (tmp_path / "a").iterdir()) == before and list(out.iterdir()) == []


# --- the lock beside the tracking database ---------------------------------------------------


def test_tracking_lock_never_truncates_through_a_planted_symlink(tmp_path):
    from sweeps.cli import UsageError, tracking

    def prepare_tracking(uri: str) -> None:
        tracking("prepare", uri)

    victim = tmp_path / "victim.txt"
    victim.write_text("precious\n")
    db = tmp_path / "mlflow.db"
    # Where the lock used to be: a fixed name in the shared /tmp, which anyone can plant first.
    key = hashlib.md5(str(db.resolve()).encode(), usedforsecurity=False).hexdigest()
    old = Path(tempfile.gettempdir()) / f"cnnclf-mlflow-{key}.lock"
    old.unlink(missing_ok=True)
    old.symlink_to(victim)
    try:
        prepare_tracking(f"sqlite:///{db}")
    finally:
        old.unlink()
    assert victim.read_text() == "precious\n"
    # And where it is now: a symlink planted there is refused, not followed.
    db2 = tmp_path / "other" / "mlflow.db"
    db2.parent.mkdir()
    Path(f"{db2}.lock").symlink_to(victim)
    with pytest.raises(UsageError, match="lock file"):
        prepare_tracking(f"sqlite:///{db2}")
    assert victim.read_text() == "precious\n" and not db2.exists()


# --- an address that does not answer ---------------------------------------------------------


@pytest.mark.slow  # ray.init in the sweep's process, for --connect-timeout's 5 s
def test_an_address_that_accepts_but_is_no_ray_head_gives_up_with_exit_2(tmp_path):
    """A port that takes the TCP connection but never speaks Ray's protocol: Ray alone retries for
    more than ten minutes. The sweep gives up after --connect-timeout with one line naming --address."""
    data = write_cifar_folders(tmp_path / "cifar", 4, 2)
    server = socket.socket()
    server.bind(("127.0.0.1", 0))
    server.listen(16)
    held = []
    stop = threading.Event()

    def accept() -> None:
        server.settimeout(0.5)
        while not stop.is_set():
            try:
                held.append(server.accept()[0])  # accept and say nothing
            except OSError:
                continue

    t = threading.Thread(target=accept, daemon=True)
    t.start()
    port = server.getsockname()[1]
    started = time.monotonic()
    try:
        r = subprocess.run(
            [
                *(sys.executable, str(ROOT / "sweeps" / "cifar10.py"), "--smoke-test", "--data-dir", data),
                *("--no-download", "--address", f"127.0.0.1:{port}", "--connect-timeout", "5"),
                *("--tracking-uri", "sqlite:///m.db"),
            ],
            capture_output=True,
            text=True,
            timeout=240,
            cwd=tmp_path,
            env={**os.environ, "PYTHONUNBUFFERED": "1"},
            start_new_session=True,
        )
    finally:
        stop.set()
        t.join()
        for s in held:
            s.close()
        server.close()
    assert r.returncode == 2, r.stderr[-3000:]
    last = r.stderr.strip().splitlines()[-1]
    assert last.startswith("cifar10 sweep: error: argument --address") and f"127.0.0.1:{port}" in last, last
    assert time.monotonic() - started < 200
    assert not (tmp_path / "ray_results").exists()
