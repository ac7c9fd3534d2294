"""The driver: start Ray, fit the search Tuner, confirm the best with fresh seeds, finish.

    run_sweep(settings, data) -> exit code

Data flow: the driver decodes the data once (cnnclf's cache), puts it into the Ray object store
through `tune.with_parameters`, and each trial moves it to its device once. Trials report every
epoch to Tune with a checkpoint; a driver-side Tune callback (sweeps/callbacks.py) writes one
parent run per sweep and one nested child run per trial through the sweep's journal, so only the
driver ever touches the tracking store.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
import math
import shlex
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import ray
from ray import tune
from ray.tune.schedulers import FIFOScheduler

from cnnclf.args import UsageError, first_line
from cnnclf.config import TrainConfig
from sweeps import callbacks, resume, runs, warmstart
from sweeps.budget import REDUCTION, TRIAL_FACTOR, Budget, Eta, asha_fraction, baseline_line, settle, slots
from sweeps.context import SweepContext, close_context, open_context
from sweeps.finish import Ending, ReportWriter, collect, confirm_configs, dump_json, finish, rank
from sweeps.journal import Journal
from sweeps.searchers import FixedConfigs, Known, Space, close_study, make_searcher, start_params
from sweeps.session import LOG_NAME, SweepFailed, disk_error, ray_session
from sweeps.spec import FAILED, MEASURED, METRIC, MODE, Ranges, TaskSpec, finite
from sweeps.trainable import TrialSetup
from sweeps.warmstart import Priors
from sweeps.worker import run_trial

EXIT_OK, EXIT_FAILED, EXIT_USAGE, EXIT_INTERRUPTED = 0, 1, 2, 130


@dataclass(frozen=True)
class Settings:
    """One sweep, as the command line resolved it (sweeps/cli.py); nothing changes it afterwards."""

    spec: TaskSpec
    name: str
    storage: str  # a local folder (absolute) or a URI
    out: Path  # the sweep's files go to out/name
    tracking_uri: str
    experiment: str
    base: TrainConfig  # search trials are base.replace(**suggested)
    baseline: TrainConfig  # the seed, re-measured on the sweep's data (its epochs capped at max_epochs)
    with_baseline: bool  # False: --no-baseline
    ranges: Ranges
    fixed: dict  # --fix
    num_samples: int
    max_epochs: int
    scheduler: str  # asha | fifo
    grace_period: int
    confirm: int  # fresh seeds per confirmed configuration (0: off)
    confirm_top: int
    cpus_per_trial: float
    gpus_per_trial: float | None  # None: 0.5 with GPUs, else 0
    max_concurrent: int | None
    max_failures: int
    seed: int
    resume: bool
    address: str | None
    connect_timeout: float
    ray_num_gpus: float | None
    mlflow_wait: float
    register_model: str | None = None  # --register-model: the Model Registry name of the best model
    warm_start: tuple[str, ...] = ()  # earlier sweeps whose trials seed the sampler
    gpu_hour_price: float | None = None  # the report prices the sweep's GPU-hours
    budget_by: str = "time"  # what ASHA's rungs count: training seconds (with the cost guard) or epochs
    max_trial_minutes: float | None = None  # the cost guard's limit (None: derived from the baseline's pace)
    trial_settings: dict = dataclasses.field(default_factory=dict)  # sweeps.warmstart.settings_of
    faults: tuple = ()
    params: dict = dataclasses.field(default_factory=dict)  # the flags as given, logged on the parent run
    resume_command: str = ""
    script: str = ""  # the task script, as run (sweeps/cli.py script_of)
    argv: tuple[str, ...] = ()  # its flags (with --name; without --resume)

    @property
    def out_dir(self) -> Path:
        return self.out / self.name

    @property
    def path(self) -> str:
        return f"{self.storage.rstrip('/')}/{self.name}"


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

    def interrupted(self) -> int:
        runs.close_orphans(self.journal, interrupted=True)
        left = self.journal.close(timeout=min(self.s.mlflow_wait, 10.0))
        spooled = f" ({left} MLflow writes spooled in {self.journal.folder})" if left else ""
        print(
            f"\nsweep {self.s.name} interrupted; its state is saved{spooled}. Resume with:\n  {self.s.resume_command}",
            file=sys.stderr,
        )
        return EXIT_INTERRUPTED


# The version of what a sweep saves for --resume (Tune's pickled callbacks and searchers, the journal): a sweep
# saved under another one is refused with one line (sweeps/cli.py same_sweep), never unpickled half-fitting.
STATE_FORMAT = 2


def resume_record(s: Settings) -> dict:
    """What a resumed sweep must share with the sweep it continues (sweeps/cli.py `same_sweep`): the flags that
    shape its results, as plain JSON. Kept in the journal's meta at the sweep's start."""
    record = {
        "task": s.spec.task,
        "experiment": s.experiment,
        "tracking_uri": s.tracking_uri,
        "seed": s.seed,
        "max_epochs": s.max_epochs,
        "scheduler": s.scheduler,
        "grace_period": s.grace_period,
        "budget_by": s.budget_by,
        "max_trial_minutes": s.max_trial_minutes,
        "confirm": s.confirm,
        "confirm_top": s.confirm_top,
        "no_baseline": not s.with_baseline,
        "warm_start": list(s.warm_start),
        "trial": s.trial_settings,
        "format": STATE_FORMAT,
    }
    return json.loads(json.dumps(record))


def run_sweep(s: Settings, data, report: ReportWriter | None = None) -> int:
    """The sweep: Ray up, its journal open, the search and confirmation Tuners fitted (`_run`), the answer."""
    with ray_session(s), _opened(s, data) as ctx:
        sweep = _sweep(s, data, ctx, report)
        try:
            return _run(sweep, data)
        except KeyboardInterrupt:  # outside Tune's loop: while confirming, exporting or waiting on MLflow
            return sweep.interrupted()
        except BaseException as e:
            journal = ctx.journal
            try:
                runs.close_orphans(journal, interrupted=True)  # no run left RUNNING, however it ended
                journal.close(timeout=min(s.mlflow_wait, 10.0))
            except OSError:  # the journal cannot write (a full or read-only --out): MLflow is told directly
                runs.close_directly(journal)
            if not isinstance(e, Exception) or disk_error(e) is not None:
                raise
            raise failed(s, e) from e


@contextlib.contextmanager
def _opened(s: Settings, data):
    """The sweep's context around its journal, with what a resume must know written at the first start."""
    journal = Journal(s.out_dir / "journal", s.tracking_uri, s.experiment, s.name)
    ctx = open_context(journal)
    try:
        if not journal.meta:
            meta = {"tracking_uri": s.tracking_uri, "experiment": s.experiment, "task": s.spec.task}
            meta["settings"] = resume_record(s)
            meta["started_at"] = time.time()  # the progress lines' clock counts from here, across phases and resumes
            meta |= {"provenance": runs.provenance(), "command": shlex.join([sys.executable, s.script, *s.argv])}
            meta |= {"datasets": runs.datasets(data.manifest, s.spec.task), "data_digest": data.manifest.get("digest")}
            meta["data_n"] = {k: v["n"] for k, v in (data.manifest.get("splits") or {}).items()}
            journal.append("meta", data=meta)
        yield ctx
    finally:
        close_context(ctx)
        journal.close(timeout=0)


def _sweep(s: Settings, data, ctx: SweepContext, report: ReportWriter | None) -> Sweep:
    """The running sweep: its context, its warm-start priors, the data in Ray's object store."""
    priors = _priors(s, ctx.journal)
    resources = ray.cluster_resources()
    gpus = _gpus(s, resources.get("GPU", 0))
    cap = min(s.max_concurrent or 10**6, s.num_samples + s.with_baseline)
    concurrency = slots(resources, s.cpus_per_trial, gpus, cap)
    return Sweep(s, ctx, _shared_arrays(s, data), gpus, priors, concurrency=concurrency, report=report)


def failed(s: Settings, e: Exception) -> SweepFailed:
    """An unexpected error as one line (its traceback goes to the sweep's log file) with the resume command."""
    log = s.out_dir / LOG_NAME
    logging.getLogger("sweeps").error("the sweep stopped", exc_info=e)
    return SweepFailed(f"{type(e).__name__}: {first_line(e)} (traceback in {log}); resume with: {s.resume_command}")


def fit_baseline(s: Settings, budget: Budget) -> Settings:
    """`s` with the seed baseline's epochs cut to what fits in a trial's time limit, or left out when not one
    epoch does (said on stdout): the baseline is measured on the budget every trial has. A pure function of
    the budget, which the journal keeps, so a resumed sweep decides the same."""
    if line := baseline_line(s, budget):
        print(line, flush=True)
    k = budget.baseline_epochs(s.baseline.epochs)
    if not s.with_baseline or k == s.baseline.epochs:
        return s
    if k == 0:
        return dataclasses.replace(s, with_baseline=False)
    return dataclasses.replace(s, baseline=s.baseline.replace(epochs=k))


def _run(sweep: Sweep, data) -> int:
    """Search (in as many Tuners as the sweep was extended), confirm, finish: the sweep's whole normal path."""
    sweep.budget = settle(sweep.s, sweep.journal, data, sweep.gpus, sweep.concurrency)
    sweep.s = s = fit_baseline(sweep.s, sweep.budget)
    rows: list = []
    statuses: dict = {}
    phases = resume.phases(sweep.journal, s.name, s.num_samples)
    for i, n in enumerate(phases):
        path = resume.phase_path(s.path, i)
        total = n + 1 if s.with_baseline and i == 0 else n  # the first search runs the seed baseline too
        tuner, known = _restored(sweep, path)
        tuner = tuner or _search_tuner(sweep, path, i, total)
        results, st = _fit(sweep, tuner, path, known, total, ("trial", "baseline"))
        if results is None:
            return sweep.interrupted()
        rows += collect(results, s.base, s.baseline)
        sweep.saw(rows)
        statuses |= st
    close_study(s.out_dir / "optuna.db", s.name)
    done = _confirmed_before(sweep, len(phases))
    rows += done
    confirmed = {r.confirm_of for r in done}
    confirm = confirm_configs(rank(rows), s.confirm_top, s.confirm, s.seed) if s.confirm else []
    confirm = [c for c in confirm if c["confirm_of"] not in confirmed]  # an extension confirms only its new top
    if confirm:
        # The top configurations again with fresh seeds (same data and splits), so no claim rests on
        # one lucky run. A second Tuner in the same Ray session; FIFO, no search.
        print(f"confirming the top {len(confirm) // s.confirm} with {s.confirm} fresh seeds each", flush=True)
        path = resume.confirm_path(s.path, len(phases))
        tuner, known = _restored(sweep, path)
        tuner = tuner or _tuner(sweep, path, len(confirm), FixedConfigs(Path(path).name, s.out_dir, confirm), None)
        cresults, cstatuses = _fit(sweep, tuner, path, known, len(confirm), ("confirm",))
        if cresults is None:
            return sweep.interrupted()
        rows += collect(cresults, s.base, s.baseline)
        statuses = {**statuses, **cstatuses}
    runs.close_orphans(sweep.journal, interrupted=False)
    ending = Ending(s.out_dir, s.mlflow_wait, s.register_model, sweep.report)
    summary = finish(rows, statuses, sweep.journal, data, ending)
    return _exit_code(sweep, summary)


def _confirmed_before(sweep: Sweep, phases: int) -> list:
    """The confirmation runs of the sweep before it was extended (their Tuners' saved results)."""

    s, rows = sweep.s, []
    for k in range(1, phases):
        path = resume.confirm_path(s.path, k)
        if resume.can_restore(path):
            tuner = tune.Tuner.restore(path, trainable=sweep.trainable(path))
            rows += collect(tuner.get_results(), s.base, s.baseline)
    return rows


def _priors(s: Settings, journal: Journal) -> Priors | None:
    """The --warm-start sweeps' trials that ran under this sweep's settings (said on stdout; at the sweep's
    first start, kept beside it and in the journal)."""
    if not s.warm_start:
        return None
    priors = warmstart.load(list(s.warm_start), s.out, s.trial_settings)
    for line in priors.lines():
        print(line, flush=True)
    if "warm_start" not in journal.meta:
        path = dump_json(priors.as_json(), s.out_dir / "warm_start.json")
        meta = {"sources": priors.sources, "trials": len(priors.trials), "file": str(path)}
        journal.append("meta", data={"warm_start": meta})
    return priors


def _restored(sweep: Sweep, path: str):
    """(The Tuner at `path` as Tune saved it, the ids of the trials it knows) on --resume; else (None, set())."""
    s, name = sweep.s, Path(path).name
    if not s.resume or not (name in (s.name, f"{s.name}-confirm") or resume.began(path)):
        return None, set()
    study = s.out_dir / "optuna.db" if name == s.name else None  # a later search's cut-short state keeps it
    return resume.restore(path, sweep.trainable(path), study)


def _fit(sweep: Sweep, tuner, path: str, known: set[str], total: int, roles: tuple[str, ...]):
    """Fit `tuner` (at `path`) to `total` trials, the journal's trials that Tune's saved state does not know
    (`known`) handed out again first; (results, statuses), or (None, {}) when it was interrupted (Tune
    returns normally after Ctrl-C, with trials still pending or running)."""
    resume.adopt(sweep.context, Path(path).name, path, known, roles)
    try:
        results = tuner.fit()
    except KeyboardInterrupt:
        return None, {}
    statuses = trial_statuses(sweep.journal, results)
    if len(statuses) < total or any(v not in ("TERMINATED", "ERROR") for v in statuses.values()):
        return None, {}
    return results, statuses


def trial_statuses(journal: Journal, results) -> dict[str, str]:
    """Trial id -> how Tune ended it (TERMINATED or ERROR), or INTERRUPTED when the journal never saw it end: on
    Ctrl-C Tune marks its running trials TERMINATED without telling the callbacks. The journal owns the fact."""
    out = {}
    for r in results:
        tid = Path(str(r.path)).name.rsplit("-", 1)[-1]  # trial folders are named <role>-<trial_id>
        entry = journal.trials.get(journal.key_of(tid))
        ended = entry is not None and entry.status is not None
        out[tid] = ("ERROR" if r.error else "TERMINATED") if ended else "INTERRUPTED"
    return out


def _search_tuner(sweep: Sweep, path: str, phase: int, total: int):
    """A new Tuner for search `phase` (0: the sweep's first, with the baseline; then its extensions)."""
    s = sweep.s
    baseline = None
    if s.with_baseline and phase == 0:
        baseline = {k: v for k, v in s.baseline.to_dict().items() if k in _baseline_keys()} | {"role": "baseline"}
    space = Space(s.ranges, s.fixed, experiment=s.name)
    salt = "|".join([*s.warm_start, str(phase)]) if s.warm_start or phase else ""
    start = start_params(s.base, s.ranges, s.fixed) if phase == 0 else None  # the reference, first
    known = Known(s.trial_settings, sweep.priors.trials if sweep.priors else [], salt, start)
    study = s.out_dir / "optuna.db"
    searcher = make_searcher(space, baseline, s.seed, study, s.max_concurrent, known, Path(path).name)
    scheduler = FIFOScheduler()
    if s.scheduler == "asha":
        rungs = sweep.budget.asha(s.max_epochs, s.grace_period)
        scheduler = callbacks.SweepASHA(metric=METRIC, mode=MODE, reduction_factor=REDUCTION, **rungs)
    # The search's ETA counts the confirmation to come: --confirm seeds of --confirm-top configurations.
    return _tuner(sweep, path, total, searcher, scheduler, s.confirm * s.confirm_top)


def _tuner(sweep: Sweep, path: str, total: int, searcher, scheduler, later: int = 0):
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
            trial_dirname_creator=_trial_dirname,
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


def _exit_code(sweep: Sweep, summary: dict) -> int:
    s, journal = sweep.s, sweep.journal
    left = journal.close(timeout=s.mlflow_wait)
    if left:
        sync_cmd = shlex.join([sys.executable, s.script, "--sync", "--name", s.name, "--out", str(s.out)])
        print(
            f"{s.spec.task} sweep: error: MLflow at {s.tracking_uri} stayed unreachable; {left} writes are "
            f"kept in {journal.folder}. Once it is back: {sync_cmd}",
            file=sys.stderr,
        )
        return EXIT_FAILED
    if journal.rejected:
        print(f"{s.spec.task} sweep: error: MLflow refused {journal.rejected} writes; see {journal.rejected_path}")
        return EXIT_FAILED
    if summary["failed"]:
        trial, outcome, error = summary["failures"][0]
        counts = ", ".join(f"{sum(f[1] == k for f in summary['failures'])} {k}" for k in FAILED)
        print(
            f"{s.spec.task} sweep: error: {summary['failed']} run(s) failed ({counts}); the first, {trial}: "
            f"{outcome}: {error or 'no message'} (details in {s.out_dir / LOG_NAME}); to run them again: "
            f"{s.resume_command}",
            file=sys.stderr,
        )
        return EXIT_FAILED
    return EXIT_OK


def _shared_arrays(s: Settings, data) -> dict:
    """TaskData's fields as arrays: what `tune.with_parameters` puts into the object store once."""
    if s.base.normalize == "dataset" or s.baseline.normalize == "dataset":
        data.train_stats()  # once here, not once per trial
    return {
        f.name: getattr(data, f.name).numpy() if hasattr(getattr(data, f.name), "numpy") else getattr(data, f.name)
        for f in dataclasses.fields(data)
    }


def _gpus(s: Settings, available: float) -> float:
    gpus = s.gpus_per_trial if s.gpus_per_trial is not None else (0.5 if available else 0.0)
    if gpus > 0 and not available and s.address is None:
        raise UsageError("argument --gpus-per-trial: the Ray cluster has no GPUs")
    if gpus > 0 and not available:
        # cluster.yaml scales GPU workers from zero: trials waiting for a GPU make the autoscaler add one.
        print("no GPU node in the cluster yet; the trials wait for the autoscaler to add one", flush=True)
    return gpus


def _trial_dirname(trial) -> str:
    return f"{trial.config.get('role', 'trial')}-{trial.trial_id}"  # Tune's default packs the config into it


def _baseline_keys() -> set[str]:
    """The baseline preset's training fields; data fields (resolution, splits, subset, seed) come from the sweep."""
    data_fields = {"task", "tags", "image_size", "val_fraction", "test_fraction", "subset", "eval_subset", "seed"}
    data_fields.add("split_seed")
    return {f.name for f in dataclasses.fields(TrainConfig)} - data_fields
