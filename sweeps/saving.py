"""What the end of a sweep saves: best_config.json (`recommendation`), the best model's checkpoint with its
confusion matrix and sample predictions, the model op for MLflow, and the report."""

from __future__ import annotations

import json
import math
import sys
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch

from cnnclf.data import Normalizer
from cnnclf.train import load_model
from sweeps import logged_model
from sweeps.rows import Row
from sweeps.spec import DOCUMENTED, Answer, finite, reproduce_command

SAMPLE_IMAGES = 32  # test images with the best model's predictions, for the report's grid

# (tracking URI, experiment, sweep names, out folder) -> the files written (report.md first, then report.html)
ReportWriter = Callable[[str, str, list[str], Path], list]


def dump_json(obj, path: Path) -> Path:
    """JSON with NaN (a one-run std) written as null."""

    def plain(o):
        if isinstance(o, float) and not math.isfinite(o):
            return None
        if isinstance(o, dict):
            return {k: plain(v) for k, v in o.items()}
        if isinstance(o, list | tuple):
            return [plain(v) for v in o]
        return o

    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(plain(obj), indent=1, default=str))
    return path


def sample_predictions(checkpoint: Path, data, n: int = SAMPLE_IMAGES, seed: int = 0) -> dict:
    """The best model's predictions on n seeded-random test images (for the report's grid)."""

    model, _, meta = load_model(checkpoint, "cpu")
    g = torch.Generator().manual_seed(seed)
    idx = torch.randperm(len(data.test_y), generator=g)[:n]
    images = data.test_x[idx]
    with torch.no_grad():
        probs = torch.softmax(model(Normalizer(meta["mean"], meta["std"], torch.device("cpu"))(images)), dim=1)
    return {
        "images": images.numpy(),
        "labels": data.test_y[idx].numpy(),
        "preds": probs.argmax(1).numpy(),
        "probs": probs.max(1).values.numpy(),
        "classes": np.array(data.classes),
    }


def _estimate(e) -> dict:
    return {"mean": e.mean, "std": e.std, "n": e.n, "ci95": [e.lo, e.hi], "text": e.text()}


def _difference(d) -> dict | None:
    if d is None:
        return None
    return {"diff": d.diff, "ci95": [d.lo, d.hi], "p": d.p, "beyond_noise": d.beyond_noise, "text": d.text()}


def recommendation(ans: Answer, rows: dict[str, Row], journal, data, confirm: dict) -> dict:
    """best_config.json: the recommended configuration, how it was chosen, how sure it is, the command that
    reproduces its search trial, which run the saved model is, and the data it was all measured on."""
    trial, model = rows[ans.trial.trial_id], rows[ans.model.trial_id]
    doc = DOCUMENTED.get(trial.cfg.task)
    splits = data.manifest.get("splits") or {}
    n_train = (splits.get("train") or {}).get("n")
    if ans.confirmed:
        c = ans.confirmed
        how = f"confirmed: the highest mean val/acc over {c.val.n} fresh seed{'s' if c.val.n != 1 else ''}"
        how += f" (the search ranked it #{ans.search_rank})" if ans.search_rank > 1 else " (also the search's best)"
    else:
        how = "unconfirmed: the best search trial by val/acc, one run (--confirm 0, or no confirmation run completed)"
    model_source = "its search trial" if model.role == "trial" else f"confirmation run {model.trial_id}"
    model_source += f" (seed {model.cfg.seed}, val/acc {model.val_acc:.2%}, the best of its runs)"
    return {
        "sweep": journal.sweep,
        "trial_id": trial.trial_id,
        "selected_by": "confirmation" if ans.confirmed else "search",
        "why": how,
        "val/acc": ans.val.mean,
        "test/acc": ans.test.mean,
        "test": _estimate(ans.test),
        "flag": ans.flag,
        "search_trial": {"rank": ans.search_rank, "val/acc": trial.val_acc, "test/acc": trial.test_acc},
        "search_top": ans.search_top.trial_id,
        "config": {k: v for k, v in trial.cfg.to_dict().items() if k != "tags"},
        "command": reproduce_command(trial.cfg),
        "command_gives": {"run": trial.trial_id, "test/acc": trial.test_acc, "val/acc": trial.val_acc},
        "command_threads": _cpu_threads(trial),
        "model": {
            "run": model.trial_id,
            "source": model_source,
            "val/acc": model.val_acc,
            "test/acc": model.test_acc,
            "command": reproduce_command(model.cfg),
        },
        "data": {"digest": data.manifest.get("digest"), "images": {k: v.get("n") for k, v in splits.items()}},
        "baseline": (
            {"trial_id": ans.baseline.trial_id, "val/acc": ans.baseline.val, "test/acc": ans.baseline.test}
            | {"test": _estimate(ans.baseline.test_estimate()), "difference": _difference(ans.vs_baseline())}
            if ans.baseline
            else None
        ),
        "runner_up": (
            {"trial_id": ans.runner_up.trial.trial_id, "test": _estimate(ans.runner_up.test)}
            | {"difference": _difference(ans.vs_runner_up())}
            if ans.runner_up
            else None
        ),
        "documented": (
            {
                "test/acc": doc.test_acc,
                "budget_differs": doc.budget_differences(trial.cfg.epochs, n_train, trial.cfg.image_size),
            }
            if doc
            else None
        ),
        "confirmation": confirm.get(trial.trial_id),  # confirmations(ans), computed once by finish
    }


def _cpu_threads(row: Row) -> int | None:
    """The CPU threads a trial trained with, when it had no GPU: float sums on the CPU depend on the
    thread count, so a rerun with another count lands near, not exactly on, its accuracy (docs/sweeps.md)."""
    cpu, gpu = row.metrics.get("resources/cpu"), row.metrics.get("resources/gpu")
    return max(1, int(cpu)) if finite(cpu) and not (finite(gpu) and gpu > 0) else None


def best_artifacts(b: Row, out_dir: Path, data) -> list[tuple[Path, str | None]]:
    """The best checkpoint, its confusion matrix and sample predictions, for the parent run and the report."""
    files: list[tuple[Path, str | None]] = []
    try:
        ckpt = b.result.checkpoint
        if ckpt is None:
            return files
        with ckpt.as_directory() as d:
            dst = out_dir / "best_model.pt"
            dst.write_bytes((Path(d) / "checkpoint.pt").read_bytes())
        files.append((dst, "best_model"))
        confusion = (b.result.metrics or {}).get("test/confusion")
        if confusion is not None:
            payload = {"trial_id": b.trial_id, "classes": data.classes, "matrix": confusion}
            files.append((dump_json(payload, out_dir / "eval" / "confusion.json"), "eval"))
        samples = sample_predictions(dst, data)
        (out_dir / "eval").mkdir(parents=True, exist_ok=True)
        np.savez_compressed(out_dir / "eval" / "samples.npz", **samples)
        files.append((out_dir / "eval" / "samples.npz", "eval"))
    except Exception as e:
        print(f"warning: could not save the best model's artifacts: {type(e).__name__}: {e}", file=sys.stderr)
    return files


def log_model(journal, checkpoint: Path, data, trial_id: str, register: str | None, source: str = "") -> None:
    """Journal the best checkpoint as an MLflow pyfunc model (sweeps/model.py) on the parent run, registered
    under `register` (--register-model) when given. best_model.pt stays an artifact of its own as well."""
    try:
        op = logged_model.journal_op(checkpoint, data.test_x, journal.sweep, trial_id, register, source)
    except Exception as e:
        print(f"warning: the best model cannot be logged as an MLflow model: {type(e).__name__}: {e}", file=sys.stderr)
        return
    journal.append("model", "sweep", **op)


def write_report(journal, out_dir: Path, report: ReportWriter | None) -> list[Path]:
    """Write the report with `report` (the task scripts hand in `reports.write`: no sweeps module imports
    reports) from MLflow, and journal its files onto the parent run. A failure is said in one line."""
    if report is None:
        return []
    try:
        written = [Path(p) for p in report(journal.tracking_uri, journal.experiment, [journal.sweep], out_dir)]
    except Exception as e:
        print(f"warning: the report could not be written: {type(e).__name__}: {e}", file=sys.stderr)
        return []
    print(f"report: {written[0]}\nreport: {written[1]} (open in a browser)")
    for p in written:
        journal.append("artifact", "sweep", path=str(p.resolve()), dir="report")
    return written
