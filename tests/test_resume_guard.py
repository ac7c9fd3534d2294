"""A resumed sweep is the sweep it was, one driver runs a sweep name at a time, and a folder that cannot take
the sweep's files is refused at the start (red team, round 2: findings 7, 8 and 11; docs/reliability.md).

The resume checks run in-process against the shared real smoke sweep (tests/conftest.py `smoke_sweep`):
each refused resume must stop before Ray starts and before anything of the sweep is written.
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

from sweeps import cli, driver
from sweeps.catdog import SPEC as CATDOG
from sweeps.cifar10 import SPEC as CIFAR10
from tests.conftest import REGISTERED_MODEL, write_cifar_folders

ROOT = Path(__file__).resolve().parents[1]


def smoke_args(sw) -> list[str]:
    """The flags the shared smoke sweep ran with (tests/conftest.py), plus --resume."""
    args = ["--smoke-test", "--num-samples", "3", "--subset", "120", "--data-dir", sw.data, "--no-download"]
    args += ["--name", "smoke", "--out", sw.tmp / "out", "--storage-path", sw.tmp / "ray_results"]
    return [str(a) for a in [*args, "--register-model", REGISTERED_MODEL, "--resume"]]


def refused(spec, argv, monkeypatch, capsys, cwd) -> str:
    """Run the sweep's CLI in-process; it must exit 2 with one line before run_sweep (Ray) is reached."""

    def tripwire(*a, **k):
        raise AssertionError("the resumed sweep reached run_sweep: Ray would start")

    monkeypatch.setattr(driver, "run_sweep", tripwire)
    monkeypatch.chdir(cwd)
    before = _files(cwd / "out" / "smoke")
    rc = cli.main(spec, argv)
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2 and len(err) == 1, err
    assert _files(cwd / "out" / "smoke") == before  # nothing of the sweep was written
    return err[0]


def _files(folder: Path) -> dict[str, int]:
    return {
        str(p.relative_to(folder)): p.stat().st_size
        for p in folder.rglob("*")
        if p.is_file() and p.name != "driver.lock"
    }


@pytest.mark.slow
@pytest.mark.parametrize(
    ("extra", "named"),
    [
        (["--max-epochs", "2", "--seed", "7"], ["--max-epochs 2 (it ran with 1)", "--seed 7 (it ran with 0)"]),
        (["--fix", "lr=0.05"], ["--fix/--subset/--smoke-test"]),
        (["--subset", "100"], ["--fix/--subset/--smoke-test", "subset"]),
        (["--experiment", "other"], ["--experiment other (it ran with cifar10)"]),
        (["--confirm", "3"], ["--confirm 3 (it ran with 1)"]),
    ],
)
def test_a_resume_with_flags_that_change_results_is_refused(smoke_sweep, extra, named, monkeypatch, capsys):
    line = refused(CIFAR10, [*smoke_args(smoke_sweep), *extra], monkeypatch, capsys, smoke_sweep.tmp)
    assert line.startswith("cifar10 sweep: error: argument --resume: sweep 'smoke' ran with other settings")
    for part in named:
        assert part in line, line


@pytest.mark.slow
def test_a_resume_under_the_other_script_or_another_store_is_refused(smoke_sweep, monkeypatch, capsys, tmp_path):
    line = refused(CATDOG, smoke_args(smoke_sweep), monkeypatch, capsys, smoke_sweep.tmp)
    assert "is a cifar10 sweep, not catdog" in line
    other = f"sqlite:///{tmp_path / 'other.db'}"
    line = refused(CIFAR10, [*smoke_args(smoke_sweep), "--tracking-uri", other], monkeypatch, capsys, smoke_sweep.tmp)
    assert f"--tracking-uri {other}" in line and "(it ran with sqlite:///" in line


@pytest.mark.slow
def test_a_second_driver_with_the_same_name_stops_before_writing(tmp_path):
    """Two sweeps started at once with one --name: the second exits 2 with one line; the first finishes
    with every run FINISHED and a journal without duplicate sequence numbers."""
    data = write_cifar_folders(tmp_path / "cifar", 16, 4)
    args = ["--smoke-test", "--confirm", "0", "--data-dir", str(data), "--no-download", "--name", "twice"]
    args += ["--out", str(tmp_path / "out"), "--storage-path", str(tmp_path / "ray")]
    script = str(ROOT / "sweeps" / "cifar10.py")
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    first = subprocess.Popen(
        [sys.executable, script, *args], cwd=tmp_path, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE
    )
    try:
        ops = tmp_path / "out" / "twice" / "journal" / "ops.jsonl"
        deadline = time.monotonic() + 240
        while not ops.exists() and first.poll() is None and time.monotonic() < deadline:
            time.sleep(0.2)
        assert ops.exists(), "the first sweep never started writing"
        second = subprocess.run(
            [sys.executable, script, *args], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=240
        )
        _, err = first.communicate(timeout=420)
    finally:
        if first.poll() is None:
            first.kill()
    lines = second.stderr.strip().splitlines()
    assert second.returncode == 2 and len(lines) == 1, second.stderr[-2000:]
    assert f"sweep 'twice' is being run by another process (pid {first.pid})" in lines[0]
    assert first.returncode == 0, err.decode()[-3000:]
    seqs = [json.loads(x)["seq"] for x in ops.read_text().splitlines() if x.strip()]
    assert len(seqs) == len(set(seqs))  # one writer
    c = MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}")
    runs = c.search_runs([c.get_experiment_by_name("cifar10").experiment_id])
    assert runs and {r.info.status for r in runs} == {"FINISHED"}


def test_a_read_only_or_full_folder_is_refused_at_the_start(tmp_path, monkeypatch, capsys):
    """--out or --storage-path on a read-only mount (root can write to a chmod 555 folder, so a real
    read-only tmpfs when this runs as root) or without room: exit 2 naming the flag, before anything."""
    ro = tmp_path / "ro"
    ro.mkdir()
    mounted = (
        os.geteuid() == 0
        and subprocess.run(["mount", "-t", "tmpfs", "-o", "ro,size=1m", "tmpfs", str(ro)]).returncode == 0
    )
    if not mounted:
        ro.chmod(0o555)  # not root: permissions hold
    tiny = tmp_path / "tiny"
    tiny.mkdir()
    full = (
        os.geteuid() == 0
        and subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1m", "tmpfs", str(tiny)]).returncode == 0
    )
    try:
        data = write_cifar_folders(tmp_path / "cifar", 4, 2)
        monkeypatch.chdir(tmp_path)
        base = ["--smoke-test", "--data-dir", str(data), "--no-download"]
        for flag, folder in (("--out", ro / "out"), ("--storage-path", ro / "ray")):
            rc = cli.main(CIFAR10, [*base, flag, str(folder)])
            err = capsys.readouterr().err.strip().splitlines()
            assert rc == 2 and len(err) == 1 and f"argument {flag}: {ro} is not writable" in err[0], err
        if full:
            rc = cli.main(CIFAR10, [*base, "--out", str(tiny / "out")])
            err = capsys.readouterr().err.strip().splitlines()
            assert rc == 2 and len(err) == 1 and "MB free on" in err[0] and "--out" in err[0], err
        else:  # without root no small file system can be made here; the free-space rule itself:
            with pytest.raises(cli.UsageError, match="MB free on"):
                cli.writable_folder(tmp_path, "--out", need_mb=10**12)
        assert not (tmp_path / "mlflow.db").exists() and not (tmp_path / "ray_results").exists()
    finally:
        for m, d in ((mounted, ro), (full, tiny)):
            if m:
                subprocess.run(["umount", str(d)])


@pytest.mark.slow
def test_a_disk_that_fills_mid_sweep_is_one_line_and_leaves_nothing_running(tmp_path):
    """The journal's writes fail as on a full --out (the `disk_full` fault, sweeps/faults.py) while the
    confirmation runs: one line, exit 1, every open MLflow run closed as KILLED; --resume finishes it."""
    data = write_cifar_folders(tmp_path / "cifar", 16, 4)
    args = [sys.executable, str(ROOT / "sweeps" / "cifar10.py"), "--smoke-test", "--data-dir", str(data)]
    args += ["--no-download", "--name", "full", "--out", str(tmp_path / "out"), "--storage-path", str(tmp_path / "ray")]
    fault = [{"kind": "disk_full", "at": "journal", "after": 25}]
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "CNNCLF_FAULTS": json.dumps(fault)}
    r = subprocess.run(args, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=420)
    lines = [x for x in r.stderr.splitlines() if x.strip()]
    assert r.returncode == 1 and "Traceback" not in r.stderr, r.stderr[-3000:]
    assert lines[-1].startswith("cifar10 sweep: error: No space left on device writing ") and "--resume" in lines[-1]
    c = MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}")
    exp = c.get_experiment_by_name("cifar10").experiment_id
    statuses = {(run.data.tags["role"], run.info.status) for run in c.search_runs([exp])}
    assert ("sweep", "KILLED") in statuses and not any(st == "RUNNING" for _, st in statuses), statuses
    env.pop("CNNCLF_FAULTS")
    r = subprocess.run([*args, "--resume"], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=420)
    assert r.returncode == 0, r.stderr[-3000:]
    assert {run.info.status for run in c.search_runs([exp])} == {"FINISHED"}
