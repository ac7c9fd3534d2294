"""Failure injection: sweeps survive crashes, bad data and outages with nothing lost.

Real processes, real signals, real Ray, Optuna and MLflow (SQLite, and a real `mlflow server`
subprocess for the outage), on small synthetic data. Faults inside trials come from
`CNNCLF_FAULTS` (sweeps/faults.py); the driver kill and the server outage come from outside.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

import optuna
import pytest
import torch
from mlflow.tracking import MlflowClient

from cnnclf.data import CIFAR10_CLASSES
from tests.conftest import write_cifar_folders
from tests.mlflow_server import free_port

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = str(ROOT / "sweeps" / "cifar10.py")
SMALL = ["--fix", "width=8", "--fix", "depth=2", "--scheduler", "fifo", "--confirm", "0", "--no-download"]

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def cifar_dir(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("reldata") / "cifar"
    write_cifar_folders(root, 16, 4)
    return root


def paths(tmp: Path, name: str, uri: str | None = None) -> list[str]:
    return [
        "--tracking-uri",
        uri or f"sqlite:///{tmp / 'mlflow.db'}",
        "--storage-path",
        str(tmp / "ray_results"),
        "--name",
        name,
        "--out",
        str(tmp / "out"),
    ]


def env(faults: list | None = None) -> dict:
    e = {**os.environ, "PYTHONUNBUFFERED": "1"}
    e.pop("CNNCLF_FAULTS", None)
    if faults:
        e["CNNCLF_FAULTS"] = json.dumps(faults)
    return e


def run(tmp: Path, args: list, faults: list | None = None, timeout: int = 420) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, SCRIPT, *map(str, args)],
        capture_output=True,
        text=True,
        timeout=timeout,
        cwd=tmp,
        env=env(faults),
    )


def start(tmp: Path, args: list, faults: list | None = None) -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, SCRIPT, *map(str, args)],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        cwd=tmp,
        env=env(faults),
    )


def wait_for_line(proc: subprocess.Popen, needle: str, timeout: float = 300) -> list[str]:
    seen, deadline = [], time.monotonic() + timeout
    for line in proc.stdout:
        seen.append(line)
        if needle in line:
            return seen
        if time.monotonic() > deadline:
            break
    raise AssertionError(f"{needle!r} never came:\n{''.join(seen)[-3000:]}")


def children(uri: str, sweep: str, experiment: str = "cifar10"):
    client = MlflowClient(uri)
    exp = client.get_experiment_by_name(experiment)
    found = client.search_runs([exp.experiment_id], f"tags.sweep = '{sweep}'", max_results=1000)
    parents = [r for r in found if r.data.tags["role"] == "sweep"]
    return client, parents, [r for r in found if r.data.tags["role"] != "sweep"]


def steps(client, run_id: str, key: str = "time/epoch_s") -> list[int]:  # logged by every epoch, a diverged one too
    return sorted(int(m.step) for m in client.get_metric_history(run_id, key))


def study(tmp: Path, name: str) -> optuna.Study:
    storage = f"sqlite:///{tmp / 'out' / name / 'optuna.db'}"
    return optuna.load_study(study_name=optuna.get_all_study_names(storage)[0], storage=storage)


# --- 1. the driver SIGKILLed, then --resume ------------------------------------------------------


@pytest.mark.parametrize("when", ["early", "mid", "checkpoint"])
def test_driver_killed_then_resume_loses_nothing_and_runs_nothing_twice(tmp_path, cifar_dir, when):
    name = f"kill-{when}"
    args = [
        "--data-dir", cifar_dir, "--num-samples", "3", "--max-epochs", "2", "--max-concurrent", "2",
        "--fix", "batch_size=16", *SMALL, *paths(tmp_path, name),
    ]  # fmt: skip
    marker = tmp_path / "writing"
    faults = None
    if when == "checkpoint":  # the second epoch's checkpoint of a search trial takes long to write
        faults = [
            {"kind": "sleep", "at": "checkpoint", "epoch": 2, "match": {"role": "trial"}, "seconds": 120,
             "marker": str(marker), "once": str(tmp_path / "once")},
        ]  # fmt: skip
    proc = start(tmp_path, args, faults)
    if when == "early":
        wait_for_line(proc, " started")  # the first trial has just begun
    elif when == "mid":
        wait_for_line(proc, " finished;")  # one trial done, others running or pending
    else:
        deadline = time.monotonic() + 300
        while not marker.exists() and proc.poll() is None and time.monotonic() < deadline:
            time.sleep(0.2)
        assert marker.exists(), "the checkpoint write never began"
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=60)
    proc.stdout.close()
    assert proc.returncode == -signal.SIGKILL

    r = run(tmp_path, [*args, "--resume"])
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    client, parents, runs = children(uri, name)
    assert len(parents) == 1 and parents[0].info.status == "FINISHED"
    assert [r.info.status for r in runs if r.info.status == "RUNNING"] == []
    done = [r for r in runs if r.info.status == "FINISHED"]
    roles = Counter(r.data.tags["role"] for r in done)
    assert roles == {"trial": 3, "baseline": 1}, [(r.data.tags, r.info.status) for r in runs]
    assert len({r.data.tags["trial_id"] for r in done}) == 4
    for c in runs:  # runs orphaned by the kill (if any) are closed as KILLED and tagged so
        if c.info.status != "FINISHED":
            assert c.info.status == "KILLED" and c.data.tags["status"] == "interrupted"
    for c in done:  # every epoch logged, none twice
        assert steps(client, c.info.run_id) == [1, 2], c.data.tags
        assert steps(client, c.info.run_id, "val/acc") == [1, 2]
    summary = json.loads((tmp_path / "out" / name / "summary.json").read_text())
    assert summary["outcomes"]["completed"] == 4 and sum(summary["outcomes"].values()) == 4
    s = study(tmp_path, name)
    states = Counter(t.state.name for t in s.trials)
    assert states == {"COMPLETE": 3}, states  # nothing RUNNING, nothing twice
    from cnnclf.train import load_model

    model, cfg, meta = load_model(tmp_path / "out" / name / "best_model.pt")
    assert cfg.width == 8 and len(meta["classes"]) == 10
    assert model(torch.zeros(1, 3, 32, 32)).shape == (1, 10)


def test_a_trial_stopped_after_tunes_last_snapshot_is_not_trained_on_by_resume(tmp_path, cifar_dir):
    """ASHA stopped a trial, the journal recorded it, and the driver died before Tune's next snapshot.

    The snapshot still has the trial running, so Tune's restore starts it again; the journal's word
    wins: the trial reports where it stopped and trains no further. Tune's snapshots are made rare
    (TUNE_GLOBAL_CHECKPOINT_S) and the stop is written to the journal as the callback writes it.
    """
    name = "stopped"
    args = [
        "--data-dir", cifar_dir, "--num-samples", "2", "--max-epochs", "3", "--max-concurrent", "1",
        "--no-baseline", "--fix", "batch_size=16", *SMALL, *paths(tmp_path, name),
    ]  # fmt: skip
    os.environ["TUNE_GLOBAL_CHECKPOINT_S"] = "3600"
    try:
        proc = start(tmp_path, args)
    finally:
        del os.environ["TUNE_GLOBAL_CHECKPOINT_S"]
    line = wait_for_line(proc, "epoch 1/3")[-1]  # "[0/2 done, 5s] <trial id> trial epoch 1/3 ..."
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=60)
    proc.stdout.close()
    trial_id = line.split("]", 1)[1].split()[0]
    state = max((tmp_path / "ray_results" / name).glob("experiment_state-*.json")).read_text()
    assert trial_id in state  # Tune's snapshot knows the trial, unfinished: its restore starts it again

    ops = tmp_path / "out" / name / "journal" / "ops.jsonl"
    seq = json.loads(ops.read_text().splitlines()[-1])["seq"]
    key = f"trial:{trial_id}"
    with ops.open("a") as f:  # what MLflowCallback journals when ASHA stops a trial at epoch 1
        f.write(json.dumps({"seq": seq + 1, "op": "log", "key": key,
                            "tags": [["status", "early_stopped"], ["stopped_by", "asha"]]}) + "\n")  # fmt: skip
        f.write(json.dumps({"seq": seq + 2, "op": "status", "key": key, "status": "FINISHED",
                            "ts": int(time.time() * 1000)}) + "\n")  # fmt: skip

    r = run(tmp_path, [*args, "--resume"])
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    client, _, runs = children(f"sqlite:///{tmp_path / 'mlflow.db'}", name)
    by_id = {c.data.tags["trial_id"]: c for c in runs}
    assert len(runs) == 2 and all(c.info.status == "FINISHED" for c in runs)
    stopped = by_id[trial_id]
    assert stopped.data.tags["status"] == "early_stopped" and stopped.data.tags["stopped_by"] == "asha"
    assert steps(client, stopped.info.run_id, "val/acc") == [1]  # not trained on after its stop
    [other] = [c for t, c in by_id.items() if t != trial_id]
    assert other.data.tags["status"] == "completed" and steps(client, other.info.run_id, "val/acc") == [1, 2, 3]
    last = json.loads(
        (tmp_path / "ray_results" / name / f"trial-{trial_id}" / "result.json").read_text().splitlines()[-1]
    )
    assert last["epoch"] == 1
    summary = json.loads((tmp_path / "out" / name / "summary.json").read_text())
    assert summary["outcomes"]["early_stopped"] == 1 and summary["outcomes"]["completed"] == 1


# --- 2. a trial's worker SIGKILLed ------------------------------------------------------------


def test_worker_killed_trial_resumes_from_its_checkpoint(tmp_path, cifar_dir):
    once = tmp_path / "killed"
    faults = [{"kind": "kill", "at": "epoch_end", "epoch": 2, "match": {"role": "trial"}, "once": str(once)}]
    args = [
        "--data-dir", cifar_dir, "--num-samples", "2", "--max-epochs", "3", "--no-baseline",
        "--fix", "batch_size=16", *SMALL, *paths(tmp_path, "wk"),
    ]  # fmt: skip
    r = run(tmp_path, args, faults)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    assert once.exists()  # the worker really was killed
    client, _, runs = children(f"sqlite:///{tmp_path / 'mlflow.db'}", "wk")
    assert len(runs) == 2 and all(r.info.status == "FINISHED" for r in runs)
    retried = [r for r in runs if r.data.tags.get("retries") == "1"]
    assert len(retried) == 1
    assert steps(client, retried[0].info.run_id, "val/acc") == [1, 2, 3]
    tid = retried[0].data.tags["trial_id"]
    lines = (tmp_path / "ray_results" / "wk" / f"trial-{tid}" / "result.json").read_text().splitlines()
    last = json.loads(lines[-1])
    assert last["training_iteration"] == 3 and last["iterations_since_restore"] < 3  # resumed, not restarted


def test_worker_killed_as_its_trial_starts_is_retried_and_completes(tmp_path, cifar_dir):
    """A worker that dies before its trial has reported anything (as when Ray's memory monitor kills it while
    the actor starts) is a trial failure: retried under --max-failures, then it trains as usual."""
    once = tmp_path / "killed"
    faults = [{"kind": "kill", "at": "start", "match": {"role": "trial"}, "once": str(once)}]
    args = [
        "--data-dir", cifar_dir, "--num-samples", "1", "--max-epochs", "1", "--no-baseline", "--max-failures", "1",
        *SMALL, *paths(tmp_path, "ks"),
    ]  # fmt: skip
    r = run(tmp_path, args, faults)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    assert once.exists() and "Traceback" not in r.stdout + r.stderr  # the worker really was killed, quietly
    _, _, runs = children(f"sqlite:///{tmp_path / 'mlflow.db'}", "ks")
    assert len(runs) == 1 and runs[0].info.status == "FINISHED" and runs[0].data.tags["status"] == "completed"
    assert runs[0].data.tags.get("retries") == "1" and "test/acc" in runs[0].data.metrics


# --- 3. a trial that always raises; 6. out of memory ------------------------------------------


def test_trials_that_raise_or_run_out_of_memory_fail_cleanly_and_the_rest_goes_on(tmp_path, cifar_dir):
    """Two faults in one sweep. The reference configuration, the search's first trial and the only one with lr
    exactly 0.05, runs out of memory: failed, not retried (it would run out again), the worst value for TPE. Every
    other trial with a batch of 64 or more raises: retried once (--max-failures 1), then failed everywhere. The
    rest, the later trials among them, complete."""
    faults = [
        {"kind": "oom", "at": "epoch_end", "epoch": 1, "match": {"lr": 0.05}},
        {"kind": "raise", "at": "epoch_end", "epoch": 1, "match": {"batch_size": [">=", 64]}},
    ]
    args = [
        "--data-dir", cifar_dir, "--num-samples", "4", "--max-epochs", "1", "--max-failures", "1",
        "--max-concurrent", "1", "--seed", "0", *SMALL, *paths(tmp_path, "faults"),
    ]  # fmt: skip
    r = run(tmp_path, args, faults)
    assert r.returncode == 1, r.stdout[-3000:] + r.stderr[-3000:]  # some trials failed
    _, parents, runs = children(f"sqlite:///{tmp_path / 'mlflow.db'}", "faults")
    oom = [c for c in runs if c.data.tags["status"] == "oom"]
    big = [c for c in runs if int(c.data.params["batch_size"]) >= 64 and c not in oom]
    small = [c for c in runs if int(c.data.params["batch_size"]) < 64]
    assert big and small, "seed 0 should give batch sizes >= 64 and < 64 beside the reference"
    for c in big:
        assert c.info.status == "FAILED" and c.data.tags["status"] == "error"
        assert c.data.tags["retries"] == "1" and "injected fault" in c.data.tags["error"]
    assert all(c.info.status == "FINISHED" and "test/acc" in c.data.metrics for c in small)
    assert len(oom) == 1 and oom[0].info.status == "FAILED" and "OutOfMemoryError" in oom[0].data.tags["error"]
    assert oom[0].data.tags.get("retries") is None  # not retried: it would run out of memory again
    assert oom[0].data.metrics["resources/gpu_mem_after_mb"] == 0.0  # the failure's own result reached MLflow
    later = [c for c in small if c.info.start_time > oom[0].info.end_time]
    assert later, "trials ran after the one that ran out of memory"
    summary = json.loads((tmp_path / "out" / "faults" / "summary.json").read_text())
    assert summary["outcomes"]["error"] == len(big) and "ERROR" in summary["trial_statuses"].values()
    assert summary["outcomes"]["oom"] == 1 and summary["outcomes"]["completed"] == len(small)
    trials = study(tmp_path, "faults").trials
    states = Counter(t.state.name for t in trials)
    assert states["FAIL"] == len(big) and "RUNNING" not in states
    ooms = [t for t in trials if t.user_attrs.get("status") == "oom"]
    assert len(ooms) == 1 and ooms[0].state.name == "COMPLETE" and ooms[0].value == 0.0  # worst value: TPE learns
    assert (tmp_path / "out" / "faults" / "report.html").is_file()
    assert parents[0].info.status == "FINISHED"


def test_train_or_oom_turns_oom_into_a_failure_result():
    from cnnclf.data import TaskData
    from sweeps.cifar10 import SPEC
    from sweeps.trainable import train_or_oom

    g = torch.Generator().manual_seed(0)
    x = torch.randint(0, 255, (40, 3, 32, 32), dtype=torch.uint8, generator=g)
    y = torch.arange(40) % 10
    data = TaskData("cifar10", CIFAR10_CLASSES, x, y, x[:20], y[:20], x[:20], y[:20])
    cfg = SPEC.base.replace(width=8, depth=2, epochs=2, batch_size=16)

    def report(epoch, metrics, save):
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")

    result = train_or_oom(cfg, data, report, device="cpu")
    assert result["failure"] == "oom" and "Tried to allocate" in result["error"]
    assert train_or_oom(cfg, data, lambda *a: None, device="cpu") is None


@pytest.mark.gpu
def test_out_of_memory_releases_device_memory():
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA device")
    from cnnclf.data import TaskData
    from sweeps.cifar10 import SPEC
    from sweeps.trainable import train_or_oom

    x = torch.randint(0, 255, (512, 3, 32, 32), dtype=torch.uint8)
    y = torch.arange(512) % 10
    data = TaskData("cifar10", CIFAR10_CLASSES, x, y, x, y, x, y).to("cuda")
    before = torch.cuda.memory_allocated()
    cfg = SPEC.base.replace(width=64, depth=6, epochs=1, batch_size=256)

    def report(epoch, metrics, save):
        raise torch.OutOfMemoryError("injected")

    assert train_or_oom(cfg, data, report, device="cuda")["failure"] == "oom"
    assert torch.cuda.memory_allocated() == before  # the model, optimizer and activations are gone


# --- 4. NaN divergence ------------------------------------------------------------------------


def test_diverged_trials_stop_within_one_epoch_and_are_recorded_everywhere(tmp_path, cifar_dir):
    args = [
        "--data-dir", cifar_dir, "--num-samples", "2", "--max-epochs", "3", "--max-concurrent", "1",
        "--fix", "model=tutorial", "--fix", "optimizer=sgd", "--fix", "lr=50", "--fix", "momentum=0.9",
        "--fix", "schedule=constant", "--fix", "warmup_epochs=0", "--fix", "batch_size=8",
        *SMALL, *paths(tmp_path, "nan"),
    ]  # fmt: skip
    r = run(tmp_path, args)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]  # divergence is an outcome, not a crash
    assert "DIVERGED" in r.stdout
    client, _, runs = children(f"sqlite:///{tmp_path / 'mlflow.db'}", "nan")
    trials = [c for c in runs if c.data.tags["role"] == "trial"]
    assert len(trials) == 2
    for c in trials:
        assert c.info.status == "FAILED" and c.data.tags["status"] == "diverged"
        assert steps(client, c.info.run_id) == [1]  # stopped in its first epoch
        assert "val/acc" not in c.data.metrics  # the stand-in 0.0 is for Tune and Optuna only
        assert c.data.tags["diverged"] == "true" and "diverged" not in c.data.metrics
    baseline = next(c for c in runs if c.data.tags["role"] == "baseline")
    assert baseline.info.status == "FINISHED" and "diverged" not in baseline.data.tags
    summary = json.loads((tmp_path / "out" / "nan" / "summary.json").read_text())
    assert summary["outcomes"]["diverged"] == 2 and summary["outcomes"]["completed"] == 1
    ot = study(tmp_path, "nan").trials
    assert [(t.state.name, t.value, t.user_attrs["status"]) for t in ot] == [("COMPLETE", 0.0, "diverged")] * 2


# --- 5. corrupt images in both tasks' folders --------------------------------------------------


def test_sweep_runs_on_folders_with_corrupt_files_and_counts_them(tmp_path):
    """CIFAR-10's class folders; Cat/Dog's flat layout is tests/test_sweeps.py's Cat/Dog smoke sweep."""
    from tests.conftest import add_bad_files

    task, root = "cifar10", tmp_path / "data"
    write_cifar_folders(root, 12, 4)
    bad = {**add_bad_files(root / "train" / "cat"), **add_bad_files(root / "test" / "dog")}
    work = tmp_path / "work"
    work.mkdir()
    script = str(ROOT / "sweeps" / f"{task}.py")
    r = subprocess.run(
        [sys.executable, script, "--smoke-test", "--data-dir", str(root), "--confirm", "0", "--no-download",
         *paths(work, "bad")],
        capture_output=True, text=True, timeout=420, cwd=work, env=env(),
    )  # fmt: skip
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    assert f"({len(bad)} files skipped)" in r.stdout
    _, parents, runs = children(f"sqlite:///{work / 'mlflow.db'}", "bad", experiment=task)
    assert parents[0].data.metrics["data/files_skipped"] == len(bad)
    assert len(runs) == 3 and all(c.info.status == "FINISHED" for c in runs)


# --- 7. the MLflow server goes down ---------------------------------------------------------------


@pytest.fixture
def server(tmp_path, mlflow_server):
    """A real `mlflow server` on a SQLite store (tests/mlflow_server.py); stopped and started again on the
    same port and store, and killed at the end."""
    s = mlflow_server(f"sqlite:///{tmp_path / 'server.db'}", artifacts_destination=tmp_path / "server-artifacts")
    yield s
    s.stop(kill=True)


def test_mlflow_outage_mid_sweep_loses_nothing(tmp_path, cifar_dir, server):
    server.start(timeout=120)
    args = [
        "--data-dir", cifar_dir, "--num-samples", "2", "--max-epochs", "3", "--max-concurrent", "1",
        "--no-baseline", "--fix", "batch_size=4", *SMALL, *paths(tmp_path, "out1", server.url),
    ]  # fmt: skip
    proc = start(tmp_path, args)
    wait_for_line(proc, "epoch 1/3")
    server.stop(kill=True)  # down for the middle of the sweep
    # Up again only once the journal has found it down (on a busy machine the lines are read late: the sweep may
    # be past its training by now, with only its last writes left) and training went on meanwhile.
    seen = wait_for_line(proc, "unreachable")
    if not any("epoch 3/3" in line for line in seen):
        seen += wait_for_line(proc, "epoch 3/3")
    server.start(timeout=120)
    out, _ = proc.communicate(timeout=300)
    text = "".join(seen) + out
    assert proc.returncode == 0, text[-3000:]
    assert "unreachable" in text and "reachable again" in text
    client, parents, runs = children(server.url, "out1")
    assert len(parents) == 1 and parents[0].info.status == "FINISHED"
    assert len(runs) == 2 and all(r.info.status == "FINISHED" for r in runs)
    for r in runs:
        assert steps(client, r.info.run_id, "val/acc") == [1, 2, 3] and "test/acc" in r.data.metrics
    assert "report" in {a.path for a in client.list_artifacts(parents[0].info.run_id)}


def test_mlflow_down_until_the_end_then_sync_writes_everything(tmp_path, cifar_dir, server):
    server.start(timeout=120)
    args = [
        "--data-dir", cifar_dir, "--num-samples", "2", "--max-epochs", "2", "--max-concurrent", "1",
        "--no-baseline", "--fix", "batch_size=16", "--mlflow-wait", "3", *SMALL, *paths(tmp_path, "out2", server.url),
    ]  # fmt: skip
    proc = start(tmp_path, args)
    wait_for_line(proc, " started")
    server.stop(kill=True)  # and it stays down
    out, _ = proc.communicate(timeout=300)
    assert proc.returncode == 1, out[-3000:]
    assert "--sync" in out and "stayed unreachable" in out
    assert (tmp_path / "out" / "out2" / "summary.json").is_file()  # the sweep itself finished

    r = run(tmp_path, ["--sync", "--name", "out2", "--out", tmp_path / "out"])
    assert r.returncode == 2 and "--tracking-uri" in r.stderr  # still down: a one-line error, nothing lost
    server.start(timeout=120)
    r = run(tmp_path, ["--sync", "--name", "out2", "--out", tmp_path / "out"])
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    client, parents, runs = children(server.url, "out2")
    assert len(parents) == 1 and parents[0].info.status == "FINISHED"
    assert "best/val/acc" in parents[0].data.metrics
    assert len(runs) == 2 and all(r.info.status == "FINISHED" for r in runs)
    for r in runs:
        assert steps(client, r.info.run_id, "val/acc") == [1, 2]
    assert (tmp_path / "out" / "out2" / "report.html").is_file()


def test_mlflow_unreachable_at_start_exits_2_before_training(tmp_path, cifar_dir):
    port = free_port()
    r = run(
        tmp_path,
        ["--data-dir", cifar_dir, "--num-samples", "2", *SMALL, *paths(tmp_path, "x", f"http://127.0.0.1:{port}")],
    )
    assert r.returncode == 2 and len(r.stderr.strip().splitlines()) == 1 and "--tracking-uri" in r.stderr
    assert "epoch" not in r.stdout and not (tmp_path / "ray_results").exists() and not (tmp_path / "out").exists()


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM], ids=["ctrl-c", "sigterm"])
def test_interrupt_while_the_last_trials_run_saves_state_and_resumes(tmp_path, cifar_dir, sig):
    # No trial pending: Tune's cleanup marks the running ones TERMINATED without telling callbacks.
    # SIGTERM (`kill`, `timeout`, `ray job stop`) takes Ctrl-C's path.
    args = [
        "--data-dir", cifar_dir, "--num-samples", "1", "--max-epochs", "3", "--no-baseline",
        "--fix", "batch_size=4", *SMALL, *paths(tmp_path, "last"),
    ]  # fmt: skip
    proc = start(tmp_path, args)
    wait_for_line(proc, "epoch 1/3")
    proc.send_signal(sig)
    out, _ = proc.communicate(timeout=180)
    assert proc.returncode == 130, out[-3000:]
    assert "--resume" in out and not (tmp_path / "out" / "last" / "summary.json").exists()
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    _, parents, runs = children(uri, "last")
    assert [r.info.status for r in [*parents, *runs]] == ["KILLED", "KILLED"]
    r = run(tmp_path, [*args, "--resume"])
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    client, parents, runs = children(uri, "last")
    assert parents[0].info.status == "FINISHED" and len(runs) == 1 and runs[0].info.status == "FINISHED"
    assert runs[0].data.tags["status"] == "completed"  # not early_stopped: it ran all 3 epochs
    assert steps(client, runs[0].info.run_id, "val/acc") == [1, 2, 3]


# --- Ray's memory monitor kills the trials' workers ---------------------------------------------


def test_ray_killing_every_worker_for_memory_is_one_line_every_trial_recorded_then_resume_completes(
    tmp_path, cifar_dir
):
    """Ray's memory monitor, set to act at 5% of the node's memory, kills every trial worker as it starts
    (as it does on a busy machine). Each trial is retried (--max-failures 1) and then recorded as oom: no
    traceback on the console, one line with the cause and the resume command, nothing left RUNNING. The same
    command with --resume, without the low threshold, completes the sweep."""
    args = [
        "--data-dir", cifar_dir, "--num-samples", "2", "--max-epochs", "1", "--max-failures", "1", "--seed", "0",
        *SMALL, *paths(tmp_path, "memkill"),
    ]  # fmt: skip
    e = {**env(), "RAY_memory_usage_threshold": "0.01", "RAY_memory_monitor_refresh_ms": "50"}
    r = subprocess.run([sys.executable, SCRIPT, *map(str, args)], capture_output=True, text=True, timeout=420,
                       cwd=tmp_path, env=e)  # fmt: skip
    out = r.stdout + r.stderr
    assert r.returncode == 1, out[-3000:]
    assert "Traceback" not in out, out[-3000:]
    errors = [line for line in r.stderr.splitlines() if "error:" in line]
    assert len(errors) == 1 and "oom" in errors[0] and "--resume" in errors[0], r.stderr[-2000:]
    assert (tmp_path / "out" / "memkill" / "sweep.log").read_text().count("Traceback") >= 1  # kept, in the log
    _, parents, runs = children(f"sqlite:///{tmp_path / 'mlflow.db'}", "memkill")
    assert all(c.info.status != "RUNNING" for c in [*parents, *runs])
    assert len(runs) == 3 and {c.data.tags["status"] for c in runs} <= {"oom", "error"}  # 2 trials, the baseline
    assert all(c.info.status == "FAILED" and c.data.tags.get("error") for c in runs)  # each with its cause
    summary = json.loads((tmp_path / "out" / "memkill" / "summary.json").read_text())
    assert summary["outcomes"]["oom"] + summary["outcomes"]["error"] == 3  # 2 trials and the baseline
    again = run(tmp_path, [*args, "--resume"])
    assert again.returncode == 0, again.stdout[-3000:] + again.stderr[-3000:]
    _, _, runs = children(f"sqlite:///{tmp_path / 'mlflow.db'}", "memkill")
    done = [c for c in runs if c.data.tags.get("status") == "completed"]
    assert len(done) == 3 and all("test/acc" in c.data.metrics for c in done)
