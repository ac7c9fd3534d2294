"""Driver-side Tune callbacks (MLflow writer, progress lines), the ASHA variant and the end-of-sweep summary.

Only the driver writes to MLflow: many processes writing one SQLite file hit "database
is locked", and Ray's MLflowLoggerCallback nests nothing and opens duplicate runs when a
trial is restored. Here a sweep is one parent run; each trial is one nested child run,
found again by its `trial_id` tag when a trial or the whole sweep is resumed, and epochs
already logged are not logged twice.
"""

from __future__ import annotations

import contextlib
import math
import time
from pathlib import Path

from ray import tune
from ray.tune.schedulers import ASHAScheduler

from cnnclf.config import TrainConfig
from sweeps.core import METRIC, METRIC_PREFIXES, finite, trial_config
from sweeps.journal import SWEEP_KEY, Journal, now_ms, trial_key

FINISHED_STATUSES = ("TERMINATED", "ERROR")


class SweepASHA(ASHAScheduler):
    """ASHA that never stops the baseline and keeps its results out of the rungs."""

    @staticmethod
    def _is_baseline(trial) -> bool:
        return trial.config.get("role") == "baseline"

    def on_trial_add(self, tune_controller, trial) -> None:
        if not self._is_baseline(trial):
            super().on_trial_add(tune_controller, trial)

    def on_trial_result(self, tune_controller, trial, result: dict) -> str:
        if self._is_baseline(trial):
            return self.CONTINUE
        return super().on_trial_result(tune_controller, trial, result)

    def on_trial_complete(self, tune_controller, trial, result: dict) -> None:
        if not self._is_baseline(trial) and trial.trial_id in self._trial_info:
            super().on_trial_complete(tune_controller, trial, result)

    def on_trial_remove(self, tune_controller, trial) -> None:
        if not self._is_baseline(trial) and trial.trial_id in self._trial_info:
            super().on_trial_remove(tune_controller, trial)


class MLflowCallback(tune.Callback):
    """One parent run per sweep, one nested child run per trial; written from the driver only.

    Every write goes through the sweep's `Journal` (sweeps/journal.py): made durable locally,
    then applied by a background thread, so Tune's loop never waits on the tracking server.
    """

    def __init__(self, journal: Journal, base: TrainConfig, baseline: TrainConfig, sweep_params: dict) -> None:
        self.journal, self.base, self.baseline, self.sweep_params = journal, base, baseline, sweep_params
        self.sweep = journal.sweep
        self.experiment = journal.experiment
        self.trial_statuses: dict[str, str] = {}  # trial_id -> Tune status, at the end
        # Trials seen to end (on_trial_complete / on_trial_error, or already ended when a restored
        # sweep began). On Ctrl-C, Tune's cleanup marks running trials TERMINATED without telling
        # callbacks: those must count as interrupted, not as finished.
        self.ended: set[str] = set()
        self._first_step = True

    def __getstate__(self) -> dict:  # Tune pickles callbacks into its experiment state
        return {k: v for k, v in self.__dict__.items() if k != "journal"}

    # --- runs -----------------------------------------------------------------------------------

    def start(self) -> None:
        """The sweep's parent run: created once, reopened by --resume."""
        j = self.journal
        if j.has_run(SWEEP_KEY):
            j.append("status", SWEEP_KEY, status="RUNNING", ts=now_ms())
            j.append("log", SWEEP_KEY, tags=[["status", "running"]])
        else:
            j.append(
                "create_run",
                SWEEP_KEY,
                name=self.sweep,
                ts=now_ms(),
                tags={"sweep": self.sweep, "role": "sweep", "status": "running"},
                params={k: str(v) for k, v in self.sweep_params.items()},
            )
        j.start()

    def setup(self, **info) -> None:
        self.start()

    def on_step_begin(self, iteration, trials, **info) -> None:
        if self._first_step:
            self._first_step = False
            self.ended |= {t.trial_id for t in trials if t.status in ("TERMINATED", "ERROR")}

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
        cfg = trial_config(trial.config, self.base, self.baseline)
        role = trial.config.get("role", "trial")
        j.append(
            "create_run",
            key,
            name=f"{role}-{trial.trial_id}",
            ts=now_ms(),
            trial_id=trial.trial_id,
            config=_plain(trial.config),
            trial_dir=str(trial.storage.trial_fs_path) if getattr(trial, "storage", None) else None,
            tags={
                "sweep": self.sweep,
                "trial_id": trial.trial_id,
                "role": role,
                "status": "running",
                **({"confirm_of": trial.config["confirm_of"]} if "confirm_of" in trial.config else {}),
            },
            params={k: str(v) for k, v in cfg.to_dict().items() if k != "tags"},
        )

    def on_trial_result(self, iteration, trials, trial, result, **info) -> None:
        j = self.journal
        key = j.key_of(trial.trial_id)
        step = int(result.get("epoch", result.get("training_iteration", 0)))
        if key not in j.trials or step <= j.trials[key].last_step:
            return  # an epoch already logged (the trial resumed from an older checkpoint)
        failed = bool(result.get("diverged")) or bool(result.get("failure"))
        ts = now_ms()
        metrics = []
        for k, v in result.items():
            if not (k.startswith(METRIC_PREFIXES) or k in ("epoch", "lr", "diverged")) or not finite(v):
                continue
            if failed and k in (METRIC, "val/loss", "train/loss"):
                continue  # stand-in values for Tune and Optuna, not measurements
            metrics.append([k, float(v), ts, step])
        tags = [["node_id", result["node_id"]]] if result.get("node_id") else []
        j.append("log", key, metrics=metrics, tags=tags)

    def _finish(self, trial, status: str, mlflow_status: str, extra_tags: dict | None = None) -> None:
        key = self.journal.key_of(trial.trial_id)
        if key not in self.journal.trials:
            return
        tags = [[k, v] for k, v in {"status": status, **(extra_tags or {})}.items()]
        self.journal.append("log", key, tags=tags)
        self.journal.append("status", key, status=mlflow_status, ts=now_ms())

    def on_trial_complete(self, iteration, trials, trial, **info) -> None:
        self.ended.add(trial.trial_id)
        last = trial.last_result or {}
        planned = trial_config(trial.config, self.base, self.baseline).epochs
        if last.get("failure"):
            kind = str(last["failure"])  # oom
        elif last.get("diverged"):
            kind = "diverged"
        else:
            kind = "completed" if last.get("epoch", 0) >= planned else "early_stopped"
        mlflow_status = "FINISHED" if kind in ("completed", "early_stopped") else "FAILED"
        tags = {"stopped_by": "asha"} if kind == "early_stopped" else {}
        if last.get("error"):
            tags["error"] = str(last["error"])[:500]
        self._finish(trial, kind, mlflow_status, tags)

    def on_trial_error(self, iteration, trials, trial, **info) -> None:
        self.ended.add(trial.trial_id)
        msg = ""
        if trial.error_file:
            with contextlib.suppress(OSError):
                msg = Path(trial.error_file).read_text().strip().splitlines()[-1][:500]
        tags = {"error": msg} if msg else {}
        tags["attempts"] = str(trial.num_failures)  # every attempt failed: the first and its retries
        tags["retries"] = str(max(0, trial.num_failures - 1))
        self._finish(trial, "error", "FAILED", tags)

    def on_trial_recover(self, iteration, trials, trial, **info) -> None:
        key = self.journal.key_of(trial.trial_id)
        if key in self.journal.trials:
            self.journal.append("log", key, tags=[["retries", str(trial.num_failures)]])

    def on_experiment_end(self, trials, **info) -> None:
        # This Tuner's trials; one that never reported its end was cut short by an interruption.
        self.trial_statuses = {t.trial_id: t.status if t.trial_id in self.ended else "INTERRUPTED" for t in trials}

    def close_orphans(self, interrupted: bool) -> int:
        """No run is left RUNNING: runs of trials that did not finish are closed as KILLED."""
        orphans = self.journal.open_trials()
        for t in orphans:
            self.journal.append("log", t.key, tags=[["status", "interrupted"]])
            self.journal.append("status", t.key, status="KILLED", ts=now_ms())
        if interrupted and self.journal.has_run(SWEEP_KEY):
            self.journal.append("log", SWEEP_KEY, tags=[["status", "interrupted"]])
            self.journal.append("status", SWEEP_KEY, status="KILLED", ts=now_ms())
        return len(orphans)

    def log_summary(self, best: dict | None, summary: dict, files: list[tuple[Path, str | None]]) -> None:
        """The best configuration (`best/*` params and scores), outcome counts and artifacts, on the parent."""
        ts = now_ms()
        metrics = [[f"trials/{k}", float(v), ts, 0] for k, v in summary["outcomes"].items()]
        params = []
        if best is not None:
            params = [[f"best/{k}", str(v)] for k, v in best["config"].items() if k != "tags"]
            params.append(["best/trial_id", best["trial_id"]])
            for k in ("val/acc", "test/acc"):
                if finite(best.get(k)):
                    metrics.append([f"best/{k}", float(best[k]), ts, 0])
            conf = best.get("confirmation") or {}
            for k in ("test_mean", "test_std", "n"):
                if k in conf:
                    metrics.append([f"best/confirm/{k}", float(conf[k]), ts, 0])
        if finite(summary.get("baseline_test_acc")):
            metrics.append(["baseline/test/acc", float(summary["baseline_test_acc"]), ts, 0])
        for k, v in (summary.get("data") or {}).items():
            metrics.append([f"data/{k}", float(v), ts, 0])
        self.journal.append("log", SWEEP_KEY, metrics=metrics, params=params)
        self.log_files(files)

    def log_files(self, files: list[tuple[Path, str | None]]) -> None:
        for f, artifact_dir in files:
            self.journal.append("artifact", SWEEP_KEY, path=str(Path(f).resolve()), dir=artifact_dir)

    def close_parent(self, status: str = "completed") -> None:
        self.journal.append("log", SWEEP_KEY, tags=[["status", status]])
        self.journal.append("status", SWEEP_KEY, status="FINISHED", ts=now_ms())


def _plain(config: dict) -> dict:
    return {k: v for k, v in config.items() if isinstance(v, str | int | float | bool | dict | list | None)}


class ProgressCallback(tune.Callback):
    """One line per trial update and a sweep-level count, on stdout."""

    def __init__(self, total: int, max_epochs: int, base: TrainConfig, baseline: TrainConfig) -> None:
        self.total, self.max_epochs, self.base, self.baseline = total, max_epochs, base, baseline
        self.done = 0
        self.best = -math.inf
        self._counted = False
        self.started = time.monotonic()

    def on_step_begin(self, iteration, trials, **info) -> None:
        if not self._counted:  # a resumed sweep starts with its finished trials counted, and their best
            self.done = sum(t.status in FINISHED_STATUSES for t in trials)
            for t in trials:
                last = t.last_result or {}
                acc = last.get(METRIC)
                if t.config.get("role", "trial") == "trial" and finite(acc) and not last.get("diverged"):
                    self.best = max(self.best, acc)
            self._counted = True

    def on_trial_start(self, iteration, trials, trial, **info) -> None:
        adopt = (trial.config.get("adopt") or {}).get("trial_id")
        note = f" (continues {adopt})" if adopt else ""
        print(f"{self._prefix()} {trial.trial_id} {trial.config.get('role', 'trial'):8s} started{note}", flush=True)

    def _prefix(self) -> str:
        return f"[{self.done}/{self.total} done, {time.monotonic() - self.started:6.0f}s]"

    def on_trial_result(self, iteration, trials, trial, result, **info) -> None:
        role = trial.config.get("role", "trial")
        planned = trial_config(trial.config, self.base, self.baseline).epochs
        acc = result.get(METRIC)
        if finite(acc) and role == "trial" and not result.get("diverged"):
            self.best = max(self.best, acc)
        print(
            f"{self._prefix()} {trial.trial_id} {role:8s} epoch {result.get('epoch', '?')}/{planned} "
            f"val/acc {acc:.4f} train/loss {result.get('train/loss', float('nan')):.4f} "
            f"{result.get('throughput/train_img_s', 0):7.0f} img/s" + ("  DIVERGED" if result.get("diverged") else ""),
            flush=True,
        )

    def on_trial_complete(self, iteration, trials, trial, **info) -> None:
        self.done += 1
        best = f"{self.best:.4f}" if self.best > -math.inf else "-"
        print(f"{self._prefix()} {trial.trial_id} finished; best val/acc so far {best}", flush=True)

    def on_trial_error(self, iteration, trials, trial, **info) -> None:
        self.done += 1
        print(f"{self._prefix()} {trial.trial_id} FAILED after {trial.num_failures} attempt(s)", flush=True)
