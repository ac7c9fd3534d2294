"""Driver-side Tune callbacks (the MLflow writer, progress lines) and the ASHA variant.

Only the driver writes to MLflow: many processes writing one SQLite file hit "database
is locked", and Ray's MLflowLoggerCallback nests nothing and opens duplicate runs when a
trial is restored. Here a sweep is one parent run; each trial is one nested child run,
found again by its `trial_id` tag when a trial or the whole sweep is resumed, and epochs
already logged are not logged twice.

Tune pickles callbacks into its experiment state and `Tuner.restore` unpickles them: so the
callbacks hold no live resource. The MLflow writer finds the sweep's journal through the sweep's
context (sweeps/context.py), by the sweep's folder: public Tune APIs only.
"""

from __future__ import annotations

import contextlib
import math
import time
from pathlib import Path

from ray import tune
from ray.tune.schedulers import ASHAScheduler

from cnnclf.config import TrainConfig
from sweeps import context
from sweeps.budget import bar
from sweeps.journal import Journal, now_ms, trial_key
from sweeps.runs import NOTE, config_line, epochs_text, log_datasets, open_parent
from sweeps.spec import (
    MEASURED,
    METRIC,
    METRIC_PREFIXES,
    Run,
    applies,
    chance_flag,
    error_outcome,
    finite,
    outcome_of,
    trial_config,
)

FINISHED_STATUSES = ("TERMINATED", "ERROR")
Since = tuple[float, float] | None  # (the sweep's first start, time.time(); its best search val/acc so far)
# What a failure's result (out of memory, too slow) adds to its run: what it cost, the memory left after it.
FAILURE_METRICS = ("cost/", "resources/gpu_mem_after_mb")


class SweepASHA(ASHAScheduler):
    """ASHA that never stops the baseline and keeps its results out of the rungs.

    It keeps its own list of the trials it was given, so that it never asks ASHA about a trial ASHA
    never saw (the baseline, or one restored without an add).
    """

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.ranked_trials: set[str] = set()

    @staticmethod
    def _is_baseline(trial) -> bool:
        return trial.config.get("role") == "baseline"

    def on_trial_add(self, tune_controller, trial) -> None:
        if not self._is_baseline(trial):
            self.ranked_trials.add(trial.trial_id)
            super().on_trial_add(tune_controller, trial)

    def on_trial_result(self, tune_controller, trial, result: dict) -> str:
        if trial.trial_id not in self.ranked_trials:
            return self.CONTINUE
        return super().on_trial_result(tune_controller, trial, result)

    def on_trial_complete(self, tune_controller, trial, result: dict) -> None:
        if trial.trial_id in self.ranked_trials:
            super().on_trial_complete(tune_controller, trial, result)

    def on_trial_remove(self, tune_controller, trial) -> None:
        if trial.trial_id in self.ranked_trials:
            super().on_trial_remove(tune_controller, trial)


class MLflowCallback(tune.Callback):
    """One parent run per sweep, one nested child run per trial; written from the driver only.

    Every write goes through the sweep's `Journal` (sweeps/journal.py): made durable locally,
    then applied by a background thread, so Tune's loop never waits on the tracking server.
    """

    def __init__(
        self, journal: Journal, base: TrainConfig, baseline: TrainConfig, sweep_params: dict, tune_name: str = ""
    ) -> None:
        self.folder, self.base, self.baseline, self.sweep_params = journal.folder.parent, base, baseline, sweep_params
        self.sweep = journal.sweep
        self.tune_name = tune_name  # the Tune experiment (a sweep has several: search, extensions, confirmation)

    @property
    def journal(self) -> Journal:
        return context.of(self.folder).journal

    def setup(self, **info) -> None:
        open_parent(self.journal, self.sweep_params)

    def on_trial_start(self, iteration, trials, trial, **info) -> None:
        j = self.journal
        adopt = (trial.config.get("adopt") or {}).get("trial_id")
        if adopt and trial.trial_id not in j.aliases and trial_key(adopt) in j.trials:
            # Ray re-created a trial that began after its last snapshot: continue that trial's run.
            key = trial_key(adopt)
            j.append("alias", key, trial_id=trial.trial_id)
            j.append("log", key, tags=[["trial_id", trial.trial_id], ["previous_trial_id", adopt]])
        key = j.key_of(trial.trial_id)
        if key in j.trials:  # resumed or adopted: reopen its run (closed as KILLED when interrupted)
            j.append("status", key, status="RUNNING", ts=now_ms())
            j.append("log", key, tags=[["status", "running"]])
            return
        self._create_run(trial, key)

    def _create_run(self, trial, key: str) -> None:
        j = self.journal
        cfg = trial_config(trial.config, self.base, self.baseline)
        role = trial.config.get("role", "trial")
        j.append(
            "create_run",
            key,
            name=f"{role}-{trial.trial_id}",
            ts=now_ms(),
            trial_id=trial.trial_id,
            experiment=self.tune_name,
            config=_plain(trial.config),
            tags={
                "sweep": self.sweep,
                "trial_id": trial.trial_id,
                "role": role,
                "status": "running",
                **({"confirm_of": trial.config["confirm_of"]} if "confirm_of" in trial.config else {}),
                **j.meta.get("provenance", {}),
                **({"data.digest": j.meta["data_digest"]} if j.meta.get("data_digest") else {}),
                NOTE: f"{role} of sweep {self.sweep}: {config_line(cfg)}; running",
            },
            params={k: str(v) for k, v in cfg.to_dict().items() if k != "tags" and applies(k, cfg.optimizer)},
        )
        log_datasets(j, key)

    def on_trial_result(self, iteration, trials, trial, result, **info) -> None:
        j = self.journal
        key = j.key_of(trial.trial_id)
        step = int(result.get("epoch", result.get("training_iteration", 0)))
        failure = bool(result.get("failure"))  # out of memory or too slow: reported once, after its last epoch
        if key not in j.trials or (step <= j.trials[key].last_step and not failure):
            return  # an epoch already logged (the trial resumed from an older checkpoint)
        step = max(step, j.trials[key].last_step)
        failed = bool(result.get("diverged")) or failure
        ts = now_ms()
        metrics = []
        for k, v in result.items():  # `epoch` is the step and `diverged` a tag: neither is logged as a metric
            if not k.startswith(METRIC_PREFIXES) or not finite(v):
                continue
            if failed and k in (METRIC, "val/loss", "train/loss"):
                continue  # stand-in values for Tune and Optuna, not measurements
            if failure and not k.startswith(FAILURE_METRICS):
                continue  # the rest was logged with the trial's last epoch
            metrics.append([k, float(v), ts, step])
        tags = [["node_id", result["node_id"]]] if result.get("node_id") else []
        if result.get("diverged"):
            tags.append(["diverged", "true"])  # set only on a trial that diverged
        j.append("log", key, metrics=metrics, tags=tags)

    def _finish(self, trial, status: str, mlflow_status: str, extra_tags: dict | None = None) -> None:
        key = self.journal.key_of(trial.trial_id)
        if key not in self.journal.trials:
            return
        tags = [[k, v] for k, v in {"status": status, **(extra_tags or {})}.items()]
        tags.append([NOTE, self._note(trial, status)])
        self.journal.append("log", key, tags=tags)
        self.journal.append("status", key, status=mlflow_status, ts=now_ms())

    def _note(self, trial, status: str) -> str:
        """The trial's description: its configuration in one line and how it ended."""
        last = trial.last_result or {}
        role = trial.config.get("role", "trial")
        scores = [f"{k} {last[k]:.2%}" for k in (METRIC, "test/acc") if finite(last.get(k)) and status in MEASURED]
        epochs = f" after {epochs_text(int(last['epoch']))}" if finite(last.get("epoch")) else ""
        cfg = config_line(trial_config(trial.config, self.base, self.baseline))
        flag = ""
        if status == "completed" and finite(last.get("test/acc")):
            run = Run.of(trial.trial_id, role, status, last)
            flag = chance_flag(run.test_estimate(), (run,)) or ""
        return (
            f"{role} of sweep {self.sweep}: {cfg}. {status.replace('_', ' ')}{epochs}"
            + (f": {', '.join(scores)}" if scores else "")
            + (f". Warning: {flag}" if flag else "")
        )

    def on_trial_complete(self, iteration, trials, trial, **info) -> None:
        last = trial.last_result or {}
        kind = outcome_of(last, trial_config(trial.config, self.base, self.baseline).epochs)
        mlflow_status = "FINISHED" if kind in ("completed", "early_stopped", "too_slow") else "FAILED"
        tags = {"stopped_by": "asha"} if kind == "early_stopped" else {}
        if kind == "too_slow":  # stopped on purpose: the projection (its cost/* came with its result)
            tags = {"stopped_by": "cost_guard", "projection": str(last.get("error", ""))[:500]}
        elif last.get("error"):
            tags["error"] = str(last["error"])[:500]
        self._finish(trial, kind, mlflow_status, tags)

    def on_trial_error(self, iteration, trials, trial, **info) -> None:
        msg = ""
        if trial.error_file:
            with contextlib.suppress(OSError):
                msg = Path(trial.error_file).read_text().strip().splitlines()[-1][:500]
        tags = {"error": msg} if msg else {}
        tags["attempts"] = str(trial.num_failures)  # every attempt failed: the first and its retries
        tags["retries"] = str(max(0, trial.num_failures - 1))
        key = self.journal.key_of(trial.trial_id)
        if key not in self.journal.trials:  # its worker died before the trial started (Ray killed it): recorded
            self._create_run(trial, key)
        self._finish(trial, error_outcome(msg), "FAILED", tags)  # oom when Ray killed its worker for memory

    def on_trial_recover(self, iteration, trials, trial, **info) -> None:
        key = self.journal.key_of(trial.trial_id)
        if key in self.journal.trials:
            self.journal.append("log", key, tags=[["retries", str(trial.num_failures)]])


def _plain(config: dict) -> dict:
    return {k: v for k, v in config.items() if isinstance(v, str | int | float | bool | dict | list | None)}


class ProgressCallback(tune.Callback):
    """One line per trial update and a sweep-level count, on stdout; and one overall progress line (trials
    done, best val/acc so far, the ETA) once the first trial reports and whenever a trial ends."""

    def __init__(
        self, total: int, base: TrainConfig, baseline: TrainConfig, eta=None, n_train: int = 0, since: Since = None
    ) -> None:
        self.total, self.base, self.baseline = total, base, baseline
        self.eta, self.n_train = eta, n_train  # sweeps.budget.Eta
        self._barred = False
        self.done = 0
        # The sweep's first start (wall clock: across phases and resumes) and its best search val/acc so far.
        self.started, self.best = since if since is not None else (time.time(), -math.inf)
        self._counted = False

    def on_step_begin(self, iteration, trials, **info) -> None:
        if not self._counted:  # a resumed sweep starts with its finished trials counted, and their best
            self.done = sum(t.status in FINISHED_STATUSES for t in trials)
            for t in trials:
                last = t.last_result or {}
                acc = last.get(METRIC)
                measured = not last.get("diverged") and not last.get("failure")
                if t.config.get("role", "trial") == "trial" and finite(acc) and measured:
                    self.best = max(self.best, acc)
            self._counted = True

    def on_trial_start(self, iteration, trials, trial, **info) -> None:
        adopt = (trial.config.get("adopt") or {}).get("trial_id")
        note = f" (continues {adopt})" if adopt else ""
        print(f"{self._prefix()} {trial.trial_id} {trial.config.get('role', 'trial'):8s} started{note}", flush=True)

    def _prefix(self) -> str:
        return f"[{self.done}/{self.total} done, {time.time() - self.started:6.0f}s]"

    def on_trial_result(self, iteration, trials, trial, result, **info) -> None:
        role = trial.config.get("role", "trial")
        planned = trial_config(trial.config, self.base, self.baseline).epochs
        acc = result.get(METRIC)
        if result.get("failure"):  # the cost guard's verdict, or out of memory: no epoch to show
            print(f"{self._prefix()} {trial.trial_id} {role:8s} {result['failure']}: {result.get('error', '')}")
            return
        if finite(acc) and role == "trial" and not result.get("diverged"):
            self.best = max(self.best, acc)
        print(
            f"{self._prefix()} {trial.trial_id} {role:8s} epoch {result.get('epoch', '?')}/{planned} "
            f"val/acc {acc:.4f} train/loss {result.get('train/loss', float('nan')):.4f} "
            f"{result.get('throughput/train_img_s', 0):7.0f} img/s" + ("  DIVERGED" if result.get("diverged") else ""),
            flush=True,
        )
        eta = self.eta
        if eta is not None:
            eta.seen(trial.trial_id, self.n_train * planned, result, search=role == "trial")
            if not self._barred:
                self._barred = True
                self._bar(trials)

    def on_trial_complete(self, iteration, trials, trial, **info) -> None:
        self.done += 1
        best = f"{self.best:.4f}" if self.best > -math.inf else "-"
        last = trial.last_result or {}
        how = "stopped: too slow, " if last.get("failure") == "too_slow" else ""
        print(f"{self._prefix()} {trial.trial_id} finished; {how}best val/acc so far {best}", flush=True)
        self._ended(trial, trials)

    def on_trial_error(self, iteration, trials, trial, **info) -> None:
        self.done += 1
        print(f"{self._prefix()} {trial.trial_id} FAILED after {trial.num_failures} attempt(s)", flush=True)
        self._ended(trial, trials)

    def _ended(self, trial, trials) -> None:
        if self.eta is not None:
            self.eta.end(trial.trial_id)
            self._bar(trials)

    def _bar(self, trials) -> None:
        left = self.eta.left_s()
        best = self.best if self.best > -math.inf else None
        print(f"{self._prefix()} {bar(self.done, self.total, best, left, finished=self.eta.done())}", flush=True)
