"""The end of a sweep: rank the trials, confirm the best with fresh seeds, print, save and log the outcome.

The rows, the console and the saved files are sweeps/rows.py, sweeps/console.py and sweeps/saving.py."""

from __future__ import annotations

import sys
from dataclasses import dataclass
from pathlib import Path

from sweeps.console import print_answer, print_model, print_table
from sweeps.journal import SWEEP_KEY
from sweeps.rows import (
    Row,
    collect,  # noqa: F401 (imported from here, as before the split)
    rank,
)
from sweeps.runs import close_parent, describe_parent, log_summary
from sweeps.saving import (
    ReportWriter,
    best_artifacts,
    dump_json,
    log_model,
    recommendation,
    sample_predictions,  # noqa: F401 (imported from here, as before the split)
    write_report,
)
from sweeps.spec import (
    FAILED,
    OUTCOMES,
    Answer,
    answer,
    reproduce_command,  # noqa: F401 (imported from here, as before the split)
)
from sweeps.store import ui_urls


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
    print_table(ranked, base_row, outcomes)
    best, files = None, []
    if ans is not None:
        best = recommendation(ans, {r.trial_id: r for r in rows}, journal, data, confirm)
        print_answer(ans, best)
        files = [(dump_json(best, end.out_dir / "best_config.json"), None)]
        files += best_artifacts(next(r for r in rows if r.trial_id == ans.model.trial_id), end.out_dir, data)
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
