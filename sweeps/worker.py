"""The trial's entry point in a Ray worker, which Tune pickles by reference and each trial actor imports
while it starts.

It imports the trial (torch, Tune's reports, cnnclf.train) when the trial runs, not when its actor starts: with a search
algorithm Tune keeps one trial pending at a time (`TUNE_MAX_PENDING_TRIALS_PG`), and a trial is pending until
its actor has started, so seconds of imports there would start the trials of a wave one after another
(tests/test_sweeps.py `test_epochs_logged_per_step_and_fractional_gpus` catches it).
"""

from __future__ import annotations

from sweeps.faults import fire


def run_trial(config: dict, data: dict, setup) -> None:
    """`sweeps.trial.run_trial`, imported on the trial's first call (`setup`: its TrialSetup)."""
    fire(list(setup.faults), "start", config, 0)  # tests: a worker killed as it starts (sweeps/faults.py)
    from sweeps import trial  # an entry point: see the module's docstring

    trial.run_trial(config, data, setup)
