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
import sys
import time
from pathlib import Path

from ray import tune
from ray.tune.schedulers import ASHAScheduler

from cnnclf.config import TrainConfig
from sweeps.core import METRIC, METRIC_PREFIXES, finite, trial_config

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
    """One parent run per sweep, one nested child run per trial; written from the driver only."""

    def __init__(
        self,
        tracking_uri: str,
        experiment: str,
        sweep: str,
        base: TrainConfig,
        baseline: TrainConfig,
        sweep_params: dict,
    ) -> None:
        self.tracking_uri, self.experiment, self.sweep = tracking_uri, experiment, sweep
        self.base, self.baseline, self.sweep_params = base, baseline, sweep_params
        self._client = None
        self.parent_id: str | None = None
        self.experiment_id: str | None = None
        self._runs: dict[str, str] = {}  # trial_id -> run_id
        self._last_step: dict[str, int] = {}  # run_id -> last epoch logged
        self.trial_statuses: dict[str, str] = {}  # trial_id -> Tune status, at the end
        self.write_failures = 0

    def __getstate__(self) -> dict:  # Tune pickles callbacks into its experiment state
        state = self.__dict__.copy()
        state["_client"] = None
        return state

    @property
    def client(self):
        if self._client is None:
            from mlflow.tracking import MlflowClient

            self._client = MlflowClient(tracking_uri=self.tracking_uri)
        return self._client

    def _safe(self, what: str, fn, *args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except Exception as e:
            self.write_failures += 1
            print(f"warning: MLflow {what} failed: {type(e).__name__}: {str(e).splitlines()[0][:200]}", file=sys.stderr)
            return None

    # --- runs -----------------------------------------------------------------------------------

    def start(self) -> None:
        """Find or create the experiment and the sweep's parent run (reused on --resume)."""
        if self.parent_id is not None:
            return
        c = self.client
        exp = c.get_experiment_by_name(self.experiment)
        self.experiment_id = exp.experiment_id if exp else c.create_experiment(self.experiment)
        found = c.search_runs(
            [self.experiment_id], f"tags.sweep = '{self.sweep}' and tags.role = 'sweep'", max_results=1
        )
        if found:
            self.parent_id = found[0].info.run_id
            c.update_run(self.parent_id, status="RUNNING")
            for run in c.search_runs(
                [self.experiment_id], f"tags.sweep = '{self.sweep}' and tags.role != 'sweep'", max_results=10000
            ):
                self._runs[run.data.tags["trial_id"]] = run.info.run_id
                epochs = c.get_metric_history(run.info.run_id, "epoch")
                self._last_step[run.info.run_id] = max((int(m.step) for m in epochs), default=0)
        else:
            run = c.create_run(
                self.experiment_id,
                run_name=self.sweep,
                tags={"sweep": self.sweep, "role": "sweep", "status": "running"},
            )
            self.parent_id = run.info.run_id
            from mlflow.entities import Param

            params = [Param(k, str(v)[:6000]) for k, v in sorted(self.sweep_params.items())]
            c.log_batch(self.parent_id, params=params)

    def setup(self, **info) -> None:
        self._safe("setup", self.start)

    def _child(self, trial) -> str | None:
        if trial.trial_id in self._runs:
            return self._runs[trial.trial_id]
        if self.parent_id is None:
            return None
        from mlflow.entities import Param

        cfg = trial_config(trial.config, self.base, self.baseline)
        role = trial.config.get("role", "trial")
        run = self.client.create_run(
            self.experiment_id,
            run_name=f"{role}-{trial.trial_id}",
            tags={
                "mlflow.parentRunId": self.parent_id,
                "sweep": self.sweep,
                "trial_id": trial.trial_id,
                "role": role,
                "status": "running",
                **({"confirm_of": trial.config["confirm_of"]} if "confirm_of" in trial.config else {}),
            },
        )
        params = {k: v for k, v in cfg.to_dict().items() if k != "tags"}
        self.client.log_batch(run.info.run_id, params=[Param(k, str(v)) for k, v in sorted(params.items())])
        self._runs[trial.trial_id] = run.info.run_id
        return run.info.run_id

    def on_trial_start(self, iteration, trials, trial, **info) -> None:
        known = trial.trial_id in self._runs
        run_id = self._safe("create run", self._child, trial)
        if run_id and known:  # a resumed trial reopens its run (closed as KILLED when interrupted)
            self._safe("reopen run", self.client.update_run, run_id, status="RUNNING")
            self._safe("reopen run", self.client.set_tag, run_id, "status", "running")

    def on_trial_result(self, iteration, trials, trial, result, **info) -> None:
        self._safe("log metrics", self._log_result, trial, result)

    def _log_result(self, trial, result: dict) -> None:
        from mlflow.entities import Metric

        run_id = self._child(trial)
        if run_id is None:
            return
        step = int(result.get("epoch", result.get("training_iteration", 0)))
        if step <= self._last_step.get(run_id, 0):
            return  # re-run of an epoch already logged (the trial resumed from an older checkpoint)
        diverged = bool(result.get("diverged"))
        ts = int(time.time() * 1000)
        metrics = []
        for k, v in result.items():
            if not (k.startswith(METRIC_PREFIXES) or k in ("epoch", "lr", "diverged")) or not finite(v):
                continue
            if diverged and k in (METRIC, "val/loss", "train/loss"):
                continue  # stand-in values for Tune and Optuna, not measurements
            metrics.append(Metric(k, float(v), ts, step))
        self.client.log_batch(run_id, metrics=metrics)
        if step == 1 or run_id not in self._last_step:
            node = result.get("node_id")
            if node:
                self.client.set_tag(run_id, "node_id", node)
        self._last_step[run_id] = step

    def _finish(self, trial, status: str, mlflow_status: str, extra_tags: dict | None = None) -> None:
        run_id = self._child(trial)
        if run_id is None:
            return
        for k, v in {"status": status, **(extra_tags or {})}.items():
            self.client.set_tag(run_id, k, v)
        self.client.set_terminated(run_id, status=mlflow_status)

    def on_trial_complete(self, iteration, trials, trial, **info) -> None:
        last = trial.last_result or {}
        planned = trial_config(trial.config, self.base, self.baseline).epochs
        if last.get("diverged"):
            kind = "diverged"
        else:
            kind = "completed" if last.get("epoch", 0) >= planned else "early_stopped"
        mlflow_status = "FAILED" if kind == "diverged" else "FINISHED"
        tags = {"stopped_by": "asha"} if kind == "early_stopped" else {}
        self._safe("finish run", self._finish, trial, kind, mlflow_status, tags)

    def on_trial_error(self, iteration, trials, trial, **info) -> None:
        msg = ""
        if trial.error_file:
            with contextlib.suppress(OSError):
                msg = Path(trial.error_file).read_text().strip().splitlines()[-1][:500]
        self._safe("finish run", self._finish, trial, "error", "FAILED", {"error": msg} if msg else {})

    def on_trial_recover(self, iteration, trials, trial, **info) -> None:
        run_id = self._runs.get(trial.trial_id)
        if run_id:
            self._safe("tag retry", self.client.set_tag, run_id, "retries", str(trial.num_failures))

    def on_experiment_end(self, trials, **info) -> None:
        self.trial_statuses = {t.trial_id: t.status for t in trials}  # this Tuner's trials

    def close_orphans(self, interrupted: bool) -> None:
        """No run is left RUNNING: runs of trials that did not finish are closed as KILLED."""

        def close() -> None:
            if self.parent_id is None:
                return
            for run in self.client.search_runs(
                [self.experiment_id],
                f"tags.sweep = '{self.sweep}' and attributes.status = 'RUNNING'",
                max_results=10000,
            ):
                if run.info.run_id == self.parent_id and not interrupted:
                    continue  # the parent is closed by finish_parent, after the summary is logged
                self.client.set_tag(run.info.run_id, "status", "interrupted")
                self.client.set_terminated(run.info.run_id, status="KILLED")

        self._safe("close runs", close)

    def log_summary(self, best: dict | None, summary: dict, files: list[tuple[Path, str | None]]) -> None:
        """The best configuration (`best/*` params and scores), outcome counts and artifacts, on the parent."""
        from mlflow.entities import Metric, Param

        def write() -> None:
            if self.parent_id is None:
                return
            ts = int(time.time() * 1000)
            metrics = [Metric(f"trials/{k}", float(v), ts, 0) for k, v in summary["outcomes"].items()]
            params = []
            if best is not None:
                params = [Param(f"best/{k}", str(v)) for k, v in best["config"].items() if k != "tags"]
                params.append(Param("best/trial_id", best["trial_id"]))
                for k in ("val/acc", "test/acc"):
                    if finite(best.get(k)):
                        metrics.append(Metric(f"best/{k}", float(best[k]), ts, 0))
                conf = best.get("confirmation") or {}
                for k in ("test_mean", "test_std", "n"):
                    if k in conf:
                        metrics.append(Metric(f"best/confirm/{k}", float(conf[k]), ts, 0))
            if finite(summary.get("baseline_test_acc")):
                metrics.append(Metric("baseline/test/acc", float(summary["baseline_test_acc"]), ts, 0))
            existing = self.client.get_run(self.parent_id).data.params
            params = [p for p in params if p.key not in existing]  # params are write-once (resumed sweeps)
            self.client.log_batch(self.parent_id, metrics=metrics, params=params)
            self.log_files(files)

        self._safe("log sweep summary", write)

    def log_files(self, files: list[tuple[Path, str | None]]) -> None:
        for f, artifact_dir in files:
            self._safe(f"log artifact {f.name}", self.client.log_artifact, self.parent_id, str(f), artifact_dir)

    def close_parent(self) -> None:
        def close() -> None:
            if self.parent_id is not None:
                self.client.set_tag(self.parent_id, "status", "completed")
                self.client.set_terminated(self.parent_id, status="FINISHED")

        self._safe("close sweep run", close)


class ProgressCallback(tune.Callback):
    """One line per trial update and a sweep-level count, on stdout."""

    def __init__(self, total: int, max_epochs: int, base: TrainConfig, baseline: TrainConfig) -> None:
        self.total, self.max_epochs, self.base, self.baseline = total, max_epochs, base, baseline
        self.done = 0
        self.best = -math.inf
        self._counted = False
        self.started = time.monotonic()

    def on_step_begin(self, iteration, trials, **info) -> None:
        if not self._counted:  # a resumed sweep starts with its finished trials counted
            self.done = sum(t.status in FINISHED_STATUSES for t in trials)
            self._counted = True

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
