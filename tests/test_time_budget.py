"""Time-aware sweeps: rungs in training seconds, the cost guard (too_slow), the ETA; real Ray, Optuna, MLflow."""

from __future__ import annotations

import json

import optuna
import pytest
import torch

from cnnclf.config import TrainConfig
from cnnclf.data import TaskData
from cnnclf.train import Pace, train
from sweeps.budget import Budget, Eta, asha_fraction, bar, expected_fraction
from tests.test_sweeps import runs


@pytest.mark.slow
def test_time_mode_stops_a_slow_trial_as_too_slow_pruned_in_optuna_finished_in_mlflow(budget_sweep):
    # tests/conftest.py: 3 search trials and the baseline, the first measured trial slowed past a 1.2 s limit.
    # (tests/test_sweep_knowledge.py may have extended the sweep by then: these hold either way.)
    tmp, out = budget_sweep.tmp, budget_sweep.result.stdout
    assert "budget by time: ASHA's rungs at" in out and "stops as too_slow (--max-trial-minutes)" in out
    assert "ETA about" in out and "trials done, best val/acc" in out  # the overall progress line
    assert "stopped: too slow" in out

    _c, parents, children = runs(tmp, "cifar10", "t")
    slow = [c for c in children if c.data.tags["status"] == "too_slow"]
    assert len(slow) == 1
    run = slow[0]
    assert run.info.status == "FINISHED" and run.data.tags["stopped_by"] == "cost_guard"
    assert run.data.metrics["cost/projected_s"] > 1.2  # over the 0.02-minute limit it was stopped for
    assert run.data.metrics["cost/train_s"] >= 3.0  # what it spent until then counts in the totals
    assert "projected" in run.data.tags["projection"] and "test/acc" not in run.data.metrics
    assert all(c.info.status == "FINISHED" for c in children)
    assert "budget by time" in parents[0].data.tags["budget"]

    study = optuna.load_study(study_name="t", storage=f"sqlite:///{tmp / 'out' / 't' / 'optuna.db'}")
    pruned = [t for t in study.trials if t.state.name == "PRUNED"]
    assert len(pruned) == 1 and pruned[0].user_attrs["status"] == "too_slow"
    assert all(t.state.name == "COMPLETE" for t in study.trials if t not in pruned)
    summary = json.loads((tmp / "out" / "t" / "summary.json").read_text())
    assert summary["outcomes"]["too_slow"] == 1 and summary["failed"] == 0  # a verdict, not a failure: exit 0
    report = (tmp / "out" / "t" / "report.md").read_text()
    assert "too slow (cost guard)" in report and "**Budget**: by time: ASHA's rungs at" in report


def _tiny(n: int = 64, size: int = 16) -> TaskData:
    g = torch.Generator().manual_seed(0)
    x = torch.randint(0, 256, (n, 3, size, size), dtype=torch.uint8, generator=g)
    y = torch.arange(n) % 2
    return TaskData("cifar10", ["a", "b"], x, y, x[:8], y[:8], x[:8], y[:8])


def test_train_probes_its_pace_once_and_a_raising_probe_stops_it():
    cfg = TrainConfig(task="cifar10", model="cnn", depth=2, width=8, batch_size=8, epochs=3, image_size=16)
    seen: list[Pace] = []
    train(cfg, _tiny(), None, device="cpu", probe=seen.append)
    assert len(seen) == 1  # the epoch (8 steps) is shorter than the probe's steps: measured whole, once
    p = seen[0]
    assert p.images == 64 and p.images_left == 128 and p.seconds > 0
    assert p.projected_s() == pytest.approx(p.spent + p.seconds * 3)
    assert p.projected_s(extra_s=1.0) == pytest.approx(p.spent + (p.seconds + 1.0) * 3)

    class Stop(Exception):
        pass

    epochs: list[int] = []

    def stop(pace):
        raise Stop

    with pytest.raises(Stop):
        train(cfg, _tiny(), lambda e, m, s: epochs.append(e), device="cpu", probe=stop)
    assert epochs == []  # stopped inside its first epoch: nothing reported


def test_asha_share_and_rungs_in_seconds():
    assert expected_fraction([1], 3) == pytest.approx((1 + 2 / 3) / 3)
    assert expected_fraction([1, 3, 9], 10) == pytest.approx((1 + 2 / 3 + 6 / 9 + 1 / 27) / 10)
    b = Budget("time", 900.0, "test")
    kw = b.asha(max_epochs=3, grace_epochs=1)
    assert kw["time_attr"] == "cost/train_s" and kw["grace_period"] == pytest.approx(100.0)
    assert kw["max_t"] > 900.0  # room past the guard's limit, so a trial that fits is not cut before its last epoch
    assert asha_fraction(b, "asha", 3, 1) == pytest.approx((100 + 200 / 3 + 600 / 9) / 900)
    assert asha_fraction(b, "fifo", 3, 1) == 1.0
    assert Budget("epochs", None, "").asha(3, 1) == {"time_attr": "epoch", "max_t": 3, "grace_period": 1}


def test_eta_from_measured_paces():
    eta = Eta(total=4, concurrency=2, cap_s=None, fraction=1.0, guess_s=50.0)
    assert eta.left_s() is None
    # The baseline (not a search trial) reports first: the 3 search trials not yet measured cost the guess.
    eta.seen("b", 100, {"cost/train_s": 1.0, "cost/images": 50, "throughput/train_img_s": 50.0}, search=False)
    assert eta.left_s() == pytest.approx((1.0 + 3 * 50) / 2)
    eta.end("b")
    # A trial that has trained 100 of its 400 images in 10 s at 10 images/s: 30 s left; 2 more at its 40 s.
    eta.seen("a", 400, {"cost/train_s": 10.0, "cost/images": 100, "throughput/train_img_s": 10.0}, search=True)
    assert eta.left_s() == pytest.approx((30 + 2 * 40) / 2)
    eta.end("a")
    assert eta.left_s() == pytest.approx(2 * 40 / 2)
    capped = Eta(total=1, concurrency=1, cap_s=20.0, fraction=1.0)
    capped.seen("a", 400, {"cost/train_s": 10.0, "cost/images": 100, "throughput/train_img_s": 10.0}, search=True)
    assert capped.left_s() == pytest.approx(10.0)  # time mode: no trial trains past the limit
    line = bar(2, 4, 0.61, 90.0)
    assert line.startswith("[##########..........] 2/4 trials done, best val/acc 0.6100, ETA about")
    assert bar(0, 4, None, None).endswith("0/4 trials done, best val/acc -, ETA after the first results")


def test_eta_counts_the_confirmation_to_come_never_undercuts_a_running_trial_and_says_done(capsys):
    import time
    from types import SimpleNamespace

    from sweeps.callbacks import ProgressCallback

    eta = Eta(total=2, concurrency=2, cap_s=None, fraction=1.0, later=3)
    eta.seen("a", 400, {"cost/train_s": 10.0, "cost/images": 100, "throughput/train_img_s": 10.0}, search=True)
    eta.seen("b", 4000, {"cost/train_s": 10.0, "cost/images": 100, "throughput/train_img_s": 10.0}, search=True)
    # b has 390 s left: more than the mean of the running rests (30 + 390) / 2; then 3 confirmation runs of
    # the mean projected cost (40 + 400) / 2, two at a time.
    assert eta.left_s() == pytest.approx(390 + 2 * 220)
    eta.end("a")
    eta.end("b")
    assert eta.left_s() == pytest.approx(2 * 220) and not eta.done()  # the search is over, not the sweep
    last = Eta(total=1, concurrency=2, cap_s=None, fraction=1.0)
    last.seen("c", 400, {"cost/train_s": 40.0, "cost/images": 400, "throughput/train_img_s": 10.0}, search=False)
    last.end("c")
    assert last.left_s() == 0.0 and last.done()
    base = TrainConfig(task="cifar10", model="cnn", epochs=2)
    # A later phase's (or a resumed sweep's) lines count from the sweep's first start and keep its best so far.
    progress = ProgressCallback(1, base, base, last, 400, since=(time.time() - 100.0, 0.7))
    progress.on_trial_complete(0, [], SimpleNamespace(trial_id="c", last_result={}))
    out = capsys.readouterr().out.splitlines()
    assert out[0].startswith("[1/1 done,    10") and out[0].endswith("c finished; best val/acc so far 0.7000")
    assert out[1].endswith("1/1 trials done, best val/acc 0.7000, done")


def test_a_long_projection_without_a_gpu_says_how_to_shrink_it(tmp_path, capsys):
    from types import SimpleNamespace

    from sweeps.budget import settle
    from sweeps.journal import Journal

    journal = Journal(tmp_path / "journal", "sqlite:///unused.db", "cifar10", "s", verbose=False)
    baseline = TrainConfig(task="cifar10", model="tutorial", batch_size=4, epochs=2, image_size=32)
    base = TrainConfig(task="cifar10", image_size=32)
    flags = dict(budget_by="time", baseline=baseline, base=base, max_epochs=3, scheduler="asha", grace_period=1)
    flags |= dict(cpus_per_trial=1.0, with_baseline=True, fixed={})
    # 40 trials of up to 10 hours each: far over 2 hours, on a machine without a GPU.
    s = SimpleNamespace(**flags, max_trial_minutes=600.0, num_samples=40)
    budget = settle(s, journal, _tiny(size=32), gpus=0.0, concurrency=2)
    out = capsys.readouterr().out
    assert budget.max_trial_s == 36000.0 and budget.baseline_s is not None
    assert "projected at the start: about" in out and "this is long without a GPU; to shrink it:" in out
    assert "--subset 10000" in out and "--num-samples 20" in out
    assert journal.meta["budget"]["max_trial_s"] == 36000.0  # kept: a resumed sweep keeps its limit
    # A short sweep says its projection and nothing more; the limit derived from the baseline's measured pace.
    s = SimpleNamespace(**flags, max_trial_minutes=None, num_samples=2)
    journal2 = Journal(tmp_path / "journal2", "sqlite:///unused.db", "cifar10", "s2", verbose=False)
    budget = settle(s, journal2, _tiny(size=32), gpus=0.0, concurrency=2)
    out = capsys.readouterr().out
    assert budget.max_trial_s == 60.0 and "at least 60 s" in budget.source  # tiny data: the one-minute floor
    assert "to shrink it" not in out
    journal.close(timeout=0)
    journal2.close(timeout=0)


def test_the_baseline_trains_the_epochs_that_fit_a_trials_limit_or_is_left_out(capsys):
    from sweeps.catdog import SPEC
    from sweeps.cli import settings
    from sweeps.driver import fit_baseline
    from sweeps.flags import build_parser

    s = settings(SPEC, build_parser(SPEC).parse_args(["--num-samples", "8"]))[0]
    assert s.baseline.epochs == 15 and s.with_baseline  # the seed's 60, capped at --max-epochs
    limit = 600.0
    fits = Budget("time", limit, "test", baseline_s=2000.0, baseline_epoch_s=200.0, reference_s=450.0)
    assert fits.baseline_epochs(15) == 2 and fit_baseline(s, fits).baseline.epochs == 2  # the reference's 450 s
    assert "trains 2 of its 15 epochs (3.3 min per epoch here)" in capsys.readouterr().out
    by_hand = Budget("time", 300.0, "--max-trial-minutes", baseline_s=2000.0, baseline_epoch_s=100.0, reference_s=450.0)
    assert by_hand.baseline_epochs(15) == 3  # a lower limit given by hand caps it too
    too_long = Budget("time", limit, "test", baseline_s=5000.0, baseline_epoch_s=500.0, reference_s=450.0)
    left_out = fit_baseline(s, too_long)
    assert not left_out.with_baseline and "the seed baseline is left out" in capsys.readouterr().out
    quick = Budget("time", limit, "test", baseline_s=100.0, baseline_epoch_s=10.0, reference_s=240.0)
    assert fit_baseline(s, quick) is s and capsys.readouterr().out == ""  # all its epochs fit: unchanged
    epochs_mode = Budget("epochs", None, "", baseline_s=7000.0, baseline_epoch_s=700.0)
    assert fit_baseline(s, epochs_mode) is s  # no limit, no cut


def test_the_limit_follows_the_reference_configuration_not_the_baseline():
    from types import SimpleNamespace

    from sweeps.budget import TRIAL_FACTOR, Machine, plan, reference

    data = _tiny(n=1024, size=16)
    slow_baseline = TrainConfig(task="cifar10", model="cnn", depth=4, width=32, batch_size=4, epochs=2, image_size=16)
    ref = TrainConfig(task="cifar10", model="cnn", depth=2, width=8, batch_size=64, epochs=2, image_size=16)
    b = plan("time", None, (slow_baseline, ref), 200, data, Machine("cpu", 1))
    assert b.reference_s is not None and b.baseline_s is not None and b.baseline_s > b.reference_s
    assert b.max_trial_s == pytest.approx(max(60.0, TRIAL_FACTOR * b.reference_s))
    assert "reference configuration" in b.source and b.baseline_epoch_s == pytest.approx(b.baseline_s / 200)
    s = SimpleNamespace(base=ref, fixed={"width": 16, "lr": 0.1, "epochs": 3})
    assert reference(s) == ref.replace(width=16, lr=0.1)  # the searched parameters --fix pins; not epochs


def test_the_search_starts_from_the_reference_configuration_where_it_lies_in_the_space():
    from sweeps.catdog import SPEC
    from sweeps.searchers import start_params

    start = start_params(SPEC.base, SPEC.ranges, {})
    assert start == {"optimizer": "sgd", "lr": 0.05, "momentum": 0.9, "weight_decay": 5e-4, "batch_size": 64,
                     "depth": 6, "kernel_size": 3, "width": 16}  # fmt: skip
    assert "lr" not in start_params(SPEC.base, SPEC.ranges, {"lr": 0.1})  # a pinned value is the Space's, not ours
    assert start_params(SPEC.base, SPEC.smoke_ranges, {}) is None  # outside a smoke test's narrow ranges
    assert start_params(SPEC.base, SPEC.ranges, {"optimizer": "adam"}) is None  # lr 0.05 is no Adam start
