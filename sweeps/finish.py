"""The end of a sweep: rank the trials, confirm the best with fresh seeds, print, save and log the outcome."""

from __future__ import annotations

import json
import math
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from cnnclf.config import TrainConfig
from cnnclf.data import Normalizer
from cnnclf.train import load_model
from sweeps import logged_model
from sweeps.journal import SWEEP_KEY
from sweeps.runs import close_parent, describe_parent, log_summary
from sweeps.spec import (
    DOCUMENTED,
    FAILED,
    METRIC,
    OUTCOMES,
    SEARCH_PARAMS,
    Answer,
    Run,
    answer,
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

    @property
    def metrics(self) -> dict:
        return getattr(self.result, "metrics", None) or {}

    def error_line(self) -> str:
        """What it failed with, in one line (its recorded error, or the exception Tune kept)."""
        error = self.metrics.get("error") or getattr(self.result, "error", None) or ""
        text = f"{type(error).__name__}: {error}" if isinstance(error, BaseException) else str(error)
        return " ".join(text.split())[:300]

    def as_run(self) -> Run:
        """What sweeps.spec.answer needs of this row (its val/acc and test/acc as collected)."""
        m = {**self.metrics, METRIC: self.val_acc, "test/acc": self.test_acc}
        return Run.of(self.trial_id, self.role, self.outcome, m, confirm_of=self.confirm_of, seed=self.cfg.seed)


def started_config(path: object) -> dict:
    """A trial's config from its folder's params.json, for a result without one (its worker died while the
    trial's actor started); {} when that is missing too: the row is then a search trial of the base config."""
    try:
        return dict(json.loads((Path(str(path)) / "params.json").read_text()))
    except (OSError, ValueError, TypeError):
        return {}


def collect(results, base: TrainConfig, baseline: TrainConfig) -> list[Row]:
    rows = []
    for r in results:
        m = r.metrics or {}
        config = r.config if r.config is not None else started_config(r.path)
        cfg = config_of(config, base, baseline)
        outcome = outcome_of(m, cfg.epochs, errored=r.error)
        ok = outcome in ("completed", "early_stopped")
        rows.append(
            Row(
                trial_id=m.get("trial_id") or Path(str(r.path)).name.split("-")[-1],
                role=config.get("role", "trial"),
                outcome=outcome,
                cfg=cfg,
                val_acc=m.get(METRIC) if ok and finite(m.get(METRIC)) else None,
                test_acc=m.get("test/acc") if ok and finite(m.get("test/acc")) else None,
                epochs=m.get("epoch"),
                result=r,
                confirm_of=config.get("confirm_of"),
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
        fields["split_seed"] = r.cfg.data_seed  # the same data and splits; only training's randomness is new
        for i in range(seeds):
            configs.append({**fields, "seed": seed + 1000 * (i + 1), "role": "confirm", "confirm_of": r.trial_id})
    return configs


def confirmations(ans: Answer | None) -> dict[str, dict]:
    """trial_id -> its confirmation: n, mean, std and 95% interval of test/acc, mean and std of val/acc,
    in the order the answer ranks them (best mean val/acc first)."""
    out: dict[str, dict] = {}
    for c in ans.ranking if ans else ():
        out[c.trial.trial_id] = {
            "n": c.test.n,
            "test_mean": c.test.mean,
            "test_std": c.test.std,
            "test_ci95": [c.test.lo, c.test.hi],
            "val_mean": c.val.mean,
            "val_std": c.val.std,
            "failed": c.failed,
            "flag": c.flag,
        }
    return out


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


# (tracking URI, experiment, sweep names, out folder) -> the files written (report.md first, then report.html)
ReportWriter = Callable[[str, str, list[str], Path], list]


@dataclass(frozen=True)
class Ending:
    """How a sweep ends: where its files go and what it tells MLflow."""

    out_dir: Path
    wait: float = 60.0  # seconds to wait for an unreachable MLflow server before leaving writes spooled
    register_model: str | None = None  # --register-model
    report: ReportWriter | None = None  # writes report.md/html (None: no report)


def finish(rows: list[Row], statuses: dict, journal, data, end: Ending) -> dict:
    """Print the top 5, the baseline, the confirmations and the answer; save the recommended configuration
    and its model; log it all to the parent run."""
    ranked = rank(rows)
    base_row = next((r for r in rows if r.role == "baseline"), None)
    ans = answer([r.as_run() for r in rows])
    confirm = confirmations(ans)
    outcomes = {k: sum(r.outcome == k for r in rows if r.role != "confirm") for k in OUTCOMES}
    _print_table(ranked, base_row, outcomes)
    best, files = None, []
    if ans is not None:
        best = recommendation(ans, {r.trial_id: r for r in rows}, journal, data, confirm)
        _print_answer(ans, best)
        files = [(dump_json(best, end.out_dir / "best_config.json"), None)]
        files += _best_artifacts(next(r for r in rows if r.trial_id == ans.model.trial_id), end.out_dir, data)
        print(f"config: {end.out_dir / 'best_config.json'}")
    summary = {
        "outcomes": outcomes,
        "failed": sum(r.outcome in FAILED for r in rows),  # confirmation runs too
        "failures": [[r.trial_id, r.outcome, r.error_line()] for r in rows if r.outcome in FAILED],
        "data": {"files_skipped": data.manifest.get("files_skipped", 0)},
        "baseline_test_acc": base_row.test_acc if base_row else None,
        "confirmation": confirm,
    }
    summary_json = dump_json({**summary, "best": best, "trial_statuses": statuses}, end.out_dir / "summary.json")
    log_summary(journal, best, summary, [*files, (summary_json, None)])
    describe_parent(journal, best, summary)
    if best is not None and (end.out_dir / "best_model.pt", "best_model") in files:
        source = best["model"]["source"]
        log_model(journal, end.out_dir / "best_model.pt", data, best["trial_id"], end.register_model, source)
    journal.append("meta", data={"finished": True})
    if journal.flush(timeout=end.wait):  # the report reads what was just logged
        write_report(journal, end.out_dir, end.report)
        print_model(journal, end.register_model)
        run, table, serve = ui_urls(journal.tracking_uri, journal.experiment_id, journal.run_ids[SWEEP_KEY])
        print(f"MLflow: this sweep {run}\nMLflow: all runs of {journal.experiment} {table}", flush=True)
        if serve:
            print(f"MLflow: to open them, run: {serve}", flush=True)
    else:
        print("the report is left for --sync: MLflow is unreachable", file=sys.stderr)
    close_parent(journal)
    return summary


def _print_table(ranked: list[Row], base_row: Row | None, outcomes: dict) -> None:
    print(f"\n{'trial':>10s} {'role':8s} {'val/acc':>7s} {'test/acc':>8s} {'epochs':>6s}  config")
    for r in ranked[:5]:
        print(_fmt(r))
    if base_row is not None:
        print(_fmt(base_row))
    print("outcomes: " + ", ".join(f"{k} {v}" for k, v in outcomes.items()))


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


def _print_answer(ans: Answer, best: dict) -> None:
    """The answer on the console: the confirmations, then the recommended configuration and its evidence."""
    for c in ans.ranking:
        flag = f"  [{c.flag}]" if c.flag else ""
        print(f"confirmed {c.trial.trial_id}: test/acc {c.test.text()}; val/acc {c.val.text()}{flag}")
    if ans.reordered:
        print(
            f"confirmation reordered the search: {ans.trial.trial_id} (search #{ans.search_rank}) has the best mean "
            f"val/acc over fresh seeds, not the search's best {ans.search_top.trial_id}"
        )
    print(f"recommended: {ans.trial.trial_id}, {best['why']}")
    print(f"  test/acc {ans.test.text()}")
    if ans.flag:
        print(f"  warning: {ans.flag}")
    if best["runner_up"]:
        print(f"  vs runner-up {best['runner_up']['trial_id']}: {best['runner_up']['difference']['text']}")
    if best["baseline"] and best["baseline"]["difference"]:
        b = best["baseline"]
        print(f"  vs the baseline re-measured here ({b['test']['text']}): {b['difference']['text']}")
    doc = best["documented"]
    if doc and finite(ans.test.mean):
        differs = doc["budget_differs"]
        budget = f" (another budget: {', '.join(differs)})" if differs else " (the same budget)"
        print(f"  vs the documented {doc['test/acc']:.0%}{budget}: {100 * (ans.test.mean - doc['test/acc']):+.2f} pts")
    given = best["command_gives"]["test/acc"]
    gives = f"{given:.2%}" if finite(given) else "-"
    print(f"reproduce: {best['command']}\n  (its search trial {ans.trial.trial_id}; it gave test/acc {gives}", end="")
    threads = best["command_threads"]
    print(f"; exactly with OMP_NUM_THREADS={threads}, its CPU threads)" if threads else ")")
    print(f"model: {best['model']['source']}")


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


def log_model(journal, checkpoint: Path, data, trial_id: str, register: str | None, source: str = "") -> None:
    """Journal the best checkpoint as an MLflow pyfunc model (sweeps/model.py) on the parent run, registered
    under `register` (--register-model) when given. best_model.pt stays an artifact of its own as well."""
    try:
        where = (checkpoint, data.test_x, checkpoint.parent)
        op = logged_model.journal_op(*where, journal.sweep, trial_id, register, source)
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
