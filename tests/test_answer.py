"""The sweep's answer (docs/sweeps.md, "The answer"): the recommended configuration follows the
confirmation runs, says how sure it is, flags a model that predicts one class, and every place that
names it (console, summary.json, best_config.json, the MLflow parent, the report) names the same one.

The end of a sweep is driven here without starting Ray: the sweep's own MLflow writer
(`sweeps.callbacks.MLflowCallback`) is fed real `ray.tune` Trial objects (stubs: no trainable) and
their results, through a real journal into a real SQLite MLflow store; `sweeps.finish.finish` then
ranks, confirms, saves, logs and writes the report, as the driver calls it after its Tuners.
"""

from __future__ import annotations

import json
import math

import pytest
from mlflow.tracking import MlflowClient
from ray.tune import Result
from ray.tune.experiment import Trial

import reports
from cnnclf.config import PRESETS, TrainConfig
from cnnclf.data import load_task
from sweeps import stats, store
from sweeps.callbacks import MLflowCallback
from sweeps.context import open_context
from sweeps.finish import Ending, collect, finish
from sweeps.journal import Journal
from sweeps.spec import Run, answer, chance_flag
from tests.conftest import write_cifar_folders

NOTE = "mlflow.note.content"
BASE = TrainConfig(task="cifar10", epochs=1, width=8, depth=2, batch_size=32)
BASELINE = PRESETS["cifar10-seed"].replace(epochs=1)


def metrics(val: float, test: float, n: int = 1000, top_share: float = 0.2, majority: float = 0.1) -> dict:
    """A finished trial's last result, as cnnclf.train reports it (1 epoch)."""
    return {
        "epoch": 1,
        "train/loss": 1.0,
        "val/loss": 1.1,
        "val/acc": val,
        "test/acc": test,
        "test/n": float(n),
        "test/majority_acc": majority,
        "test/top_pred_share": top_share,
        "diverged": 0.0,
    }


class FakeSweep:
    """The end of a sweep: runs written by the sweep's MLflow callback, then `finish`."""

    def __init__(self, tmp_path, name: str = "s") -> None:
        self.tmp = tmp_path
        self.uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
        store.prepare(self.uri)
        self.out = tmp_path / "out" / name
        self.journal = Journal(self.out / "journal", self.uri, "cifar10", name, verbose=False)
        self.journal.append("meta", data={"tracking_uri": self.uri, "experiment": "cifar10", "task": "cifar10"})
        open_context(self.journal)  # as the driver does: the callback finds the journal through it
        self.cb = MLflowCallback(self.journal, BASE, BASELINE, {"num_samples": 2}, name)
        self.cb.setup()
        self.results: list[Result] = []

    def run(self, tid: str, config: dict, last: dict) -> None:
        trial = Trial("run_trial", config=config, trial_id=tid, stub=True)
        self.cb.on_trial_start(0, [], trial)
        trial.update_last_result(dict(last))
        self.cb.on_trial_result(0, [], trial, dict(last))
        self.cb.on_trial_complete(0, [], trial)
        self.results.append(
            Result(metrics={**last, "trial_id": tid, "config": config}, checkpoint=None, error=None, path=f"x/t-{tid}")
        )

    def finish(self) -> dict:
        data = load_task("cifar10", write_cifar_folders(self.tmp / "cifar", 8, 2), download_missing=False)
        rows = collect(self.results, BASE, BASELINE)
        statuses = {r.metrics["trial_id"]: "TERMINATED" for r in self.results}
        summary = finish(rows, statuses, self.journal, data, Ending(self.out, wait=60.0, report=reports.write))
        self.journal.close(timeout=30)
        return summary

    def parent(self):
        c = MlflowClient(self.uri)
        exp = c.get_experiment_by_name("cifar10")
        return next(r for r in c.search_runs([exp.experiment_id]) if r.data.tags.get("role") == "sweep")


def confirm(of: str, seed: int) -> dict:
    return {"role": "confirm", "confirm_of": of, "seed": seed, "split_seed": 0, "lr": 0.01, "optimizer": "sgd"}


@pytest.fixture(autouse=True)
def _in_tmp(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # MLflow's default artifact root is ./mlruns of the working directory


@pytest.fixture
def reversed_sweep(tmp_path, capsys):
    """t1 is the search's best (val 60%), but over fresh seeds t2 does better (58% vs 51% mean val/acc)."""
    s = FakeSweep(tmp_path)
    s.run("t1", {"role": "trial", "lr": 0.01, "optimizer": "sgd"}, metrics(0.60, 0.59))
    s.run("t2", {"role": "trial", "lr": 0.003, "optimizer": "adam"}, metrics(0.58, 0.57))
    s.run("b0", {"role": "baseline"}, metrics(0.40, 0.41))
    for i, (val, test) in enumerate([(0.50, 0.49), (0.52, 0.51)]):
        s.run(f"c1{i}", confirm("t1", 1000 * (i + 1)), metrics(val, test))
    for i, (val, test) in enumerate([(0.57, 0.56), (0.59, 0.58)]):
        s.run(f"c2{i}", {**confirm("t2", 1000 * (i + 1)), "lr": 0.003, "optimizer": "adam"}, metrics(val, test))
    summary = s.finish()
    return s, summary, capsys.readouterr().out


def test_confirmation_that_reverses_the_search_recommends_the_confirmed_winner_everywhere(reversed_sweep):
    s, summary, console = reversed_sweep
    best = json.loads((s.out / "best_config.json").read_text())
    assert best["trial_id"] == "t2" and best["selected_by"] == "confirmation" and best["search_trial"]["rank"] == 2
    assert best["config"]["optimizer"] == "adam" and best["test/acc"] == pytest.approx(0.57)
    assert json.loads((s.out / "summary.json").read_text())["best"]["trial_id"] == "t2"
    assert list(summary["confirmation"]) == ["t2", "t1"]  # best mean val/acc first
    parent = s.parent()
    assert parent.data.tags["best.trial_id"] == "t2" and parent.data.tags["best.selected_by"] == "confirmation"
    assert "Recommended: trial t2" in parent.data.tags[NOTE]
    assert parent.data.metrics["best/test/acc"] == pytest.approx(0.57)
    assert "recommended: t2, confirmed" in console and "confirmation reordered the search" in console
    md = (s.out / "report.md").read_text()
    assert "**Recommended configuration**: trial `t2`" in md
    assert "Confirmation reordered the search" in md and "`t1`" in md
    assert "report.html (open in a browser)" in console


def test_every_accuracy_in_the_answer_carries_an_interval_and_a_judged_difference(reversed_sweep):
    s, _, console = reversed_sweep
    best = json.loads((s.out / "best_config.json").read_text())
    lo, hi = best["test"]["ci95"]
    assert lo < 0.57 < hi and best["test"]["n"] == 2
    diff = best["runner_up"]["difference"]
    assert best["runner_up"]["trial_id"] == "t1" and diff["diff"] == pytest.approx(0.07)
    assert 0 < diff["p"] < 1 and ("larger than the noise" in diff["text"] or "within the noise" in diff["text"])
    assert best["baseline"]["test"]["ci95"][0] < 0.41 < best["baseline"]["test"]["ci95"][1]  # Wilson, 1000 images
    assert "95% CI" in console and "Welch p" in console
    md = (s.out / "report.md").read_text()
    headline = md.split("## Headline")[1].split("## Confirmation")[0]
    assert "57.00% ± 1.41 (n=2 seeds; 95% CI" in headline
    assert "| 41.00% (95% CI 37.99–44.08, 1 run) |" in headline  # the baseline's Wilson interval, 1,000 images
    conf = md.split("## Confirmation with fresh seeds")[1].split("##")[0]
    rows = [x for x in conf.splitlines() if x.startswith("| `t")]
    assert rows[0].startswith("| `t2` (recommended) | #2 |") and rows[1].startswith("| `t1` | #1 |")
    assert "| 57.00% ± 1.41 (95% CI 44.29–69.71, n=2) |" in rows[0]


def test_the_documented_baseline_names_the_budget_that_differs(reversed_sweep):
    s, _, console = reversed_sweep
    best = json.loads((s.out / "best_config.json").read_text())
    # 1 epoch on 8 training images per class (minus val) at 32 px, against 2 epochs on 50,000
    assert best["documented"]["budget_differs"][0] == "1 epoch vs 2"
    assert "training images vs 50,000" in best["documented"]["budget_differs"][1]
    assert "another budget: 1 epoch vs 2" in console
    md = (s.out / "report.md").read_text()
    row = next(x for x in md.splitlines() if x.startswith("| documented"))
    assert "**another budget**: 1 epoch vs 2" in row


def test_a_constant_predictor_is_flagged_in_the_headline_and_its_run(tmp_path, capsys):
    s = FakeSweep(tmp_path)
    # Cat/Dog-like: every test image called one class; 50% is all it can score.
    s.run("t1", {"role": "trial", "lr": 0.01, "optimizer": "sgd"}, metrics(0.5, 0.5, 130, 1.0, 0.5))
    s.run("t2", {"role": "trial", "lr": 0.003, "optimizer": "adam"}, metrics(0.45, 0.48, 130, 0.9, 0.5))
    s.finish()
    console = capsys.readouterr().out
    md = (s.out / "report.md").read_text()
    assert "**Warning: constant predictor: it gives every test image the same class.**" in md
    assert "**one unconfirmed run**" in md  # no confirmation runs
    assert "warning: constant predictor" in console
    c = MlflowClient(s.uri)
    runs = {
        r.data.tags["trial_id"]: r for r in c.search_runs([s.parent().info.experiment_id]) if "trial_id" in r.data.tags
    }
    assert "Warning: constant predictor" in runs["t1"].data.tags[NOTE]
    assert "at chance" in runs["t2"].data.tags[NOTE]  # 48% of 130: its interval reaches the 50% majority
    assert "Warning: constant predictor" in s.parent().data.tags[NOTE]


def test_params_that_do_not_apply_to_the_optimizer_are_not_logged(reversed_sweep):
    s, _, _ = reversed_sweep
    c = MlflowClient(s.uri)
    runs = {
        r.data.tags["trial_id"]: r for r in c.search_runs([s.parent().info.experiment_id]) if "trial_id" in r.data.tags
    }
    assert "momentum" not in runs["t2"].data.params and "nesterov" not in runs["t2"].data.params  # adam
    assert runs["t2"].data.params["amsgrad"] == "False"
    assert "amsgrad" not in runs["t1"].data.params and runs["t1"].data.params["momentum"] == "0.9"  # sgd


def test_answer_without_confirmation_is_the_best_search_trial_unconfirmed():
    runs = [
        Run("a", "trial", "completed", 0.6, 0.59, 1000),
        Run("b", "trial", "completed", 0.7, 0.68, 1000),
        Run("c", "trial", "early_stopped", 0.9, None),  # never ahead of a completed trial
    ]
    a = answer(runs)
    assert a.trial.trial_id == "b" and a.confirmed is None and not a.reordered and a.search_rank == 1
    assert a.test.kind == "binomial" and a.test.lo < 0.68 < a.test.hi


def test_answer_ties_go_to_the_better_search_rank_and_failed_confirmations_fall_back():
    runs = [
        Run("a", "trial", "completed", 0.7, 0.7, 100),
        Run("b", "trial", "completed", 0.6, 0.6, 100),
        *(Run(f"ca{i}", "confirm", "completed", 0.5, 0.5, 100, confirm_of="a") for i in range(2)),
        *(Run(f"cb{i}", "confirm", "completed", 0.5, 0.5, 100, confirm_of="b") for i in range(2)),
    ]
    assert answer(runs).trial.trial_id == "a"
    failed = [*runs[:2], Run("ca0", "confirm", "error", None, None, confirm_of="a")]
    a = answer(failed)
    assert a.trial.trial_id == "a" and a.confirmed is None  # no confirmation completed: unconfirmed


def test_the_logged_model_is_the_best_run_of_the_recommended_configuration():
    runs = [
        Run("a", "trial", "completed", 0.60, 0.6, 100),
        Run("c1", "confirm", "completed", 0.62, 0.6, 100, confirm_of="a"),
        Run("c2", "confirm", "completed", 0.58, 0.6, 100, confirm_of="a"),
    ]
    assert answer(runs).model.trial_id == "c1"


def test_intervals_and_differences():
    lo, hi = stats.wilson(0.5, 100)
    assert lo == pytest.approx(0.4038, abs=1e-3) and hi == pytest.approx(0.5962, abs=1e-3)
    assert stats.wilson(1.0, 10)[1] == pytest.approx(1.0) and stats.wilson(1.0, 10)[0] < 1.0  # never zero width
    e = stats.over_seeds([0.70, 0.72, 0.74])
    assert e.mean == pytest.approx(0.72) and e.std == pytest.approx(0.02)
    assert e.hi - e.mean == pytest.approx(4.303 * 0.02 / math.sqrt(3), rel=1e-3)  # t(0.975, 2)
    assert math.isnan(stats.over_seeds([0.7]).lo)  # one seed: no interval
    far = stats.difference(stats.over_seeds([0.80, 0.81, 0.82]), stats.over_seeds([0.60, 0.61, 0.62]))
    near = stats.difference(stats.over_seeds([0.70, 0.75, 0.65]), stats.over_seeds([0.69, 0.74, 0.64]))
    assert far.beyond_noise and far.p < 1e-3 and not near.beyond_noise and near.p > 0.5
    assert not stats.difference(stats.over_seeds([0.7]), stats.one_run(0.6, None)).known


def test_chance_is_judged_by_the_interval_against_the_majority_class():
    assert chance_flag(stats.one_run(0.52, 130), [Run("x", "trial", "completed", 0.5, 0.52, 130, 0.5, 0.7)])
    assert chance_flag(stats.one_run(0.80, 130), [Run("x", "trial", "completed", 0.8, 0.80, 130, 0.5, 0.6)]) is None
    constant = chance_flag(stats.one_run(0.5, 130), [Run("x", "trial", "completed", 0.5, 0.5, 130, 0.5, 1.0)])
    assert constant and constant.startswith("constant predictor")


def test_smoke_test_sets_defaults_and_keeps_the_flags_given():
    from sweeps.cifar10 import SPEC
    from sweeps.cli import settings
    from sweeps.flags import build_parser

    def resolved(*argv: str):
        return settings(SPEC, build_parser(SPEC).parse_args(["--smoke-test", *argv]))[0]

    s = resolved()
    assert (s.num_samples, s.max_epochs, s.base.subset, s.base.eval_subset, s.confirm, s.confirm_top) == (
        2, 1, 256, 128, 1, 1)  # fmt: skip
    s = resolved("--num-samples", "3", "--max-epochs", "2", "--subset", "500", "--confirm", "2")
    assert (s.num_samples, s.max_epochs, s.base.epochs, s.base.subset, s.confirm) == (3, 2, 2, 500, 2)
    assert s.baseline.subset == 500 and s.baseline.eval_subset == 128  # the baseline sees the same data


@pytest.mark.parametrize(
    ("samples", "seeds", "top"), [(4, 3, 1), (6, 3, 1), (8, 3, 1), (9, 3, 1), (20, 3, 2), (40, 3, 3)]
)
def test_confirmation_defaults_cost_about_a_third_of_the_search(samples, seeds, top):
    from sweeps.cifar10 import SPEC
    from sweeps.cli import settings
    from sweeps.flags import build_parser

    s = settings(SPEC, build_parser(SPEC).parse_args(["--num-samples", str(samples)]))[0]
    assert (s.confirm, s.confirm_top) == (seeds, top)
    assert s.confirm * s.confirm_top <= max(3, samples / 3)


@pytest.mark.slow
def test_the_smoke_sweep_ran_the_trials_asked_for(smoke_sweep):
    c = MlflowClient(smoke_sweep.uri)
    exp = c.get_experiment_by_name("cifar10")
    roles = [r.data.tags.get("role") for r in c.search_runs([exp.experiment_id])]
    assert roles.count("trial") == 3 and roles.count("baseline") == 1  # --num-samples 3 beside --smoke-test


@pytest.mark.slow
def test_the_reproduce_command_gives_the_recorded_accuracy(smoke_sweep):
    import os
    import shlex
    import subprocess
    import sys

    best = json.loads((smoke_sweep.tmp / "out" / "smoke" / "best_config.json").read_text())
    command = best["command"]
    assert "--subset 120" in command and "--eval-subset 128" in command and "--image-size 32" in command
    assert best["config"]["subset"] == 120 and best["data"]["images"]["train"] == 120
    argv = shlex.split(command)
    assert argv[:4] == ["python", "-m", "cnnclf", "train"]
    assert best["command_threads"] == 1  # the trial's CPU threads (--cpus-per-trial 1): sums depend on them
    r = subprocess.run(
        [sys.executable, *argv[1:], "--data-dir", str(smoke_sweep.data), "--no-download", "--json"],
        capture_output=True,
        text=True,
        timeout=300,
        env={**os.environ, "OMP_NUM_THREADS": "1"},
    )
    assert r.returncode == 0, r.stderr[-2000:]
    out = json.loads(r.stdout.strip().splitlines()[-1])
    assert out["data"]["digest"] == best["data"]["digest"]  # the same images
    assert out["test/acc"] == pytest.approx(best["command_gives"]["test/acc"], abs=0.005)
    assert out["val/acc"] == pytest.approx(best["command_gives"]["val/acc"], abs=0.005)


def test_the_resume_command_repeats_the_flags_main_was_given_not_sys_argv(monkeypatch):
    from sweeps.cifar10 import SPEC
    from sweeps.cli import settings
    from sweeps.flags import build_parser

    monkeypatch.setattr("sys.argv", ["pytest", "-x", "--not-a-sweep-flag"])
    argv = ["--num-samples", "3", "--max-epochs", "2", "--name", "given"]
    s = settings(SPEC, build_parser(SPEC).parse_args(argv), argv)[0]
    assert s.resume_command.endswith("--num-samples 3 --max-epochs 2 --name given --resume")
    assert "sweeps/cifar10.py" in s.resume_command and "--not-a-sweep-flag" not in s.resume_command
    assert s.argv == tuple(argv) and s.script.endswith("cifar10.py")


def test_a_report_that_cannot_be_written_is_one_warning_line_and_none_is_not_a_silent_import(capsys, tmp_path):
    from types import SimpleNamespace

    from sweeps.finish import write_report

    journal = SimpleNamespace(tracking_uri="sqlite:///x.db", experiment="cifar10", sweep="s")

    def broken(*args):
        raise ValueError("no runs of sweep s")

    assert write_report(journal, tmp_path, broken) == []
    err = capsys.readouterr().err.strip().splitlines()
    assert err == ["warning: the report could not be written: ValueError: no runs of sweep s"]
    assert write_report(journal, tmp_path, None) == []  # no writer given (a library caller): nothing to write


def test_a_trial_whose_worker_died_is_a_recorded_failure_oom_when_killed_for_memory(tmp_path):
    import json
    from types import SimpleNamespace

    from sweeps.cifar10 import SPEC
    from sweeps.finish import collect
    from sweeps.spec import error_outcome

    ray_oom = "ray.exceptions.OutOfMemoryError: Task was killed due to the node running low on memory."
    assert error_outcome(ray_oom) == "oom" and error_outcome(RuntimeError("boom")) == "error"
    # Ray's memory monitor killed the worker while the trial's actor started: Tune's Result has no config.
    folder = tmp_path / "trial-abc12345"
    folder.mkdir()
    (folder / "params.json").write_text(json.dumps({"role": "trial", "lr": 0.01, "optimizer": "sgd"}))
    killed = SimpleNamespace(metrics={}, config=None, path=str(folder), error=RuntimeError(ray_oom))
    lost = SimpleNamespace(metrics={}, config=None, path=str(tmp_path / "trial-gone0000"), error=RuntimeError("x"))
    rows = collect([killed, lost], SPEC.base, SPEC.baseline)
    got = [(r.trial_id, r.outcome, r.role) for r in rows]
    assert got == [("abc12345", "oom", "trial"), ("gone0000", "error", "trial")]
    assert rows[0].cfg.lr == 0.01 and "running low on memory" in rows[0].error_line()


def test_a_sweep_saved_by_another_version_is_refused_in_one_line():
    from cnnclf.args import UsageError
    from sweeps.cifar10 import SPEC
    from sweeps.cli import same_sweep, settings
    from sweeps.driver import resume_record
    from sweeps.flags import build_parser

    args = build_parser(SPEC).parse_args(["--num-samples", "4", "--name", "old"])
    s = settings(SPEC, args)[0]
    assert same_sweep(s, args, {"settings": resume_record(s)}) == s
    older = {k: v for k, v in resume_record(s).items() if k != "format"}  # before the format was recorded
    with pytest.raises(UsageError, match=r"sweep 'old' was saved by another version .*state format 1; this one reads"):
        same_sweep(s, args, {"settings": older})
