"""`--sync --name N`: what sweep N spooled while MLflow was unreachable, written to MLflow, then its report
(the sweep script's `--sync`; the journal's writer, sweeps/journal.py, does the writing).
"""

from __future__ import annotations

import argparse
import sys

from cnnclf.args import UsageError
from sweeps import store
from sweeps.guard import hold_lock, tracking
from sweeps.journal import Journal, read_meta
from sweeps.saving import ReportWriter, write_report
from sweeps.session import quiet_mlflow_http
from sweeps.settings import EXIT_FAILED, EXIT_OK
from sweeps.spec import TaskSpec


def sync(spec: TaskSpec, args: argparse.Namespace, report: ReportWriter | None) -> int:
    """`--sync --name N`: write what sweep N spooled while MLflow was unreachable, then its report."""
    folder = args.out / args.name / "journal"
    if not (folder / "ops.jsonl").exists():
        raise UsageError(f"argument --name: no journal of a sweep {args.name!r} under {args.out}")
    hold_lock(args.out / args.name / "driver.lock", args.name)  # not while the sweep itself still writes
    meta = read_meta(folder)
    uri = args.tracking_uri or meta.get("tracking_uri") or store.DEFAULT_URI
    tracking("check", uri)
    tracking("prepare", uri)
    quiet_mlflow_http()
    journal = Journal(folder, uri, meta.get("experiment", args.experiment), args.name)
    todo = journal.pending()
    journal.start()
    left = journal.close(timeout=max(args.mlflow_wait, 1.0))
    print(f"{args.name}: wrote {todo - left} of {todo} spooled MLflow writes to {uri}", flush=True)
    if left:
        print(f"{spec.task} sweep: error: {left} MLflow writes are still spooled in {folder}", file=sys.stderr)
        return EXIT_FAILED
    if meta.get("finished") and not (args.out / args.name / "report.html").exists():
        journal = Journal(folder, uri, meta.get("experiment", args.experiment), args.name)
        journal.start()
        write_report(journal, args.out / args.name, report)
        if journal.close(timeout=max(args.mlflow_wait, 1.0)):
            return EXIT_FAILED
    return EXIT_OK
