"""Reports from a real MLflow SQLite store filled the way sweeps/callbacks.py fills it.

One store per module (creating an MLflow database takes seconds): experiment cifar10 holds an
old and a new sweep, catdog one sweep without eval samples, and `empty` none. The new cifar10
sweep has every kind of run: completed, early-stopped, diverged, errored (no metrics), a
baseline, three confirmation runs and a KILLED orphan with the highest val/acc of all (it must
not win).

A second store holds the same runs written with the names sweeps used before issue 12 (`OldStore`):
the report must read it the same (docs/tracking.md, "Older stores").
"""

from __future__ import annotations

import contextlib
import csv
import json
import re
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
from mlflow.entities import Metric, Param, RunTag
from mlflow.tracking import MlflowClient
from PIL import Image

from cnnclf.config import PRESETS, TrainConfig
from reports import ReportError, build_report
from reports.__main__ import main as cli_main

ROOT = Path(__file__).resolve().parents[1]
CIFAR = ("airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck")
T0 = 1_750_000_000_000  # ms since the epoch: the new cifar10 sweep's first trial starts here
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
# No importance.png: 4 search trials, fewer than fANOVA needs (reports.analysis.MIN_TRIALS; tests/test_figures.py)
FULL_PLOTS = {"best_so_far", "learning_curves", "parallel_coordinates", "per_class", "confusion", "samples"}


class Store:
    """Writes runs exactly as sweeps/callbacks.py's MLflowCallback and log_summary do (docs/tracking.md)."""

    def __init__(self, uri: str, artifacts: Path) -> None:
        self.c = MlflowClient(uri)
        self.artifacts = artifacts
        self.files = artifacts.parent / "files"

    def experiment(self, name: str) -> str:
        return self.c.create_experiment(name, artifact_location=(self.artifacts / name).as_uri())

    def sweep(self, exp: str, name: str, start_s: float, **params) -> Sweep:
        tags = {"sweep": name, "role": "sweep", "status": "running"}
        run = self.c.create_run(exp, start_time=T0 + int(start_s * 1000), run_name=name, tags=tags)
        p = {"num_samples": 4, "max_epochs": 3, "scheduler": "asha", "seed": 0, "subset": None, "name": name, **params}
        self.c.log_batch(run.info.run_id, params=[Param(f"sweep.{k}", str(v)) for k, v in sorted(p.items())])
        return Sweep(self, exp, name, run.info.run_id)


class Sweep:
    def __init__(self, store: Store, exp: str, name: str, parent: str) -> None:
        self.c, self.files = store.c, store.files / name
        self.exp, self.name, self.parent = exp, name, parent
        self.files.mkdir(parents=True)

    def trial(
        self,
        tid: str,
        cfg: TrainConfig,
        span: tuple[float, float],  # start and end, seconds after T0
        val: list[float],  # val/acc per epoch
        test: dict[str, float] | None = None,  # acc and per class, logged at the last epoch
        role: str = "trial",
        status: str = "completed",
        mlflow_status: str = "FINISHED",
        diverged_at: int | None = None,
        tags: dict | None = None,
        more: Callable[[int, int], dict] | None = None,  # (epoch, epochs) -> more metrics of that epoch
    ) -> str:
        start_s, end_s = span
        tags = {"mlflow.parentRunId": self.parent, "sweep": self.name, "trial_id": tid, "role": role, **(tags or {})}
        run = self.c.create_run(
            self.exp, start_time=T0 + int(start_s * 1000), run_name=f"{role}-{tid}", tags={**tags, "status": "running"}
        )
        rid = run.info.run_id
        params = {k: v for k, v in cfg.to_dict().items() if k != "tags"}
        self.c.log_batch(rid, params=[Param(k, str(v)) for k, v in sorted(params.items())])
        epochs = len(val) + (1 if diverged_at else 0)
        for epoch in range(1, epochs + 1):
            ts = T0 + int((start_s + (end_s - start_s) * epoch / epochs) * 1000)
            m = {"train/acc": 0.5, "time/epoch_s": 12.5, "throughput/train_img_s": 900.0, "train/lr": cfg.lr}
            m |= more(epoch, epochs) if more else {}
            if epoch == diverged_at:
                self.c.set_tag(rid, "diverged", "true")  # val/acc, val/loss, train/loss are stand-ins then: not logged
            else:
                m.update({"train/loss": 1.0 / epoch, "val/loss": 1.1 / epoch, "val/acc": val[epoch - 1]})
            if epoch == epochs and test is not None:
                m.update({"test/acc": test["acc"], "test/loss": 0.9})
                m.update({f"test/acc/{k}": v for k, v in test.items() if k != "acc"})
            self.c.log_batch(rid, metrics=[Metric(k, float(v), ts, epoch) for k, v in m.items()])
        self.c.set_tag(rid, "status", status)
        if status == "early_stopped":
            self.c.set_tag(rid, "stopped_by", "asha")
        self.c.set_terminated(rid, status=mlflow_status, end_time=T0 + int(end_s * 1000))
        return rid

    def finish(self, end_s: float, outcomes: dict, best: dict | None = None, **eval_files: Path) -> None:
        ts = T0 + int(end_s * 1000)
        metrics = [Metric(f"trials/{k}", float(v), ts, 0) for k, v in outcomes.items()]
        tags = []
        if best is not None:
            tags = [RunTag("best.trial_id", best["trial_id"]), RunTag("best.config", json.dumps(best["config"]))]
            metrics += [Metric(f"best/{k}", best[k], ts, 0) for k in ("val/acc", "test/acc")]
            self._best_artifacts(best)
        self.c.log_batch(self.parent, metrics=metrics, tags=tags)
        self._close(ts, eval_files)

    def _best_artifacts(self, best: dict) -> None:
        path = self.files / "best_config.json"
        path.write_text(json.dumps(best, indent=1))
        self.c.log_artifact(self.parent, str(path))
        model = self.files / "best_model.pt"
        model.write_bytes(b"not really a checkpoint")
        self.c.log_artifact(self.parent, str(model), artifact_path="best_model")

    def _close(self, ts: int, eval_files: dict[str, Path]) -> None:
        for path in eval_files.values():
            self.c.log_artifact(self.parent, str(path), artifact_path="eval")
        self.c.set_tag(self.parent, "status", "completed")
        self.c.set_terminated(self.parent, status="FINISHED", end_time=ts)


class OldStore(Store):
    """Writes runs as sweeps did before issue 12 (keep as is: stores written then must still be read).

    The parent's params were the sweep's flags unprefixed, plus the best trial's `best/<field>` and
    `best/trial_id`; every epoch logged `epoch`, `lr` and `diverged` (0.0 or 1.0) as metrics.
    """

    def sweep(self, exp: str, name: str, start_s: float, **params) -> Sweep:
        tags = {"sweep": name, "role": "sweep", "status": "running"}
        run = self.c.create_run(exp, start_time=T0 + int(start_s * 1000), run_name=name, tags=tags)
        p = {"num_samples": 4, "max_epochs": 3, "scheduler": "asha", "seed": 0, "subset": None, "name": name, **params}
        self.c.log_batch(run.info.run_id, params=[Param(k, str(v)) for k, v in sorted(p.items())])
        return OldSweep(self, exp, name, run.info.run_id)


class OldSweep(Sweep):
    def trial(
        self,
        tid: str,
        cfg: TrainConfig,
        span: tuple[float, float],
        val: list[float],
        test: dict[str, float] | None = None,
        role: str = "trial",
        status: str = "completed",
        mlflow_status: str = "FINISHED",
        diverged_at: int | None = None,
        tags: dict | None = None,
    ) -> str:
        start_s, end_s = span
        tags = {"mlflow.parentRunId": self.parent, "sweep": self.name, "trial_id": tid, "role": role, **(tags or {})}
        run = self.c.create_run(
            self.exp, start_time=T0 + int(start_s * 1000), run_name=f"{role}-{tid}", tags={**tags, "status": "running"}
        )
        rid = run.info.run_id
        params = {k: v for k, v in cfg.to_dict().items() if k != "tags"}
        self.c.log_batch(rid, params=[Param(k, str(v)) for k, v in sorted(params.items())])
        epochs = len(val) + (1 if diverged_at else 0)
        for epoch in range(1, epochs + 1):
            ts = T0 + int((start_s + (end_s - start_s) * epoch / epochs) * 1000)
            m = {"train/acc": 0.5, "epoch": epoch, "time/epoch_s": 12.5, "throughput/train_img_s": 900.0, "lr": cfg.lr}
            m["diverged"] = 0.0
            if epoch == diverged_at:
                m["diverged"] = 1.0  # val/acc, val/loss, train/loss are stand-ins then: not logged
            else:
                m.update({"train/loss": 1.0 / epoch, "val/loss": 1.1 / epoch, "val/acc": val[epoch - 1]})
            if epoch == epochs and test is not None:
                m.update({"test/acc": test["acc"], "test/loss": 0.9})
                m.update({f"test/acc/{k}": v for k, v in test.items() if k != "acc"})
            self.c.log_batch(rid, metrics=[Metric(k, float(v), ts, epoch) for k, v in m.items()])
        self.c.set_tag(rid, "status", status)
        if status == "early_stopped":
            self.c.set_tag(rid, "stopped_by", "asha")
        self.c.set_terminated(rid, status=mlflow_status, end_time=T0 + int(end_s * 1000))
        return rid

    def finish(self, end_s: float, outcomes: dict, best: dict | None = None, **eval_files: Path) -> None:
        ts = T0 + int(end_s * 1000)
        metrics = [Metric(f"trials/{k}", float(v), ts, 0) for k, v in outcomes.items()]
        params = []
        if best is not None:
            params = [Param(f"best/{k}", str(v)) for k, v in best["config"].items()]
            params.append(Param("best/trial_id", best["trial_id"]))
            metrics += [Metric(f"best/{k}", best[k], ts, 0) for k in ("val/acc", "test/acc")]
            self._best_artifacts(best)
        self.c.log_batch(self.parent, metrics=metrics, params=params)
        self._close(ts, eval_files)


def per_class(acc: float, classes=CIFAR) -> dict[str, float]:
    return {"acc": acc, **{c: round(acc + 0.01 * (i - len(classes) / 2), 4) for i, c in enumerate(classes)}}


def _best_config(sweep: str, tid: str, cfg: TrainConfig, val: float, test: float, base: tuple[float, float]) -> dict:
    return {
        "sweep": sweep,
        "trial_id": tid,
        "val/acc": val,
        "test/acc": test,
        "config": {k: v for k, v in cfg.to_dict().items() if k != "tags"},
        "command": f"python -m cnnclf train --task {cfg.task} --optimizer {cfg.optimizer} --lr {cfg.lr} --amsgrad",
        "baseline": {"val/acc": base[0], "test/acc": base[1]},
    }


@pytest.fixture(scope="module")
def store(tmp_path_factory) -> dict:
    return fill(Store, tmp_path_factory.mktemp("mlflow"))


@pytest.fixture(scope="module")
def old_store(tmp_path_factory) -> dict:
    """The same runs, written with the names sweeps used before issue 12."""
    return fill(OldStore, tmp_path_factory.mktemp("mlflow-old"))


def fill(writer: type[Store], root: Path) -> dict:
    uri = f"sqlite:///{root / 'mlflow.db'}"
    s = writer(uri, root / "artifacts")
    cifar = s.experiment("cifar10")
    catdog = s.experiment("catdog")
    s.experiment("empty")
    base = TrainConfig(task="cifar10", model="cnn", epochs=3, depth=4, width=32)
    seed_cfg = PRESETS["cifar10-seed"].replace(epochs=2)
    day = -86400

    # --- an older cifar10 sweep: a baseline and three completed trials; no artifacts
    old = s.sweep(cifar, "cifar10-old", day - 10)
    old.trial("b_00000", seed_cfg, (day, day + 200), [0.5, 0.58], per_class(0.59), role="baseline")
    for i, (opt, v) in enumerate((("sgd", 0.61), ("adam", 0.66), ("adamw", 0.63))):
        cfg = base.replace(optimizer=opt, lr=0.01 * (i + 1), amsgrad=opt != "sgd")
        old.trial(f"o_0000{i + 1}", cfg, (day + 10 * i, day + 600 + 100 * i), [0.4, 0.5, v], per_class(v - 0.01))
    old.finish(day + 900, {"completed": 4, "early_stopped": 0, "diverged": 0, "error": 0})

    # --- the new cifar10 sweep: every kind of run
    new = s.sweep(cifar, "cifar10-new", -1, num_samples=6)
    new.trial("b_00000", seed_cfg, (0, 120), [0.55, 0.60], per_class(0.605), role="baseline")
    t1 = base.replace(optimizer="sgd", lr=0.05, momentum=0.9, amsgrad=False)
    new.trial("t_00001", t1, (5, 300), [0.5, 0.62, 0.70], per_class(0.695))
    t2 = base.replace(optimizer="adamw", lr=0.003, amsgrad=True, weight_decay=5e-4, batch_size=256, depth=6)
    new.trial("t_00002", t2, (10, 400), [0.55, 0.68, 0.7412], per_class(0.7342))
    t3 = base.replace(optimizer="adam", lr=0.001, amsgrad=False, batch_size=64, kernel_size=5)
    new.trial("t_00003", t3, (15, 100), [0.605], status="early_stopped")
    t4 = base.replace(optimizer="sgd", lr=0.5, momentum=0.5)
    new.trial("t_00004", t4, (20, 150), [0.80], status="diverged", mlflow_status="FAILED", diverged_at=2)
    t5 = base.replace(optimizer="adam", lr=0.02, amsgrad=True, width=64)
    new.trial("t_00005", t5, (25, 30), [], status="error", mlflow_status="FAILED", tags={"error": "RuntimeError: boom"})
    t6 = base.replace(optimizer="adamw", lr=0.002, amsgrad=False, weight_decay=1e-3, depth=5)
    new.trial("t_00006", t6, (310, 600), [0.5, 0.6, 0.66], per_class(0.65))
    t7 = base.replace(optimizer="adam", lr=0.004, amsgrad=True)
    new.trial("t_00007", t7, (400, 620), [0.99], status="interrupted", mlflow_status="KILLED")
    for k, (seed, te, va) in enumerate(((1, 0.73, 0.74), (2, 0.75, 0.75), (3, 0.74, 0.76))):
        span = (610 + k, 880 + 10 * k)
        tags = {"confirm_of": "t_00002"} if k < 2 else {}  # without the tag: found by its params (all but seed)
        new.trial(f"c_0000{k}", t2.replace(seed=seed), span, [0.6, 0.7, va], per_class(te), role="confirm", tags=tags)
    rng = np.random.default_rng(0)
    conf = new.files / "confusion.json"
    matrix = rng.integers(0, 20, (10, 10)) + np.eye(10, dtype=int) * 80
    conf.write_text(json.dumps({"trial_id": "t_00002", "classes": list(CIFAR), "matrix": matrix.tolist()}))
    n = 32
    labels = rng.integers(0, 10, n)
    samples = new.files / "samples.npz"
    np.savez(
        samples,
        images=rng.integers(0, 256, (n, 3, 32, 32), dtype=np.uint8),
        labels=labels,
        preds=np.where(rng.random(n) < 0.75, labels, rng.integers(0, 10, n)),
        probs=rng.uniform(0.3, 1.0, n),
        classes=np.array(CIFAR),
    )
    best = _best_config("cifar10-new", "t_00002", t2, 0.7412, 0.7342, (0.60, 0.605))
    outcomes = {"completed": 4, "early_stopped": 1, "diverged": 1, "error": 1}
    new.finish(950, outcomes, best, confusion=conf, samples=samples)

    # --- catdog: two trials (too few for importance), a confusion matrix but no samples
    cd = s.sweep(catdog, "catdog-a", 0)
    cd_base = PRESETS["catdog-seed"].replace(epochs=2, image_size=64)
    cd.trial("b_00000", cd_base, (1, 300), [0.7, 0.80], {"acc": 0.81, "cat": 0.80, "dog": 0.82}, role="baseline")
    for i, (v, te) in enumerate(((0.85, 0.84), (0.90, 0.89))):
        cfg = cd_base.replace(optimizer="sgd", lr=0.01 * (i + 1), momentum=0.9, depth=5 + i)
        cd.trial(
            f"d_0000{i + 1}", cfg, (2 + i, 400 + 50 * i), [0.7, v], {"acc": te, "cat": te - 0.02, "dog": te + 0.02}
        )
    conf = cd.files / "confusion.json"
    conf.write_text(json.dumps({"trial_id": "d_00002", "classes": ["cat", "dog"], "matrix": [[89, 11], [9, 91]]}))
    cd.finish(500, {"completed": 3, "early_stopped": 0, "diverged": 0, "error": 0}, confusion=conf)

    # --- broken: a sweep that never got a run, and one still running whose trials all failed so far
    broken = s.experiment("broken")
    s.sweep(broken, "no-runs", 0)
    bad = s.sweep(broken, "all-failed", 100)
    bad.trial("x_00001", base, (101, 102), [], status="error", mlflow_status="FAILED")
    bad.trial("x_00002", base.replace(optimizer="sgd"), (103, 110), [0.2], status="diverged", mlflow_status="FAILED")
    return {"uri": uri, "root": root}


def run_cli(*args, cwd: Path) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "reports", *map(str, args)], capture_output=True, text=True, cwd=cwd, timeout=120
    )


@pytest.fixture(scope="module")
def default_run(store) -> dict:
    """`python -m reports` with no --experiment/--sweep: the newest sweep of cifar10 and of catdog."""
    out = store["root"] / "out"
    r = run_cli("--tracking-uri", store["uri"], "--out", out, cwd=store["root"])
    assert r.returncode == 0, r.stderr
    return {"out": out, "proc": r}


def read_csv(path: Path) -> dict[str, dict[str, str]]:
    with open(path, newline="") as f:
        return {row["trial_id"] + "/" + row["role"]: row for row in csv.DictReader(f)}


def check_png(path: Path) -> None:
    assert path.read_bytes()[:8] == PNG_SIGNATURE, path
    with Image.open(path) as im:
        im.verify()
    with Image.open(path) as im:
        assert im.format == "PNG" and im.size[0] > 100 and im.size[1] > 100


# ---------------------------------------------------------------------------------------------


def test_default_cli_reports_newest_sweep_of_each_experiment(default_run):
    out = default_run["out"]
    assert sorted(p.name for p in out.iterdir()) == ["catdog-a", "cifar10-new"]
    assert "cifar10: " in default_run["proc"].stdout and "catdog: " in default_run["proc"].stdout
    assert "'empty'" not in default_run["proc"].stderr  # not a default experiment
    for d in out.iterdir():
        for name in ("report.md", "report.html", "trials.csv"):
            assert (d / name).is_file()


def test_headline_numbers_and_baselines(default_run):
    md = (default_run["out"] / "cifar10-new" / "report.md").read_text()
    # the best by val/acc among completed trials: not the diverged trial's epoch-1 0.80, not the KILLED 0.99
    assert "trial `t_00002`, val/acc **74.12%**, test/acc **73.42%**" in md
    assert "99.00%" not in md and "`t_00007`" not in md
    # documented 61% and the re-measured 60.50% baseline: differences in points, time to beat by val/acc
    doc_row = next(line for line in md.splitlines() if line.startswith("| documented"))
    assert "| 61.00% |" in doc_row and "+13.00 pts" in doc_row  # the confirmed mean, 74.00%
    assert "5m 00s (trial `t_00001`, val/acc 70.00%)" in doc_row  # t_00003's 60.50% is below 61%
    base_row = next(line for line in md.splitlines() if line.startswith("| re-measured"))
    assert "60.50%" in base_row and "+13.50 pts" in base_row
    assert "1m 40s (trial `t_00003`, val/acc 60.50%)" in base_row  # early-stopped, but its val/acc beat 60%
    assert "Sweep wall time: **15m 00s**" in md
    assert "python -m cnnclf train --task cifar10 --optimizer adamw --lr 0.003 --amsgrad" in md  # best_config.json's


def test_confirmation_mean_std_and_n(default_run):
    md = (default_run["out"] / "cifar10-new" / "report.md").read_text()
    assert "Test accuracy **74.00% ± 1.00 (n=3 seeds; 95% CI 71.52–76.48%)**" in md
    row = next(line for line in md.splitlines() if line.startswith("| `t_00002`"))
    cells = [c.strip() for c in row.strip("|").split("|")]
    assert cells[:4] == ["`t_00002` (recommended)", "#1", "74.12%", "73.42% (1 run)"]  # no test/n: no interval
    assert cells[4:] == [
        "74.00% ± 1.00 (95% CI 71.52–76.48, n=3)", "75.00% ± 1.00 (95% CI 72.52–77.48, n=3)",
        "1, 2, 3", "0", ""]  # fmt: skip
    cd = (default_run["out"] / "catdog-a" / "report.md").read_text()
    assert "No confirmation runs" in cd


def test_outcome_counts(default_run):
    md = (default_run["out"] / "cifar10-new" / "report.md").read_text()

    def row(label: str) -> list[str]:
        line = next(x for x in md.splitlines() if x.startswith(f"| {label} |"))
        return [c.strip() for c in line.strip("|").split("|")][1:]

    assert "| outcome | trial runs | baseline runs | confirm runs | all |" in md
    assert row("completed") == ["3", "1", "3", "7"]
    assert row("early-stopped (ASHA)") == ["1", "0", "0", "1"]
    assert row("diverged") == ["1", "0", "0", "1"]
    assert row("failed (error)") == ["1", "0", "0", "1"]
    assert row("interrupted (KILLED)") == ["1", "0", "0", "1"]
    assert "`t_00005` failed: RuntimeError: boom" in md


def test_trials_csv_matches_runs(default_run):
    with open(default_run["out"] / "cifar10-new" / "trials.csv", newline="") as f:
        header = next(csv.reader(f))
    assert len(header) == len(set(header)) and header[:8] == [
        *("sweep", "rank", "trial_id", "role", "outcome", "val/acc", "test/acc", "epochs_run")
    ]
    rows = read_csv(default_run["out"] / "cifar10-new" / "trials.csv")
    assert "t_00007/trial" not in rows  # KILLED orphan left out
    assert len(rows) == 1 + 6 + 3
    best = rows["t_00002/trial"]
    assert best["rank"] == "1" and float(best["val/acc"]) == 0.7412 and float(best["test/acc"]) == 0.7342
    assert best["optimizer"] == "adamw" and best["amsgrad"] == "True" and best["momentum"] == ""  # n/a for adamw
    assert best["epochs_run"] == "3.0" and best["outcome"] == "completed" and float(best["test/acc/cat"]) > 0
    sgd = rows["t_00001/trial"]
    assert sgd["rank"] == "2" and sgd["momentum"] == "0.9" and sgd["amsgrad"] == ""
    assert rows["t_00003/trial"]["rank"] == "4" and rows["t_00003/trial"]["outcome"] == "early_stopped"
    assert rows["t_00004/trial"]["rank"] == "" and rows["t_00004/trial"]["outcome"] == "diverged"
    err = rows["t_00005/trial"]
    assert err["outcome"] == "error" and err["val/acc"] == "" and err["error"] == "RuntimeError: boom"
    assert rows["c_00001/confirm"]["confirm_of"] == "t_00002" and rows["c_00001/confirm"]["seed"] == "2"
    assert rows["c_00002/confirm"]["confirm_of"] == "t_00002"  # inferred from its params
    assert float(rows["b_00000/baseline"]["test/acc"]) == 0.605 and rows["b_00000/baseline"]["model"] == "tutorial"


def test_top_table_blanks_conditional_params(default_run):
    md = (default_run["out"] / "cifar10-new" / "report.md").read_text()
    header = next(x for x in md.splitlines() if x.startswith("| # | trial |"))
    cols = [c.strip() for c in header.strip("|").split("|")]
    for p in ("optimizer", "lr", "momentum", "amsgrad", "weight_decay", "batch_size", "depth", "kernel_size", "width"):
        assert p in cols
    line = next(x for x in md.splitlines() if x.startswith("| 1 | `t_00002` |"))
    cells = dict(zip(cols, [c.strip() for c in line.strip("|").split("|")], strict=True))
    assert cells["val/acc"] == "74.12%" and cells["test/acc"] == "73.42%" and cells["epochs"] == "3/3"
    assert cells["momentum"] == "" and cells["amsgrad"] == "True" and cells["lr"] == "0.003"
    assert "Same for every search trial: " in md and "`model=cnn`" in md


def test_every_plot_is_a_png(default_run):
    d = default_run["out"] / "cifar10-new"
    assert {p.stem for p in d.glob("*.png")} == FULL_PLOTS
    md = (d / "report.md").read_text()
    linked = re.findall(r"!\[[^\]]*\]\(([^)]+)\)", md)
    assert sorted(linked) == sorted(f"{p}.png" for p in FULL_PLOTS)
    for name in linked:
        check_png(d / name)
    html = (d / "report.html").read_text()
    assert html.count('src="data:image/png;base64,') == len(FULL_PLOTS) and 'src="http' not in html
    # catdog: two trials, no samples artifact -> those plots skipped with a note, nothing broken
    cd = default_run["out"] / "catdog-a"
    assert {p.stem for p in cd.glob("*.png")} == FULL_PLOTS - {"samples"}
    cdmd = (cd / "report.md").read_text()
    assert "Not drawn: 2 completed or early-stopped search trials; fANOVA needs about 10" in cdmd
    assert "Not drawn: 4 completed or early-stopped search trials; fANOVA needs about 10" in md
    assert "no `eval/samples.npz` artifact" in cdmd
    assert "documented: the seed's" in cdmd and "+1.00 pts" in cdmd  # 89% vs the documented 88%
    for p in cd.glob("*.png"):
        check_png(p)


def test_build_report_api_compares_sweeps(store, tmp_path):
    files = build_report(store["uri"], "cifar10", ["all"], tmp_path / "cmp")
    assert files[0] == tmp_path / "cmp" / "report.md" and all(f.is_file() for f in files)
    assert {f.name for f in files} >= {"report.md", "report.html", "trials.csv", "compare_best_so_far.png"}
    for f in files:
        if f.suffix == ".png":
            check_png(f)
    md = files[0].read_text()
    side = md.split("## Side by side", 1)[1].split("## Sweep", 1)[0]
    old = next(x for x in side.splitlines() if x.startswith("| `cifar10-old`"))
    new = next(x for x in side.splitlines() if x.startswith("| `cifar10-new`"))
    assert "66.00%" in old and "65.00%" in old and "3 (3 completed)" in old
    assert "74.12%" in new and "73.42%" in new and "6 (3 completed)" in new and "15m 00s" in new
    assert "74.00% ± 1.00 (n=3 seeds; 95% CI 71.52–76.48%)" in new
    assert md.index("## Sweep `cifar10-old`") < md.index("## Sweep `cifar10-new`")
    assert (tmp_path / "cmp" / "cifar10-new_samples.png").is_file()
    with open(tmp_path / "cmp" / "trials.csv", newline="") as f:
        sweeps = {row["sweep"] for row in csv.DictReader(f)}
    assert sweeps == {"cifar10-old", "cifar10-new"}
    with pytest.raises(ReportError, match="no sweep 'nope'"):
        build_report(store["uri"], "cifar10", ["nope"], tmp_path / "x")
    assert not (tmp_path / "x").exists()


@pytest.mark.parametrize("sweep", ["no-runs", "all-failed"])
def test_sweeps_without_results_still_report(store, tmp_path, sweep):
    files = build_report(store["uri"], "broken", [sweep], tmp_path)
    assert [f.name for f in files] == ["report.md", "report.html", "trials.csv"]  # nothing to plot
    md = files[0].read_text()
    assert "no configuration to recommend" in md and "Not drawn: no search trial reported a val/acc." in md
    if sweep == "all-failed":
        assert "| failed (error) | 1 | 1 |" in md and "| diverged | 1 | 1 |" in md
        assert len(read_csv(files[2])) == 2


def test_cli_output_folders(store, tmp_path, monkeypatch):
    """One sweep -> OUT/<sweep>/, several -> OUT/<experiment>-compare/; the newest sweep by default."""
    calls = []

    def fake(uri, experiment, sweeps, out_dir):
        calls.append((experiment, sweeps, out_dir))
        return [out_dir / "report.md"]

    monkeypatch.setattr("reports.report.build_report", fake)
    uri = store["uri"]
    assert cli_main(["--tracking-uri", uri, "--out", str(tmp_path)]) == 0
    assert calls == [
        ("cifar10", ["cifar10-new"], tmp_path / "cifar10-new"),
        ("catdog", ["catdog-a"], tmp_path / "catdog-a"),
    ]
    calls.clear()
    assert cli_main(["--tracking-uri", uri, "--experiment", "cifar10", "--sweep", "all", "--out", str(tmp_path)]) == 0
    assert calls == [("cifar10", ["cifar10-old", "cifar10-new"], tmp_path / "cifar10-compare")]
    calls.clear()
    assert cli_main(["--tracking-uri", uri, "--sweep", "catdog-a", "cifar10-old", "--out", str(tmp_path)]) == 0
    assert calls == [
        ("cifar10", ["cifar10-old"], tmp_path / "cifar10-old"),
        ("catdog", ["catdog-a"], tmp_path / "catdog-a"),
    ]


def test_cli_exit_codes(store, tmp_path, capsys):
    uri = store["uri"]
    # through a real process: unusable input exits 2 with one line on stderr and writes nothing
    cases = {
        "unknown experiment": ["--tracking-uri", uri, "--experiment", "mnist"],
        "unknown sweep": ["--tracking-uri", uri, "--sweep", "cifar10-nope"],
        "empty experiment": ["--tracking-uri", uri, "--experiment", "empty"],
    }
    procs = {
        k: subprocess.Popen(
            [sys.executable, "-m", "reports", *v, "--out", str(tmp_path / "out")],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            cwd=tmp_path,
        )
        for k, v in cases.items()
    }
    errs = {}
    for name, p in procs.items():
        _, err = p.communicate(timeout=120)
        assert p.returncode == 2, (name, err)
        errs[name] = err.strip().splitlines()
        assert len(errs[name]) == 1 and errs[name][0].startswith("reports: error: "), (name, err)
    assert "--experiment: no experiment 'mnist'" in errs["unknown experiment"][0]
    assert "--sweep: no sweep 'cifar10-nope'" in errs["unknown sweep"][0]
    assert "--experiment: experiment 'empty' has no sweeps" in errs["empty experiment"][0]
    # the same handler in-process (no import cost): stores that cannot be read, bad flags
    for args in (
        ["--tracking-uri", f"sqlite:///{tmp_path / 'missing.db'}"],
        ["--tracking-uri", "http://127.0.0.1:9"],
        ["--tracking-uri", uri, "--bogus"],
    ):
        assert cli_main([*args, "--out", str(tmp_path / "out")]) == 2, args
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and err[0].startswith("reports: error: "), err
    assert not (tmp_path / "missing.db").exists()  # reading never creates a store
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("which", ["cifar10-new", "catdog-a"])
def test_html_loads_in_headless_chromium(default_run, chromium, which):
    from tests.browser import Tab

    page = default_run["out"] / which / "report.html"
    n_images = page.read_text().count("<img ")
    assert n_images >= 5
    with chromium() as browser:
        tab = Tab(browser)
        tab.goto(page.as_uri())  # until the load event, which runs the page's image check
        with contextlib.suppress(TimeoutError):
            tab.wait_for("document.body.hasAttribute('data-images-loaded')", "the image count", timeout=5)
        console, dom = tab.console(), tab.page.content()
    assert console == []  # the page logs nothing; any console line (any level) or uncaught error is an error
    m = re.search(r'data-images-loaded="(\d+)/(\d+)"', dom)
    assert m, "the page's load handler did not run"
    assert int(m.group(1)) == int(m.group(2)) == n_images


def test_outcome_reads_the_sweeps_status_tags():
    from reports.data import outcome

    assert outcome("oom", "FAILED") == "oom"  # out of memory is its own outcome, not a generic error
    assert outcome("diverged", "FAILED") == "diverged"
    assert outcome("completed", "KILLED") == "interrupted"  # orphaned by an interruption: left out of rankings
    assert outcome(None, "FAILED") == "error"


# --- stores written before issue 12 -----------------------------------------------------------


def _comparable(md: str) -> str:
    """A report.md without the line that names the store and the time it was generated."""
    return "\n".join(line for line in md.splitlines() if not line.startswith("Generated "))


def _csv_rows(path: Path) -> list[dict[str, str]]:
    with open(path, newline="") as f:
        return [{k: v for k, v in row.items() if k != "run_id"} for row in csv.DictReader(f)]


@pytest.mark.parametrize(
    ("experiment", "sweeps"), [("cifar10", ["all"]), ("catdog", ["catdog-a"]), ("broken", ["all-failed"])]
)
def test_a_store_written_before_issue_12_reads_the_same(store, old_store, tmp_path, experiment, sweeps):
    """Old names: `lr`, `epoch`, `diverged` metrics; unprefixed sweep flags and `best/*` params on the parent."""
    new = build_report(store["uri"], experiment, sweeps, tmp_path / "new")
    old = build_report(old_store["uri"], experiment, sweeps, tmp_path / "old")
    assert [f.name for f in old] == [f.name for f in new]
    md_old, md_new = (_comparable(files[0].read_text()) for files in (old, new))
    assert md_old == md_new
    assert _csv_rows(old[2]) == _csv_rows(new[2])
    if experiment == "cifar10":  # what the report leads with, spelled out
        assert "trial `t_00002`, val/acc **74.12%**, test/acc **73.42%**" in md_old
        assert "Settings: num_samples=6, max_epochs=3, scheduler=asha, seed=0." in md_old
        assert "Settings: num_samples=4, max_epochs=3, scheduler=asha, seed=0." in md_old  # cifar10-old
        assert "| diverged | 1 | 0 | 0 | 1 |" in md_old and "| interrupted (KILLED) | 1 | 0 | 0 | 1 |" in md_old


def test_old_and_new_names_load_as_one_frame(store, old_store):
    from reports.data import load_sweep

    new, old = (load_sweep(s["uri"], "cifar10", "cifar10-new") for s in (store, old_store))
    assert old.parent["params"] == new.parent["params"]  # the sweep's flags, by their own names
    assert new.parent["params"] == {
        "num_samples": "6", "max_epochs": "3", "scheduler": "asha", "seed": "0", "subset": "None", "name": "cifar10-new"
    }  # fmt: skip
    columns = sorted(new.runs.columns)
    assert sorted(old.runs.columns) == columns and "train/lr" in columns  # `lr` is the hyperparameter's column
    assert not {"epoch", "diverged"} & set(columns)
    by = ["trial_id", "role"]
    a = old.runs.drop(columns="run_id").sort_values(by).reset_index(drop=True)
    b = new.runs.drop(columns="run_id").sort_values(by).reset_index(drop=True)
    assert a.equals(b), a.compare(b)
    t4 = b.set_index("trial_id").loc["t_00004"]  # diverged in its second epoch: two epochs run, the lr logged
    assert t4["epochs_run"] == 2 and t4["train/lr"] == 0.5 and t4["lr"] == 0.5  # the metric and the param
    assert np.isnan(b.set_index("trial_id").loc["t_00005", "epochs_run"])  # errored before any epoch


def test_an_old_journal_replayed_by_sync_writes_old_names_that_reports_read(tmp_path):
    """`--sync` of a journal an older sweep spooled: its ops carry the old names; they are written as they are."""
    from sweeps.journal import SWEEP_KEY, Journal, trial_key

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    folder = tmp_path / "out" / "old" / "journal"
    j = Journal(folder, uri, "cifar10", "old", verbose=False)
    j.append("meta", data={"tracking_uri": uri, "experiment": "cifar10", "task": "cifar10"})
    flags = {"num_samples": 1, "max_epochs": 2, "scheduler": "fifo", "seed": 0, "subset": None, "name": "old"}
    tags = {"sweep": "old", "role": "sweep", "status": "running"}
    j.append("create_run", SWEEP_KEY, name="old", ts=T0, tags=tags, params={k: str(v) for k, v in flags.items()})
    cfg = TrainConfig(task="cifar10", model="cnn", epochs=2, depth=2, width=8, optimizer="adam", lr=0.003)
    params = {k: str(v) for k, v in cfg.to_dict().items() if k != "tags"}
    key, tags = trial_key("t1"), {"sweep": "old", "trial_id": "t1", "role": "trial", "status": "running"}
    j.append("create_run", key, name="trial-t1", ts=T0 + 1000, trial_id="t1", config={}, tags=tags, params=params)
    for epoch, acc in ((1, 0.5), (2, 0.6)):
        m = {"train/loss": 1.0 / epoch, "val/acc": acc, "epoch": epoch, "lr": 0.003, "diverged": 0.0}
        m |= {"test/acc": 0.58, "test/acc/cat": 0.5} if epoch == 2 else {}
        j.append("log", key, metrics=[[k, float(v), T0 + 1000 * (1 + epoch), epoch] for k, v in m.items()])
    j.append("log", key, tags=[["status", "completed"]])
    j.append("status", key, status="FINISHED", ts=T0 + 4000)
    best = [[f"best/{k}", v] for k, v in params.items()] + [["best/trial_id", "t1"]]
    summary = [["trials/completed", 1.0, T0 + 5000, 0], ["best/val/acc", 0.6, T0 + 5000, 0]]
    j.append("log", SWEEP_KEY, metrics=summary, params=best)
    j.append("log", SWEEP_KEY, tags=[["status", "completed"]])
    j.append("status", SWEEP_KEY, status="FINISHED", ts=T0 + 5000)
    j._file.close()  # as a sweep that never reached MLflow left it

    again = Journal(folder, uri, "cifar10", "old", verbose=False)
    again.start()
    assert again.close(timeout=60) == 0
    trial = MlflowClient(uri).search_runs([MlflowClient(uri).get_experiment_by_name("cifar10").experiment_id])
    assert {"epoch", "lr", "diverged"} <= set(next(r for r in trial if r.data.tags["role"] == "trial").data.metrics)
    files = build_report(uri, "cifar10", ["old"], tmp_path / "report")
    md = files[0].read_text()
    assert "trial `t1`, val/acc **60.00%**, test/acc **58.00%**" in md
    assert "Settings: num_samples=1, max_epochs=2, scheduler=fifo, seed=0." in md
    [row] = read_csv(files[2]).values()
    assert row["epochs_run"] == "2.0" and float(row["train/lr"]) == 0.003 and row["lr"] == "0.003"
    assert not {"epoch", "diverged"} & set(row)
