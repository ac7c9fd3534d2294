"""What a user meets in MLflow after a sweep: descriptions, provenance, datasets, per-trial system
figures, the experiment opening on its runs table, the URLs printed at the end, and a store that
moved (docs/tracking.md)."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from mlflow.tracking import MlflowClient

from tests.test_sweeps import ROOT

NOTE = "mlflow.note.content"
pytestmark = pytest.mark.slow  # every test reads the shared real smoke sweep (Ray, Optuna, MLflow)


@pytest.fixture(scope="module")
def swept(smoke_sweep) -> tuple[Path, subprocess.CompletedProcess]:
    return smoke_sweep.tmp, smoke_sweep.result


def _runs(tmp: Path):
    c = MlflowClient(f"sqlite:///{tmp / 'mlflow.db'}")
    exp = c.get_experiment_by_name("cifar10")
    return c, exp, c.search_runs([exp.experiment_id], max_results=100)


def test_the_default_store_is_absolute_and_the_urls_are_printed(swept):
    tmp, r = swept
    assert f"MLflow: sqlite:///{(tmp / 'mlflow.db').resolve()}" in r.stdout
    _, exp, runs = _runs(tmp)
    parent = next(x for x in runs if x.data.tags.get("role") == "sweep")
    base = f"http://127.0.0.1:5000/#/experiments/{exp.experiment_id}"
    assert f"MLflow: this sweep {base}/runs/{parent.info.run_id}?workflowType=machine_learning" in r.stdout
    assert f"{base}/runs?workflowType=machine_learning" in r.stdout
    assert "mlflow ui --backend-store-uri sqlite:////" in r.stdout and "--workers 1" in r.stdout


def test_experiment_parent_and_trials_are_described(swept):
    tmp, _ = swept
    _, exp, runs = _runs(tmp)
    assert exp.tags["mlflow.experimentKind"] == "custom_model_development"  # opens on the runs table
    assert "CIFAR-10" in exp.tags[NOTE] and "61%" in exp.tags[NOTE]
    parent = next(x for x in runs if x.data.tags.get("role") == "sweep")
    headline = parent.data.tags[NOTE]
    best = json.loads((tmp / "out" / "smoke" / "best_config.json").read_text())
    assert f"Recommended: trial {best['trial_id']}" in headline and "pts vs the documented 61%" in headline
    assert "Versus the baseline re-measured here" in headline and "over 1 fresh seed " in headline
    assert "Test accuracy " in headline and "95% CI" in headline and "The model logged here is " in headline
    for run in runs:
        tags = run.data.tags
        if tags["role"] == "sweep":
            continue
        note = tags[NOTE]
        assert note.startswith(f"{tags['role']} of sweep smoke: ") and f"batch {run.data.params['batch_size']}" in note
        assert "completed after 1 epoch: val/acc " in note  # its outcome, once it ended


def test_runs_carry_provenance_and_the_command(swept):
    tmp, _ = swept
    _, _, runs = _runs(tmp)
    head = subprocess.run(["git", "-C", str(ROOT), "rev-parse", "HEAD"], capture_output=True, text=True).stdout.strip()
    for run in runs:
        tags = run.data.tags
        assert tags["mlflow.source.name"].endswith("sweeps/cifar10.py") and tags["mlflow.user"]
        assert tags["mlflow.source.git.commit"] == head
    parent = next(x for x in runs if x.data.tags.get("role") == "sweep")
    assert "sweeps/cifar10.py --smoke-test" in parent.data.tags["command"]


def test_every_run_has_the_three_splits_as_datasets(swept):
    tmp, _ = swept
    _, _, runs = _runs(tmp)
    manifest = json.loads(Path(json.loads(_datasets(runs[0])[0][3])["manifest"]).read_text())
    for run in runs:
        got = _datasets(run)
        assert sorted(ctx for *_, ctx in got) == ["test", "train", "val"]
        for name, digest, profile, _source, ctx in got:
            assert name == "cifar10" and digest == manifest["splits"][ctx]["sha256"]
            assert json.loads(profile)["num_images"] == manifest["splits"][ctx]["n"]


def _datasets(run) -> list[tuple]:
    return [
        (d.dataset.name, d.dataset.digest, d.dataset.profile, d.dataset.source, d.tags[0].value)
        for d in run.inputs.dataset_inputs
    ]


def test_trials_log_their_own_peak_memory(swept):
    tmp, _ = swept
    c, _, runs = _runs(tmp)
    for run in runs:
        if run.data.tags["role"] != "sweep":
            peak = c.get_metric_history(run.info.run_id, "system/peak_mem_mb")
            assert [m.step for m in peak] == [1] and 10 < peak[0].value < 64_000  # MiB of a real process


def test_a_moved_store_warns_that_its_artifact_folders_are_missing(swept, tmp_path):
    tmp, _ = swept
    moved = tmp_path / "moved.db"
    shutil.copy(tmp / "mlflow.db", moved)
    _, _, runs = _runs(tmp)
    parent = next(x for x in runs if x.data.tags.get("role") == "sweep")
    artifacts = Path(re.sub(r"^file://", "", parent.info.artifact_uri))
    aside = artifacts.with_name(artifacts.name + "-aside")
    artifacts.rename(aside)
    try:
        r = subprocess.run(
            [sys.executable, "-m", "reports", "--tracking-uri", f"sqlite:///{moved}", "--out", tmp_path / "out"],
            capture_output=True,
            text=True,
            timeout=300,
        )
    finally:
        aside.rename(artifacts)
    assert r.returncode == 0, r.stderr[-2000:]
    assert f"the artifact folder of experiment cifar10: {artifacts} is missing" in r.stderr
