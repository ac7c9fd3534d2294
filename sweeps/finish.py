"""The end of a sweep: rank the trials, confirm the best with fresh seeds, print, save and log the outcome."""

from __future__ import annotations

import json
import math
import sys
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from cnnclf.config import TrainConfig
from sweeps.journal import SWEEP_KEY
from sweeps.runs import close_parent, describe_parent, log_summary
from sweeps.spec import (
    FAILED,
    METRIC,
    OUTCOMES,
    SEARCH_PARAMS,
    confirmation_stats,
    finite,
    outcome_of,
    ranked_by,
    reproduce_command,
)
from sweeps.spec import trial_config as config_of
from sweeps.store import ui_urls

SAMPLE_IMAGES = 32  # test images with the best model's predictions, for the report's grid


@dataclass
class Row:
    trial_id: str
    role: str
    outcome: str  # completed | early_stopped | diverged | oom | error
    cfg: TrainConfig
    val_acc: float | None
    test_acc: float | None
    epochs: int | None
    result: object  # ray.tune.Result
    confirm_of: str | None = None


def collect(results, base: TrainConfig, baseline: TrainConfig) -> list[Row]:
    rows = []
    for r in results:
        m = r.metrics or {}
        cfg = config_of(r.config, base, baseline)
        outcome = outcome_of(m, cfg.epochs, errored=r.error is not None)
        ok = outcome in ("completed", "early_stopped")
        rows.append(
            Row(
                trial_id=m.get("trial_id") or Path(str(r.path)).name.split("-")[-1],
                role=r.config.get("role", "trial"),
                outcome=outcome,
                cfg=cfg,
                val_acc=m.get(METRIC) if ok and finite(m.get(METRIC)) else None,
                test_acc=m.get("test/acc") if ok and finite(m.get("test/acc")) else None,
                epochs=m.get("epoch"),
                result=r,
                confirm_of=r.config.get("confirm_of"),
            )
        )
    return rows


def rank(rows: list[Row]) -> list[Row]:
    """Search trials by val/acc (sweeps.spec.ranked_by); the test set chooses nothing, it is only reported."""
    keyed = [(k, i, r) for i, r in enumerate(rows) if (k := ranked_by(r.role, r.outcome, r.val_acc)) is not None]
    return [r for _, _, r in sorted(keyed, key=lambda t: (t[0], t[1]))]


def confirm_configs(ranked: list[Row], top: int, seeds: int, seed: int) -> list[dict]:
    """Tune configs that retrain the top configurations with fresh seeds (role=confirm)."""
    configs = []
    for r in [r for r in ranked if r.outcome == "completed"][:top]:
        fields = {k: v for k, v in r.cfg.to_dict().items() if k not in ("task", "tags")}
        for i in range(seeds):
            configs.append({**fields, "seed": seed + 1000 * (i + 1), "role": "confirm", "confirm_of": r.trial_id})
    return configs


def confirmations(rows: list[Row]) -> dict[str, dict]:
    """trial_id -> n, mean and std of test/acc and val/acc over its confirm runs."""
    out: dict[str, dict] = {}
    for tid in sorted({r.confirm_of for r in rows if r.role == "confirm"}):
        runs = [r for r in rows if r.role == "confirm" and r.confirm_of == tid and r.outcome == "completed"]
        runs = [r for r in runs if r.test_acc is not None]
        if runs:
            out[tid] = confirmation_stats([r.test_acc for r in runs], [r.val_acc for r in runs])
    return out


def _std(x: float) -> str:
    return f"{x:.4f}" if finite(x) else "n/a (one run)"


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


def _fmt(r: Row) -> str:
    c = r.cfg
    hp = []
    for k in SEARCH_PARAMS:
        if (k == "momentum" and c.optimizer != "sgd") or (k == "amsgrad" and c.optimizer == "sgd"):
            continue
        v = getattr(c, k)
        hp.append(f"{k}={v:.3g}" if isinstance(v, float) else f"{k}={v}")
    va = f"{r.val_acc:.4f}" if r.val_acc is not None else "-"
    te = f"{r.test_acc:.4f}" if r.test_acc is not None else "-"
    model = "" if c.model == "cnn" else f" model={c.model}"
    return f"{r.trial_id:>10s} {r.role:8s} {va:>7s} {te:>8s} {r.epochs!s:>6s}  {' '.join(hp)}{model}"


def sample_predictions(checkpoint: Path, data, n: int = SAMPLE_IMAGES, seed: int = 0) -> dict:
    """The best model's predictions on n seeded-random test images (for the report's grid)."""
    import torch

    from cnnclf.data import Normalizer
    from cnnclf.train import load_model

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


@dataclass(frozen=True)
class Ending:
    """How a sweep ends: where its files go and what it tells MLflow."""

    out_dir: Path
    wait: float = 60.0  # seconds to wait for an unreachable MLflow server before leaving writes spooled
    register_model: str | None = None  # --register-model


def finish(rows: list[Row], statuses: dict, journal, data, end: Ending) -> dict:
    """Print the top 5, the baseline and the confirmations; save the best; log it all to the parent run."""
    ranked = rank(rows)
    base_row = next((r for r in rows if r.role == "baseline"), None)
    confirm = confirmations(rows)
    outcomes = {k: sum(r.outcome == k for r in rows if r.role != "confirm") for k in OUTCOMES}
    _print_table(ranked, base_row, outcomes, confirm)
    best, files = None, []
    if ranked:
        best, files = _save_best(ranked[0], base_row, confirm, journal.sweep, end.out_dir, data)
    summary = {
        "outcomes": outcomes,
        "failed": sum(r.outcome in FAILED for r in rows),  # confirmation runs too
        "data": {"files_skipped": data.manifest.get("files_skipped", 0)},
        "baseline_test_acc": base_row.test_acc if base_row else None,
        "confirmation": confirm,
    }
    summary_json = dump_json({**summary, "best": best, "trial_statuses": statuses}, end.out_dir / "summary.json")
    log_summary(journal, best, summary, [*files, (summary_json, None)])
    describe_parent(journal, best, summary)
    if best is not None and (end.out_dir / "best_model.pt", "best_model") in files:
        log_model(journal, end.out_dir / "best_model.pt", data, best["trial_id"], end.register_model)
    journal.append("meta", data={"finished": True})
    if journal.flush(timeout=end.wait):  # the report reads what was just logged
        write_report(journal, end.out_dir)
        print_model(journal, end.register_model)
        run, table, serve = ui_urls(journal.tracking_uri, journal.experiment_id, journal.run_ids[SWEEP_KEY])
        print(f"MLflow: this sweep {run}\nMLflow: all runs of {journal.experiment} {table}", flush=True)
        if serve:
            print(f"MLflow: to open them, run: {serve}", flush=True)
    else:
        print("the report is left for --sync: MLflow is unreachable", file=sys.stderr)
    close_parent(journal)
    return summary


def _print_table(ranked: list[Row], base_row: Row | None, outcomes: dict, confirm: dict) -> None:
    print(f"\n{'trial':>10s} {'role':8s} {'val/acc':>7s} {'test/acc':>8s} {'epochs':>6s}  config")
    for r in ranked[:5]:
        print(_fmt(r))
    if base_row is not None:
        print(_fmt(base_row))
    print("outcomes: " + ", ".join(f"{k} {v}" for k, v in outcomes.items()))
    for tid, st in confirm.items():
        print(
            f"confirmed {tid}: test/acc {st['test_mean']:.4f} ± {_std(st['test_std'])}, "
            f"val/acc {st['val_mean']:.4f} ± {_std(st['val_std'])} (n={st['n']} fresh seeds)"
        )


def _save_best(b: Row, base_row: Row | None, confirm: dict, sweep: str, out_dir: Path, data) -> tuple[dict, list]:
    """best_config.json, the best model and its eval artifacts; (best, [(file, artifact folder)])."""
    best = {
        "sweep": sweep,
        "trial_id": b.trial_id,
        "val/acc": b.val_acc,
        "test/acc": b.test_acc,
        "config": {k: v for k, v in b.cfg.to_dict().items() if k != "tags"},
        "command": reproduce_command(b.cfg),
        "baseline": {"val/acc": base_row.val_acc, "test/acc": base_row.test_acc} if base_row else None,
        "confirmation": confirm.get(b.trial_id),
    }
    files = [(dump_json(best, out_dir / "best_config.json"), None), *_best_artifacts(b, out_dir, data)]
    te = "-" if b.test_acc is None else f"{b.test_acc:.4f}"
    print(f"best: {b.trial_id} val/acc {b.val_acc:.4f} test/acc {te}; config in {out_dir / 'best_config.json'}")
    print(f"reproduce: {best['command']}")
    return best, files


def _best_artifacts(b: Row, out_dir: Path, data) -> list[tuple[Path, str | None]]:
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


def log_model(journal, checkpoint: Path, data, trial_id: str, register: str | None) -> None:
    """Journal the best checkpoint as an MLflow pyfunc model (sweeps/model.py) on the parent run, registered
    under `register` (--register-model) when given. best_model.pt stays an artifact of its own as well."""
    try:
        from sweeps import model

        op = model.journal_op(checkpoint, data.test_x, checkpoint.parent, journal.sweep, trial_id, register)
    except Exception as e:
        print(f"warning: the best model cannot be logged as an MLflow model: {type(e).__name__}: {e}", file=sys.stderr)
        return
    journal.append("model", "sweep", **op)


def print_model(journal, register: str | None) -> None:
    """Where the logged model is, once the journal has written it."""
    model_id = journal.logged_models.get("model")
    if model_id is None:
        return
    print(f"MLflow: the best model models:/{model_id} (mlflow.pyfunc.load_model; docs/tracking.md)", flush=True)
    if register in journal.registered:
        print(f"MLflow: registered as models:/{register}/{journal.registered[register]}", flush=True)


def write_report(journal, out_dir: Path) -> list[Path]:
    """Write the report (reports package) from MLflow, and journal its files onto the parent run."""
    try:
        from reports import build_report
    except ImportError:
        return []
    try:
        written = [Path(p) for p in build_report(journal.tracking_uri, journal.experiment, [journal.sweep], out_dir)]
    except Exception as e:
        print(f"warning: the report could not be written: {type(e).__name__}: {e}", file=sys.stderr)
        return []
    print(f"report: {written[0]}")
    for p in written:
        journal.append("artifact", "sweep", path=str(p.resolve()), dir="report")
    return written
