"""The driver: start Ray, fit the search Tuner, confirm the best with fresh seeds, finish.

    run_sweep(settings, data) -> exit code

Data flow: the driver decodes the data once (cnnclf's cache), puts it into the Ray object store
through `tune.with_parameters`, and each trial moves it to its device once. Trials report every
epoch to Tune with a checkpoint; a driver-side Tune callback (sweeps/callbacks.py) writes one
parent run per sweep and one nested child run per trial through the sweep's journal, so only the
driver ever touches the tracking store. The Tuners themselves are built in sweeps/tuners.py.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import os
import shlex
import sys
import threading
import time
import warnings
from pathlib import Path

import optuna
import ray
from ray import tune

from cnnclf.args import UsageError, first_line
from sweeps import resume, runs, tuners, warmstart
from sweeps.budget import Budget, baseline_line, settle, slots
from sweeps.context import SweepContext, close_context, open_context
from sweeps.finish import Ending, confirm_configs, finish
from sweeps.journal import Journal
from sweeps.rows import collect, rank
from sweeps.saving import ReportWriter, dump_json
from sweeps.searchers import close_study
from sweeps.session import LOG_NAME, SweepFailed, disk_error, quiet_mlflow_http, sigterm_as_sigint
from sweeps.settings import (  # noqa: F401 (STATE_FORMAT and the exit statuses: importable here as before)
    EXIT_FAILED,
    EXIT_INTERRUPTED,
    EXIT_OK,
    EXIT_USAGE,
    STATE_FORMAT,
    Settings,
    resume_record,
)
from sweeps.spec import FAILED
from sweeps.tuners import Sweep
from sweeps.tuners import trial_dirname as _trial_dirname  # noqa: F401 (a saved tuner.pkl names it here)
from sweeps.warmstart import Priors


def run_sweep(s: Settings, data, report: ReportWriter | None = None) -> int:
    """The sweep: Ray up, its journal open, the search and confirmation Tuners fitted (`_run`), the answer."""
    with ray_session(s), _opened(s, data) as ctx:
        sweep = _sweep(s, data, ctx, report)
        try:
            return _run(sweep, data)
        except KeyboardInterrupt:  # outside Tune's loop: while confirming, exporting or waiting on MLflow
            return _interrupted(sweep)
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


def _interrupted(sweep: Sweep) -> int:
    """Ctrl-C: no run left RUNNING, the journal closed (what it could not write stays spooled), the resume command."""
    runs.close_orphans(sweep.journal, interrupted=True)
    left = sweep.journal.close(timeout=min(sweep.s.mlflow_wait, 10.0))
    spooled = f" ({left} MLflow writes spooled in {sweep.journal.folder})" if left else ""
    print(
        f"\nsweep {sweep.s.name} interrupted; its state is saved{spooled}. Resume with:\n  {sweep.s.resume_command}",
        file=sys.stderr,
    )
    return EXIT_INTERRUPTED


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
        tuner = tuner or tuners.search_tuner(sweep, path, i, total)
        results, st = _fit(sweep, tuner, path, known, total, ("trial", "baseline"))
        if results is None:
            return _interrupted(sweep)
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
        tuner = tuner or tuners.confirm_tuner(sweep, path, confirm)
        cresults, cstatuses = _fit(sweep, tuner, path, known, len(confirm), ("confirm",))
        if cresults is None:
            return _interrupted(sweep)
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


@contextlib.contextmanager
def ray_session(s):
    """Ray, started here or joined at --address (which must answer within --connect-timeout); shut down
    at the end. SIGTERM then takes Ctrl-C's path."""

    # We checkpoint every epoch on purpose; and our own progress lines replace Tune's tables.
    os.environ.setdefault("TUNE_WARN_EXCESSIVE_EXPERIMENT_CHECKPOINT_SYNC_THRESHOLD_S", "0")
    os.environ.setdefault("RAY_AIR_NEW_OUTPUT", "0")
    quiet_mlflow_http()
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    warnings.filterwarnings("ignore", category=optuna.exceptions.ExperimentalWarning)
    init_kw: dict = {"address": s.address} if s.address else {"include_dashboard": False, "log_to_driver": False}
    if s.ray_num_gpus is not None:
        init_kw["num_gpus"] = s.ray_num_gpus
    try:
        with _deadline(s.connect_timeout if s.address else None, s.spec.task, s.address):
            ray.init(**init_kw)
    except Exception as e:
        if s.address is None:
            raise
        raise UsageError(f"argument --address: cannot join the Ray cluster at {s.address} ({first_line(e)})") from None
    sigterm_as_sigint()  # after ray.init: its core worker installs a SIGTERM handler that aborts
    try:
        yield
    finally:
        ray.shutdown()


@contextlib.contextmanager
def _deadline(seconds: float | None, task: str, address: str | None):
    """Exit 2 if the block (ray.init on a reachable port that is not a Ray head) outlasts `seconds`.

    Nothing of the sweep has been written yet, so a hard exit loses nothing.
    """
    if seconds is None:
        yield
        return

    def give_up() -> None:
        print(
            f"{task} sweep: error: argument --address: no Ray cluster answered at {address} "
            f"within {seconds:g} s; check the address, or raise --connect-timeout",
            file=sys.stderr,
            flush=True,
        )
        os._exit(EXIT_USAGE)

    timer = threading.Timer(seconds, give_up)
    timer.daemon = True
    timer.start()
    try:
        yield
    finally:
        timer.cancel()
