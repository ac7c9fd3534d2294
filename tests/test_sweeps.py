"""Sweeps with real Ray Tune, real Optuna and real MLflow (SQLite in a temporary folder), on synthetic data."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import optuna
import pytest
from mlflow.tracking import MlflowClient

from cnnclf.config import TrainConfig
from sweeps.cli import UsageError, parse_fix
from sweeps.searchers import Space
from tests.conftest import add_bad_files, write_catdog_flat, write_cifar_folders

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def cifar_dir(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("sweepdata") / "cifar"
    write_cifar_folders(root, 16, 4)
    return root


def sweep(script: str, tmp: Path, *args, timeout=420) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, str(ROOT / "sweeps" / f"{script}.py"), *map(str, args)],
        capture_output=True,
        text=True,
        timeout=timeout,
        cwd=tmp,
        env={**os.environ, "PYTHONUNBUFFERED": "1"},
    )


def common(tmp: Path, name: str) -> list[str]:
    return [
        "--tracking-uri",
        f"sqlite:///{tmp / 'mlflow.db'}",
        "--storage-path",
        tmp / "ray_results",
        "--name",
        name,
        "--out",
        tmp / "out",
        "--no-download",
    ]


def runs(tmp: Path, experiment: str, sweep_name: str):
    client = MlflowClient(f"sqlite:///{tmp / 'mlflow.db'}")
    exp = client.get_experiment_by_name(experiment)
    all_runs = client.search_runs([exp.experiment_id], f"tags.sweep = '{sweep_name}'", max_results=1000)
    parents = [r for r in all_runs if r.data.tags["role"] == "sweep"]
    children = [r for r in all_runs if r.data.tags["role"] != "sweep"]
    return client, parents, children


# --- the search space and flags (no Ray) -------------------------------------------------------


def test_space_is_conditional():
    from sweeps.cifar10 import SPEC

    study = optuna.create_study(direction="maximize", sampler=optuna.samplers.RandomSampler(seed=0))
    space = Space(SPEC.ranges, {})
    seen = set()
    for _ in range(60):
        params = space(study.ask())
        seen.add(params["optimizer"])
        if params["optimizer"] == "sgd":
            assert "momentum" in params and "amsgrad" not in params
            assert SPEC.ranges.lr_sgd[0] <= params["lr"] <= SPEC.ranges.lr_sgd[1]
        else:
            assert "amsgrad" in params and "momentum" not in params
            assert SPEC.ranges.lr_adam[0] <= params["lr"] <= SPEC.ranges.lr_adam[1]
        assert params["batch_size"] in SPEC.ranges.batch_size and params["kernel_size"] in (3, 5, 7)
    assert seen == {"sgd", "adam", "adamw"}


def test_fixed_parameters_are_not_searched():
    from sweeps.catdog import SPEC

    study = optuna.create_study(direction="maximize")
    trial = study.ask()
    params = Space(SPEC.ranges, {"optimizer": "sgd", "lr": 0.05, "label_smoothing": 0.1})(trial)
    assert params["optimizer"] == "sgd" and params["lr"] == 0.05 and params["label_smoothing"] == 0.1
    assert "optimizer" not in trial.params and "lr" not in trial.params and "momentum" in trial.params


def test_parse_fix_types_and_errors():
    base = TrainConfig()
    assert parse_fix(["lr=0.1", "amsgrad=true", "depth=3", "optimizer=adamw"], base) == {
        "lr": 0.1,
        "amsgrad": True,
        "depth": 3,
        "optimizer": "adamw",
    }
    for bad, needle in [
        ("learning_rate=1", "unknown parameter"),
        ("depth=x", "depth"),
        ("kernel_size=4", "kernel_size"),
        ("optimizer=lbfgs", "optimizer"),
        ("lr", "name=value"),
    ]:
        with pytest.raises(UsageError, match=needle):
            parse_fix([bad], base)
    with pytest.raises(UsageError, match="amsgrad only applies"):
        parse_fix(["optimizer=sgd", "amsgrad=true"], base)


@pytest.mark.parametrize(
    ("args", "needle"),
    [
        (["--fix", "colour=red"], "--fix"),
        (["--fix", "batch_size=big"], "--fix"),
        (["--num-samples", "0"], "--num-samples"),
        (["--scheduler", "hyperband"], "--scheduler"),
        (["--resume"], "--resume"),
        (["--tracking-uri", "http://127.0.0.1:9"], "--tracking-uri"),
        (["--data-dir", "/nonexistent/data"], "/nonexistent/data"),
    ],
)
def test_bad_input_exits_2_before_ray(tmp_path, args, needle):
    r = sweep("cifar10", tmp_path, "--no-download", *args, timeout=120)
    assert r.returncode == 2, r.stderr
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and needle in lines[0], r.stderr
    assert list(tmp_path.iterdir()) == []  # nothing written: no mlflow.db, no ray_results


# --- real sweeps ------------------------------------------------------------------------------


def test_smoke_sweep_cifar10(smoke_sweep):
    """The shared smoke sweep (tests/conftest.py: --smoke-test with --num-samples 3; the smoke default of 2 trials
    is the Cat/Dog smoke sweep's, below)."""
    r, tmp_path = smoke_sweep.result, smoke_sweep.tmp
    assert "recommended: " in r.stdout and "reproduce: python -m cnnclf train" in r.stdout
    client, parents, children = runs(tmp_path, "cifar10", "smoke")
    assert len(parents) == 1 and parents[0].info.status == "FINISHED"
    assert "best/val/acc" in parents[0].data.metrics and parents[0].data.params["sweep.num_samples"] == "3"
    assert all(k.startswith("sweep.") for k in parents[0].data.params)  # the flags, apart from hyperparameters
    roles = sorted(c.data.tags["role"] for c in children)
    assert roles == ["baseline", "confirm", "trial", "trial", "trial"]  # --smoke-test confirms the best, 1 seed
    best_trial = parents[0].data.tags["best.trial_id"]
    assert json.loads(parents[0].data.tags["best.config"])["model"] == "cnn"
    confirm = next(c for c in children if c.data.tags["role"] == "confirm")
    assert confirm.data.tags["confirm_of"] == best_trial and confirm.data.params["seed"] == "1000"
    for c in children:
        assert c.data.tags["mlflow.parentRunId"] == parents[0].info.run_id
        assert c.info.status == "FINISHED" and c.data.tags["status"] == "completed"
        assert {"optimizer", "lr", "batch_size", "depth", "kernel_size", "width", "weight_decay"} <= set(c.data.params)
        assert {"val/acc", "train/loss", "train/lr", "test/acc", "test/acc/cat"} <= set(c.data.metrics)
        assert not {"epoch", "lr", "diverged"} & set(c.data.metrics) and "diverged" not in c.data.tags
        assert [m.step for m in client.get_metric_history(c.info.run_id, "val/acc")] == [1]
    baseline = next(c for c in children if c.data.tags["role"] == "baseline")
    assert baseline.data.params["model"] == "tutorial" and baseline.data.params["batch_size"] == "4"
    best = json.loads((tmp_path / "out" / "smoke" / "best_config.json").read_text())
    assert best["config"]["model"] == "cnn" and best["command"].startswith("python -m cnnclf train --task cifar10")
    artifacts = {a.path for a in client.list_artifacts(parents[0].info.run_id)}
    assert "best_config.json" in artifacts and "best_model" in artifacts
    for r in [*parents, *children]:  # nothing is both a param and a metric
        assert not set(r.data.params) & set(r.data.metrics), r.data.tags["role"]


@pytest.mark.slow
def test_smoke_sweep_catdog_on_a_folder_with_corrupt_files_counts_them(tmp_path):
    """Cat/Dog's smoke sweep, on Kaggle's flat layout with every kind of broken file beside the photos
    (docs/reliability.md 5; CIFAR-10's folders: tests/test_reliability.py): skipped, counted, and the sweep runs."""
    catdog_dir = write_catdog_flat(tmp_path / "dogs-vs-cats", 40)
    bad = add_bad_files(catdog_dir / "train", prefix="dog.")
    work = tmp_path / "work"
    work.mkdir()
    r = sweep("catdog", work, "--smoke-test", "--data-dir", catdog_dir, *common(work, "cd"))
    assert r.returncode == 0, r.stderr[-3000:]
    assert f"({len(bad)} files skipped)" in r.stdout
    _client, parents, children = runs(work, "catdog", "cd")
    assert parents[0].data.metrics["data/files_skipped"] == len(bad)
    assert len(parents) == 1 and len(children) == 4 and parents[0].data.params["sweep.num_samples"] == "2"
    assert sorted(c.data.tags["role"] for c in children) == ["baseline", "confirm", "trial", "trial"]  # smoke: 2
    assert all(c.info.status == "FINISHED" for c in [*parents, *children])
    assert (work / "out" / "cd" / "report.html").is_file()
    assert all(c.data.params["image_size"] == "64" for c in children)
    assert {"test/acc/cat", "test/acc/dog"} <= set(children[0].data.metrics)


@pytest.mark.slow
def test_epochs_logged_per_step_and_fractional_gpus(tmp_path, cifar_dir, monkeypatch):
    # No GPU here: declare one to Ray, so the 0.5-GPU requests are scheduled as asked (two at a time).
    # --budget-by epochs: no cost guard, so a fault in its probe never even runs (tests/test_time_budget.py).
    slow = [{"kind": "sleep", "at": "probe", "seconds": 3, "once": str(tmp_path / "slowed")}]
    monkeypatch.setenv("CNNCLF_FAULTS", json.dumps(slow))
    r = sweep(
        "cifar10",
        tmp_path,
        "--budget-by",
        "epochs",
        "--data-dir",
        cifar_dir,
        "--num-samples",
        "2",
        "--max-epochs",
        "2",
        "--scheduler",
        "fifo",
        "--no-baseline",
        "--confirm",
        "0",
        "--fix",
        "width=8",
        "--fix",
        "depth=2",
        "--fix",
        "batch_size=32",
        "--ray-num-gpus",
        "1",
        "--gpus-per-trial",
        "0.5",
        *common(tmp_path, "gpu"),
    )
    assert r.returncode == 0, r.stderr[-3000:]
    assert "budget by epochs" in r.stdout and "ETA about" in r.stdout
    client, _parents, children = runs(tmp_path, "cifar10", "gpu")
    assert len(children) == 2 and not (tmp_path / "slowed").exists()
    assert all(c.data.tags["status"] == "completed" for c in children)
    for c in children:
        assert c.data.metrics["resources/gpu"] == 0.5
        assert [m.step for m in client.get_metric_history(c.info.run_id, "val/acc")] == [1, 2]
        assert [m.step for m in client.get_metric_history(c.info.run_id, "train/loss")] == [1, 2]
        assert c.data.params["width"] == "8" and c.data.params["epochs"] == "2"
    a, b = sorted(children, key=lambda c: c.info.start_time)
    assert b.info.start_time < a.info.end_time  # both packed onto the one GPU at once


@pytest.mark.slow
def test_interrupted_sweep_resumes_to_exactly_num_samples(tmp_path, cifar_dir):
    args = [
        "--data-dir",
        cifar_dir,
        "--num-samples",
        "3",
        "--max-epochs",
        "2",
        "--scheduler",
        "fifo",
        "--confirm",
        "0",
        "--max-concurrent",
        "1",
        "--fix",
        "width=8",
        "--fix",
        "depth=2",
        "--fix",
        "batch_size=16",
        *common(tmp_path, "res"),
    ]
    proc = subprocess.Popen(
        [sys.executable, str(ROOT / "sweeps" / "cifar10.py"), *map(str, args)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        cwd=tmp_path,
        env={**os.environ, "PYTHONUNBUFFERED": "1"},
    )
    deadline = time.monotonic() + 300
    for line in proc.stdout:
        if "finished" in line or time.monotonic() > deadline:
            break  # the first trial (the baseline) is done; others are pending
    proc.send_signal(signal.SIGINT)  # Ctrl-C
    _, err = proc.communicate(timeout=180)
    assert proc.returncode == 130, err[-3000:]
    assert "--resume" in err
    _, parents, children = runs(tmp_path, "cifar10", "res")
    assert all(r.info.status != "RUNNING" for r in [*parents, *children])
    assert len(children) < 4

    r = sweep("cifar10", tmp_path, *args, "--resume")
    assert r.returncode == 0, r.stderr[-3000:]
    _, parents, children = runs(tmp_path, "cifar10", "res")
    assert len(parents) == 1 and parents[0].info.status == "FINISHED"
    assert len({c.data.tags["trial_id"] for c in children}) == len(children) == 4  # 3 + baseline, none twice
    assert all(c.info.status == "FINISHED" for c in children)
    summary = json.loads((tmp_path / "out" / "res" / "summary.json").read_text())
    assert sum(summary["outcomes"].values()) == 4


def test_reproduce_command_round_trips_through_the_cli():
    import shlex

    from cnnclf.__main__ import build_parser, config_from_args
    from sweeps.catdog import SPEC
    from sweeps.finish import reproduce_command

    for cfg in (
        SPEC.base.replace(optimizer="adamw", amsgrad=True, lr=0.00123456789, depth=6, width=48, epochs=12),
        SPEC.baseline,
        SPEC.base.replace(optimizer="sgd", momentum=0.93, nesterov=True, subset=500, seed=7),
    ):
        argv = shlex.split(reproduce_command(cfg))
        assert argv[:4] == ["python", "-m", "cnnclf", "train"]
        assert config_from_args(build_parser().parse_args(argv[3:])) == cfg


def test_confirm_configs_take_the_top_completed_with_fresh_seeds():
    from sweeps.cifar10 import SPEC
    from sweeps.finish import Row, confirm_configs, rank
    from sweeps.finish import confirmations as confirmation_stats
    from sweeps.spec import answer

    def row(tid, val, outcome="completed", role="trial", test=None, confirm_of=None, seed=0):
        cfg = SPEC.base.replace(lr=(val or 0.5) / 10, seed=seed)
        return Row(tid, role, outcome, cfg, val, test, 10, None, confirm_of)

    rows = [row("a", 0.7), row("b", 0.9, "early_stopped"), row("c", 0.8), row("d", None, "diverged"), row("e", 0.75)]
    ranked = rank(rows)
    assert [r.trial_id for r in ranked] == ["c", "e", "a", "b"]  # completed first, by val/acc; never by test
    configs = confirm_configs(ranked, top=2, seeds=3, seed=5)
    assert [(c["confirm_of"], c["seed"]) for c in configs] == [
        ("c", 1005), ("c", 2005), ("c", 3005), ("e", 1005), ("e", 2005), ("e", 3005)]  # fmt: skip
    assert all(c["role"] == "confirm" and c["lr"] == 0.08 for c in configs[:3])
    assert all(c["split_seed"] == 0 for c in configs)  # the search's data and splits; only training's seed is new
    confirms = [row(f"c{i}", 0.8, role="confirm", test=t, confirm_of="c") for i, t in enumerate((0.7, 0.8, 0.9))]
    st = confirmation_stats(answer([r.as_run() for r in rows + confirms]))["c"]
    assert st["n"] == 3 and st["test_mean"] == pytest.approx(0.8) and st["test_std"] == pytest.approx(0.1)
    assert st["test_ci95"][0] == pytest.approx(0.8 - 4.303 * 0.1 / 3**0.5, abs=1e-3)


def test_prune_checkpoints_keeps_newest_best_and_recent(tmp_path):
    from sweeps.trainable import KEEP_RECENT_S, METRICS_FILE, prune_checkpoints

    now = time.time()
    accs = {1: 0.5, 2: 0.9, 3: 0.6, 4: 0.7, 5: 0.65}
    for epoch, acc in accs.items():
        d = tmp_path / f"checkpoint_{epoch - 1:06d}"
        d.mkdir()
        (d / METRICS_FILE).write_text(json.dumps({"epoch": epoch, "val/acc": acc}))
        age = KEEP_RECENT_S + 100 if epoch <= 3 else 10  # epochs 4 and 5 were written moments ago
        os.utime(d, (now - age, now - age))
    (tmp_path / "checkpoint_000009").mkdir()  # being written: no metrics yet, left alone
    gone = prune_checkpoints(tmp_path, now=now)
    assert sorted(d.name for d in gone) == ["checkpoint_000000", "checkpoint_000002"]  # old and neither best nor newest
    left = sorted(d.name for d in tmp_path.iterdir())
    assert left == ["checkpoint_000001", "checkpoint_000003", "checkpoint_000004", "checkpoint_000009"]


def test_orphaned_trials_are_handed_out_again_with_their_config_and_adopted(tmp_path):
    from sweeps.cifar10 import SPEC
    from sweeps.context import open_context
    from sweeps.journal import Journal, trial_key
    from sweeps.resume import Orphans
    from sweeps.searchers import Space, make_searcher

    journal = Journal(tmp_path / "journal", "sqlite:///unused.db", "cifar10", "s", verbose=False)
    ctx = open_context(journal)  # the sweep folder tmp_path: its searchers find the orphans here
    space = Space(SPEC.ranges, {"width": 8}, experiment="first")
    first = make_searcher(space, None, seed=0, study=tmp_path / "first.db", max_concurrent=None)
    configs = {tid: first.suggest(tid) for tid in ("a", "b", "c")}
    for tid, cfg in configs.items():
        journal.append("create_run", trial_key(tid), trial_id=tid, config=cfg, ts=0)
    # An extension's trial (another Tune experiment of the same sweep) is never an orphan of the first search.
    journal.append("create_run", trial_key("x"), trial_id="x", config=configs["a"], ts=0, experiment="s-more1")
    # Tune's last snapshot knew "a" and "b"; "c" began after it, then the driver was killed.
    orphans = Orphans.from_journal(journal, {"a", "b"}, str(tmp_path / "s"), roles=("trial", "baseline"))
    assert [(o.trial_id, o.dirs) for o in orphans.entries] == [("c", [str(tmp_path / "s" / "trial-c")])]

    space = Space(SPEC.ranges, {"width": 8}, experiment="again")
    again = make_searcher(space, None, seed=7, study=tmp_path / "again.db", max_concurrent=None)  # another seed
    ctx.orphans["again"] = orphans  # what sweeps.resume.adopt does
    adopted = again.suggest("d")
    assert adopted["adopt"]["trial_id"] == "c"
    assert {k: v for k, v in adopted.items() if k != "adopt"} == configs["c"]  # exactly its config
    assert "adopt" not in again.suggest("e")  # then Optuna goes on as usual
    assert [t.state.name for t in again.study().trials] == ["RUNNING", "RUNNING"]
    journal.close(timeout=0)


def test_journal_cuts_a_line_torn_by_a_kill_and_keeps_the_rest(tmp_path):
    from sweeps.journal import Journal, trial_key

    j = Journal(tmp_path, "sqlite:///unused.db", "cifar10", "s", verbose=False)
    j.append("create_run", trial_key("a"), trial_id="a", config={"lr": 0.1}, ts=0)
    j.append("log", trial_key("a"), metrics=[["val/acc", 0.5, 0, 1]])
    j._file.close()
    with open(tmp_path / "ops.jsonl", "a") as f:
        f.write('{"seq": 3, "op": "log", "key": "trial:a", "metr')  # the driver died mid-write
    again = Journal(tmp_path, "sqlite:///unused.db", "cifar10", "s", verbose=False)
    assert again.seq == 2 and again.trials["trial:a"].last_step == 1 and again.pending() == 2
    again.append("log", trial_key("a"), metrics=[["val/acc", 0.6, 0, 2]])
    again._file.close()
    third = Journal(tmp_path, "sqlite:///unused.db", "cifar10", "s", verbose=False)
    assert third.seq == 3 and third.trials["trial:a"].last_step == 2  # the op after the tear is not lost
    assert not (tmp_path / "unused.db").exists() and not Path("unused.db").exists()  # nothing applied


def test_journal_completes_a_run_whose_params_a_crash_cut_short_and_never_makes_it_twice(tmp_path):
    from sweeps.journal import SWEEP_KEY, Journal, trial_key

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    folder = tmp_path / "journal"
    j = Journal(folder, uri, "cifar10", "s", verbose=False)
    j.append("create_run", SWEEP_KEY, name="s", ts=0, tags={"sweep": "s", "role": "sweep"}, params={"seed": 0})
    params = {"lr": 0.1, "width": 8, "depth": 2}
    j.append("create_run", trial_key("a"), trial_id="a", config={}, name="trial-a", ts=0, tags={"role": "trial"},
             params=params)  # fmt: skip
    j._file.close()
    client = MlflowClient(uri)  # the trial's run was created, then the driver died before its params
    exp = client.create_experiment("cifar10")
    parent = client.create_run(exp, tags={"cnnclf.key": f"s/{SWEEP_KEY}"})
    client.log_param(parent.info.run_id, "seed", "0")
    client.create_run(exp, tags={"cnnclf.key": "s/trial:a", "mlflow.parentRunId": parent.info.run_id})

    again = Journal(folder, uri, "cifar10", "s", verbose=False)
    assert again.pending() == 2  # nothing was acknowledged as applied
    again.start()
    assert again.close(timeout=60) == 0
    runs = client.search_runs([exp])
    assert len(runs) == 2  # found again by their key, not created a second time
    [trial] = [r for r in runs if r.data.tags["cnnclf.key"] == "s/trial:a"]
    assert trial.data.params == {k: str(v) for k, v in params.items()}
    assert trial.data.tags["mlflow.parentRunId"] == parent.info.run_id
