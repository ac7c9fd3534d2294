"""The Tuners a sweep fits (sweeps/driver.py fits them): `Sweep`, the running sweep (its settings, context,
budget and the trainable every Tuner runs); a search phase's Tuner (`search_tuner`: the Optuna searcher, ASHA
or FIFO) and the confirmation runs' (`confirm_tuner`), both built by `tuner` with the MLflow and progress
callbacks. A Tuner's pickled state names `trial_dirname`: a sweep saved before this module existed names it
`sweeps.driver._trial_dirname`, which sweeps/driver.py keeps."""

from __future__ import annotations

import dataclasses
import math
import time
from dataclasses import dataclass
from pathlib import Path

from ray import tune
from ray.tune.schedulers import FIFOScheduler

from cnnclf.config import TrainConfig
from sweeps import callbacks
from sweeps.budget import REDUCTION, TRIAL_FACTOR, Budget, Eta, asha_fraction
from sweeps.context import SweepContext
from sweeps.journal import Journal
from sweeps.saving import ReportWriter
from sweeps.searchers import FixedConfigs, Known, Space, make_searcher, start_params
from sweeps.settings import Settings
from sweeps.spec import MEASURED, METRIC, MODE, finite
from sweeps.trainable import TrialSetup
from sweeps.warmstart import Priors
from sweeps.worker import run_trial


@dataclass
class Sweep:
    """A running sweep: its settings, journal and the trainable every Tuner runs."""

    s: Settings
    context: SweepContext  # the journal, and what --resume hands out again (shared with searchers and callbacks)
    arrays: dict
    gpus: float
    priors: Priors | None = None  # --warm-start
    budget: Budget = dataclasses.field(default_factory=lambda: Budget("epochs", None, ""))
    concurrency: int = 1  # trials that run at once (for the ETA)
    best: float = -math.inf  # the best search val/acc of the phases fitted so far (the progress lines keep it)
    report: ReportWriter | None = None  # writes the report at the end (the task scripts hand in reports.write)

    @property
    def journal(self) -> Journal:
        return self.context.journal

    def since(self) -> tuple[float, float]:
        """What a phase's progress lines start from: the sweep's first start and its best val/acc so far."""
        return float(self.journal.meta.get("started_at") or time.time()), self.best

    def saw(self, rows: list) -> None:
        measured = [r.val_acc for r in rows if r.role == "trial" and r.outcome in MEASURED and finite(r.val_acc)]
        self.best = max([self.best, *measured])

    @property
    def n_train(self) -> int:
        return len(self.arrays["train_y"])

    def trainable(self, experiment_path: str):

        s = self.s
        finished = self.journal.finished_trial_ids()
        setup = TrialSetup(s.base, s.baseline, experiment_path, s.faults, finished, self.budget.max_trial_s)
        return tune.with_resources(
            tune.with_parameters(run_trial, data=self.arrays, setup=setup), {"cpu": s.cpus_per_trial, "gpu": self.gpus}
        )


def search_tuner(sweep: Sweep, path: str, phase: int, total: int):
    """A new Tuner for search `phase` (0: the sweep's first, with the baseline; then its extensions)."""
    s = sweep.s
    baseline = None
    if s.with_baseline and phase == 0:
        baseline = {k: v for k, v in s.baseline.to_dict().items() if k in _baseline_keys()} | {"role": "baseline"}
    space = Space(s.ranges, s.fixed, experiment=s.name)
    salt = "|".join([*s.warm_start, str(phase)]) if s.warm_start or phase else ""
    start = start_params(s.base, s.ranges, s.fixed) if phase == 0 else None  # the reference, first
    known = Known(s.trial_settings, sweep.priors.trials if sweep.priors else [], salt, start, Path(path).name)
    study = s.out_dir / "optuna.db"
    searcher = make_searcher(space, baseline, s.seed, study, s.max_concurrent, known)
    scheduler = FIFOScheduler()
    if s.scheduler == "asha":
        rungs = sweep.budget.asha(s.max_epochs, s.grace_period)
        scheduler = callbacks.SweepASHA(metric=METRIC, mode=MODE, reduction_factor=REDUCTION, **rungs)
    # The search's ETA counts the confirmation to come: --confirm seeds of --confirm-top configurations.
    return tuner(sweep, path, total, searcher, scheduler, s.confirm * s.confirm_top)


def confirm_tuner(sweep: Sweep, path: str, configs: list[dict]):
    """A new Tuner of the confirmation runs `configs` (sweeps/finish.py confirm_configs): FIFO, no search."""
    return tuner(sweep, path, len(configs), FixedConfigs(Path(path).name, sweep.s.out_dir, configs), None)


def tuner(sweep: Sweep, path: str, total: int, searcher, scheduler, later: int = 0):
    """A Tuner of `total` trials; `later`: the runs of the phases after it (for the ETA)."""

    s = sweep.s
    mlflow_cb = callbacks.MLflowCallback(sweep.journal, s.base, s.baseline, s.params, Path(path).name)
    b = sweep.budget
    fraction = asha_fraction(b, s.scheduler, s.max_epochs, s.grace_period) if scheduler is not None else 1.0
    guess = b.max_trial_s or (TRIAL_FACTOR * b.reference_s if b.reference_s else None)  # before a trial's pace
    eta = Eta(total, min(sweep.concurrency, total), b.max_trial_s, fraction, guess, later)
    progress = callbacks.ProgressCallback(total, s.base, s.baseline, eta, sweep.n_train, sweep.since())
    return tune.Tuner(
        sweep.trainable(path),
        tune_config=tune.TuneConfig(
            search_alg=searcher,
            scheduler=scheduler,
            num_samples=total,
            reuse_actors=True,
            trial_dirname_creator=trial_dirname,
        ),
        run_config=tune.RunConfig(
            name=Path(path).name,
            storage_path=s.storage,
            callbacks=[mlflow_cb, progress],
            failure_config=tune.FailureConfig(max_failures=s.max_failures),
            # Tune keeps every checkpoint; each trial prunes its own, with a lag (sweeps/trainable.py).
            checkpoint_config=tune.CheckpointConfig(checkpoint_score_attribute=METRIC, checkpoint_score_order=MODE),
            verbose=0,
        ),
    )


def trial_dirname(trial) -> str:
    return f"{trial.config.get('role', 'trial')}-{trial.trial_id}"  # Tune's default packs the config into it


def _baseline_keys() -> set[str]:
    """The baseline preset's training fields; data fields (resolution, splits, subset, seed) come from the sweep."""
    data_fields = {"task", "tags", "image_size", "val_fraction", "test_fraction", "subset", "eval_subset", "seed"}
    data_fields.add("split_seed")
    return {f.name for f in dataclasses.fields(TrainConfig)} - data_fields
