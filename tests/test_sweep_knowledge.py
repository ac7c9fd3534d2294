"""Sweeps that build on earlier sweeps: --warm-start and extending a finished sweep; real Ray, Optuna and MLflow."""

from __future__ import annotations

import json

import optuna
import pytest

from cnnclf.config import TrainConfig
from sweeps.spec import Ranges
from sweeps.warmstart import SETTINGS_ATTR, load, settings_of
from tests.test_sweeps import runs, sweep


def _params(run) -> tuple:
    return tuple(run.data.params[k] for k in ("optimizer", "lr", "weight_decay", "batch_size", "kernel_size"))


def _study(tmp, name: str) -> optuna.Study:
    return optuna.load_study(study_name=name, storage=f"sqlite:///{tmp / 'out' / name / 'optuna.db'}")


@pytest.mark.slow
def test_warm_started_sweep_learns_from_the_first_and_runs_none_of_its_configs(budget_sweep):
    # The first sweep (tests/conftest.py) ran 3 search trials, one stopped as too_slow (pruned in Optuna).
    tmp, flags = budget_sweep.tmp, budget_sweep.flags
    before = [(t.params, t.value, t.state.name) for t in _study(tmp, "t").trials]
    r = sweep("cifar10", tmp, *flags, "--num-samples", "3", "--name", "second", "--warm-start", "t")
    assert r.returncode == 0, r.stderr[-3000:]
    assert "warm start: 3 of sweep t seed the sampler" in r.stdout

    # Its sampler saw the first sweep's trials: in its study, marked, with their values and states, before its own.
    study = _study(tmp, "second")
    prior = [t for t in study.trials if "warm_start" in t.user_attrs]
    own = [t for t in study.trials if "warm_start" not in t.user_attrs]
    assert [(t.params, t.value, t.state.name) for t in prior] == before
    assert sorted(s for *_, s in before) == ["COMPLETE", "COMPLETE", "PRUNED"]  # the too_slow one, pruned
    assert [t.user_attrs["warm_start"]["sweep"] for t in prior] == ["t"] * 3
    assert len(own) == 3 and min(t.number for t in own) > max(t.number for t in prior)

    # None of the first sweep's configurations ran again, and only --num-samples search trials ran.
    _c, _p, first_children = runs(tmp, "cifar10", "t")
    _c, parents, children = runs(tmp, "cifar10", "second")
    trials = [c for c in children if c.data.tags["role"] == "trial"]
    assert len(trials) == 3
    assert not {_params(c) for c in trials} & {_params(c) for c in first_children if c.data.tags["role"] == "trial"}

    # The parent names its source; the report and warm_start.json keep them apart from the ranking.
    parent = parents[0]
    assert parent.data.tags["warm_start.sources"] == "t" and parent.data.tags["warm_start.trials"] == "3"
    assert "Learned from t" in parent.data.tags["mlflow.note.content"]
    recorded = json.loads((tmp / "out" / "second" / "warm_start.json").read_text())
    assert [t["value"] for t in recorded["trials"]] == [v for _, v, _ in before]
    assert sorted(t["status"] for t in recorded["trials"]) == ["completed", "completed", "too_slow"]
    best = json.loads((tmp / "out" / "second" / "best_config.json").read_text())
    assert best["trial_id"] in {c.data.tags["trial_id"] for c in trials}
    assert "Prior knowledge (warm start)" in (tmp / "out" / "second" / "report.md").read_text()


@pytest.mark.slow
def test_extended_sweep_runs_exactly_the_new_total_in_one_parent(budget_sweep):
    tmp, flags = budget_sweep.tmp, [*budget_sweep.flags, "--name", "t", "--resume"]
    r = sweep("cifar10", tmp, *flags, "--num-samples", "2")
    assert r.returncode == 2 and len(r.stderr.strip().splitlines()) == 1 and "--num-samples" in r.stderr
    r = sweep("cifar10", tmp, *flags, "--num-samples", "5")
    assert r.returncode == 0, r.stderr[-3000:]
    assert "extending t: 2 more search trials" in r.stdout
    _c, parents, children = runs(tmp, "cifar10", "t")
    assert len(parents) == 1 and parents[0].info.status == "FINISHED"
    trials = [c for c in children if c.data.tags["role"] == "trial"]
    assert len(trials) == 5 and len({c.data.tags["trial_id"] for c in trials}) == 5
    assert all(c.info.status == "FINISHED" for c in children)  # none RUNNING
    assert all(c.data.tags["mlflow.parentRunId"] == parents[0].info.run_id for c in children)
    study = _study(tmp, "t")
    assert len(study.trials) == 5 and {t.state.name for t in study.trials} <= {"COMPLETE", "PRUNED"}
    summary = json.loads((tmp / "out" / "t" / "summary.json").read_text())
    assert sum(summary["outcomes"].values()) == 6  # 5 search trials and the baseline, each once
    assert parents[0].data.tags["search.phases"] == "3+2"


def test_trials_run_under_other_settings_are_left_out_with_the_reason(tmp_path):
    base = TrainConfig(task="cifar10", epochs=3)
    ranges = Ranges((32, 64), (2, 4), (8, 16))
    ours = settings_of(base, {"width": 8}, ranges, {"subset": None})
    theirs = settings_of(base.replace(image_size=64), {"width": 8}, ranges, {"subset": None})
    (tmp_path / "old").mkdir()
    study = optuna.create_study(study_name="old", storage=f"sqlite:///{tmp_path / 'old' / 'optuna.db'}")
    dist = {"lr": optuna.distributions.FloatDistribution(1e-4, 1e-2, log=True)}
    for i, attrs in enumerate([{SETTINGS_ATTR: ours}, {SETTINGS_ATTR: theirs}, {SETTINGS_ATTR: theirs}, {}]):
        lr = {"lr": 1e-3 * (i + 1)}
        study.add_trial(optuna.trial.create_trial(params=lr, distributions=dist, value=0.5, user_attrs=attrs))
    study.add_trial(optuna.trial.create_trial(state=optuna.trial.TrialState.FAIL, params={}, distributions={}))
    priors = load(["old"], tmp_path, ours)
    assert [r["params"] for r in priors.records] == [{"lr": 1e-3}]  # the one trial run under our settings
    why = {x["why"]: x["count"] for x in priors.left_out}
    assert why == {
        "fixed settings differ: image_size 64 vs 32": 2,
        "no record of the settings they ran under (a sweep from before --warm-start)": 2,
    }
    lines = priors.lines()
    assert lines[0].startswith("warm start: 1 of sweep old seed the sampler")
    assert "left out 2 trial(s) of sweep old: fixed settings differ: image_size 64 vs 32" in lines[1]
