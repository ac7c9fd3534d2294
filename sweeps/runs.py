"""The runs in MLflow apart from Tune's events: the sweep's parent run (opened, summarized, described,
closed), the experiment's and runs' descriptions, provenance and datasets. All through the journal.

The driver and `finish` call these around the Tuners' fits; the MLflow callback (sweeps/callbacks.py)
uses the descriptions and datasets for the trials' runs.
"""

from __future__ import annotations

import contextlib
import getpass
import json
import subprocess
import sys
from pathlib import Path

from mlflow.tracking import MlflowClient

from cnnclf.config import TrainConfig
from sweeps.journal import SWEEP_KEY, Journal, now_ms
from sweeps.spec import DOCUMENTED, SWEEP_PARAM_PREFIX, TASKS, finite, only_finite

# --- the parent run: written by the driver around the Tuners' fits ------------------------------


def open_parent(journal: Journal, sweep_params: dict) -> None:
    """The sweep's parent run: created once, reopened by --resume; starts the journal's writer."""
    if journal.has_run(SWEEP_KEY):
        journal.append("status", SWEEP_KEY, status="RUNNING", ts=now_ms())
        journal.append("log", SWEEP_KEY, tags=[["status", "running"]])
    else:
        task = journal.meta.get("task", "")
        doc = DOCUMENTED.get(task)
        about = f"{TASKS.get(task, task)}. Documented baseline: {doc.test_acc:.0%} test accuracy, {doc.what}."
        about = about if doc else ""
        # Model training, not GenAI: MLflow 3's UI then opens the experiment on its runs table.
        kind = {"mlflow.experimentKind": "custom_model_development"}
        journal.append("experiment_tags", tags=kind | ({NOTE: about} if about else {}))
        tags = {"sweep": journal.sweep, "role": "sweep", "status": "running", **journal.meta.get("provenance", {})}
        tags[NOTE] = f"Sweep {journal.sweep} of {task}: running. {about}"
        if journal.meta.get("command"):
            tags["command"] = journal.meta["command"]
        if journal.meta.get("data_digest"):  # cnnclf.data.data_digest: the images every run here saw
            tags["data.digest"] = journal.meta["data_digest"]
        tags |= {f"data.{k}_n": str(n) for k, n in (journal.meta.get("data_n") or {}).items()}  # images per split
        if journal.meta.get("budget_text"):  # --budget-by, the cost guard's limit and where it came from
            tags["budget"] = journal.meta["budget_text"]
        warm = journal.meta.get("warm_start")
        if warm:  # which sweeps its sampler learned from (the trials: warm_start.json)
            tags |= {"warm_start.sources": ",".join(warm["sources"]), "warm_start.trials": str(warm["trials"])}
        params = {f"{SWEEP_PARAM_PREFIX}{k}": str(v) for k, v in sweep_params.items()}
        journal.append("create_run", SWEEP_KEY, name=journal.sweep, ts=now_ms(), tags=tags, params=params)
        log_datasets(journal, SWEEP_KEY)
        if warm:
            log_files(journal, [(Path(warm["file"]), None)])
    journal.start()


NOTE = "mlflow.note.content"  # a run's or experiment's description in MLflow's UI


def config_line(cfg: TrainConfig) -> str:
    """A trial's configuration in one line, hyperparameters first (momentum only for SGD, amsgrad only for Adam)."""
    parts = [cfg.model, cfg.optimizer, f"lr {cfg.lr:.3g}"]
    parts += [f"momentum {cfg.momentum:.3g}"] if cfg.optimizer == "sgd" else (["amsgrad"] if cfg.amsgrad else [])
    parts += [f"wd {cfg.weight_decay:.2g}", f"batch {cfg.batch_size}"]
    if cfg.model != "tutorial":
        parts += [f"depth {cfg.depth}", f"width {cfg.width}", f"k{cfg.kernel_size}"]
    return ", ".join(parts) + f"; {epochs_text(cfg.epochs)} at {cfg.image_size}px, seed {cfg.seed}"


def epochs_text(n: int) -> str:
    return f"{n} epoch" + ("" if n == 1 else "s")


def provenance() -> dict:
    """MLflow's provenance tags for runs this driver creates: who, which script, which commit."""

    tags = {"mlflow.user": getpass.getuser(), "mlflow.source.name": sys.argv[0], "mlflow.source.type": "LOCAL"}
    root = Path(__file__).resolve().parents[1]
    try:
        out = subprocess.run(["git", "-C", str(root), "rev-parse", "HEAD"], capture_output=True, text=True, timeout=5)
        if out.returncode == 0 and out.stdout.strip():
            tags["mlflow.source.git.commit"] = out.stdout.strip()
    except (OSError, subprocess.SubprocessError):
        pass  # not a git checkout, or no git: the commit is left out
    return tags


def datasets(manifest: dict, task: str) -> list[dict]:
    """The data as MLflow datasets, one per split (context train, val or test): the split's file-list
    digest, its size, the layout and what was skipped, as the run's Datasets column shows them."""

    out = []
    for split, info in (manifest.get("splits") or {}).items():
        profile = {"num_images": info["n"], "per_class": info.get("per_class"), "layout": manifest.get("layout")}
        profile |= {"files_skipped": manifest.get("files_skipped", 0), "image_size": manifest.get("image_size")}
        source = json.dumps({"path": manifest.get("root", ""), "manifest": manifest.get("manifest_path")})
        out.append(
            {"name": task, "digest": info["sha256"], "source_type": "local", "source": source}
            | {"profile": json.dumps(profile), "context": split}
        )
    return out


def log_datasets(journal: Journal, key: str) -> None:
    if journal.meta.get("datasets"):
        journal.append("inputs", key, datasets=journal.meta["datasets"])


def close_orphans(journal: Journal, interrupted: bool) -> int:
    """No run is left RUNNING: runs of trials that did not finish are closed as KILLED."""
    orphans = journal.open_trials()
    for t in orphans:
        journal.append("log", t.key, tags=[["status", "interrupted"]])
        journal.append("status", t.key, status="KILLED", ts=now_ms())
    if interrupted and journal.has_run(SWEEP_KEY):
        journal.append("log", SWEEP_KEY, tags=[["status", "interrupted"]])
        journal.append("status", SWEEP_KEY, status="KILLED", ts=now_ms())
    return len(orphans)


def close_directly(journal: Journal) -> None:
    """No run left RUNNING when the journal itself cannot write (its disk full or read-only): what it holds is
    written first, then the runs still open are closed as KILLED straight through MLflow, whose store may
    live elsewhere. A resume reopens them (sweeps/resume.py)."""

    journal.flush(timeout=10.0)
    client = MlflowClient(tracking_uri=journal.tracking_uri)
    for key in [*(t.key for t in journal.open_trials()), SWEEP_KEY]:
        run_id = journal.run_ids.get(key)
        if run_id is None:
            continue
        with contextlib.suppress(Exception):  # MLflow's own disk may be the full one: nothing more to do then
            client.set_tag(run_id, "status", "interrupted")
            client.set_terminated(run_id, status="KILLED", end_time=now_ms())


def log_summary(journal: Journal, best: dict | None, summary: dict, files: list[tuple[Path, str | None]]) -> None:
    """The best trial (`best.*` tags, `best/*` scores), outcome counts and artifacts, on the parent."""

    ts = now_ms()
    metrics = {f"trials/{k}": v for k, v in summary["outcomes"].items()}
    tags = []
    if best is not None:  # tags, not params: a resumed sweep may find a new best; best_config.json has it all
        config = {k: v for k, v in best["config"].items() if k != "tags"}
        tags = [["best.trial_id", best["trial_id"]], ["best.config", json.dumps(config)]]
        tags += [["best.selected_by", best["selected_by"]], ["best.model_run", best["model"]["run"]]]
        tags += [["best.flag", best["flag"]]] if best.get("flag") else []
        metrics |= {f"best/{k}": best.get(k) for k in ("val/acc", "test/acc")}  # the confirmed means, if confirmed
        lo, hi = best["test"]["ci95"]
        metrics |= {"best/test/acc_ci95_lo": lo, "best/test/acc_ci95_hi": hi}
        conf = best.get("confirmation") or {}
        metrics |= {f"best/confirm/{k}": conf.get(k) for k in ("test_mean", "test_std", "n")}
    metrics["baseline/test/acc"] = summary.get("baseline_test_acc")
    metrics |= {f"data/{k}": v for k, v in (summary.get("data") or {}).items()}
    rows = [[k, float(v), ts, 0] for k, v in only_finite(metrics).items()]  # a one-run std (NaN) is not logged
    journal.append("log", SWEEP_KEY, metrics=rows, tags=tags)
    log_files(journal, files)


def describe_parent(journal: Journal, best: dict | None, summary: dict) -> str:
    """The parent run's description: the sweep's answer, as the report's headline gives it."""
    task = journal.meta.get("task", "")
    n = f"{sum(summary['outcomes'].values())} runs (search trials and the seed baseline)"
    if best is None:
        note = f"Sweep {journal.sweep} of {task}: {n}; none finished with a val/acc."
    else:
        line = config_line(TrainConfig.from_dict({k: v for k, v in best["config"].items() if k != "tags"}))
        note = f"Sweep {journal.sweep} of {task}, {n}. Recommended: trial {best['trial_id']} ({line}), {best['why']}."
        note += f" Test accuracy {best['test']['text']}."
        if best.get("flag"):
            note += f" Warning: {best['flag']}."
        if best.get("runner_up"):
            note += f" Versus runner-up {best['runner_up']['trial_id']}: {best['runner_up']['difference']['text']}."
        if (b := best.get("baseline")) and b.get("difference"):
            note += f" Versus the baseline re-measured here ({b['test']['text']}): {b['difference']['text']}."
        doc = best.get("documented")
        if doc and finite(best.get("test/acc")):
            other = f", with another budget ({', '.join(doc['budget_differs'])})" if doc["budget_differs"] else ""
            note += f" {100 * (best['test/acc'] - doc['test/acc']):+.2f} pts vs the documented {doc['test/acc']:.0%}"
            note += f"{other}."
        note += f" The model logged here is {best['model']['source']}."
        warm = journal.meta.get("warm_start")
        if warm:
            note += f" Learned from {', '.join(warm['sources'])} ({warm['trials']} prior trials, not ranked here)."
    journal.append("log", SWEEP_KEY, tags=[[NOTE, note]])
    return note


def log_files(journal: Journal, files: list[tuple[Path, str | None]]) -> None:
    for f, artifact_dir in files:
        journal.append("artifact", SWEEP_KEY, path=str(Path(f).resolve()), dir=artifact_dir)


def close_parent(journal: Journal, status: str = "completed") -> None:
    journal.append("log", SWEEP_KEY, tags=[["status", status]])
    journal.append("status", SWEEP_KEY, status="FINISHED", ts=now_ms())
