"""The sweep report, from MLflow: report.md, a self-contained report.html, PNG plots and trials.csv.

    python -m reports                                         # newest sweep of cifar10 and of catdog
    python -m reports --experiment cifar10 --sweep all        # every cifar10 sweep, side by side
    python -m reports --sweep cifar10-20250101-120000 --out /tmp/reports

One sweep goes to OUT/<sweep>/, several sweeps of one experiment to OUT/<experiment>-compare/. A sweep
name read back from the store is checked as --sweep is: one that is a path (`../x`) is left out, with a
warning line naming it. Exit codes: 0 written; 2 unknown or empty experiment, unknown sweep, unreachable
tracking store or bad arguments (one line on stderr, and nothing written: not to --out, not to the store);
1 anything else.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

from cnnclf.args import Parser, UsageError, one_line
from cnnclf.args import path as path_arg
from cnnclf.config import name_error
from sweeps.store import DEFAULT_URI, missing_artifacts

DEFAULT_EXPERIMENTS = ("cifar10", "catdog")
EXIT_OK, EXIT_USAGE = 0, 2  # anything else (a bug, a corrupt store) exits 1 with a traceback


def build_parser() -> argparse.ArgumentParser:
    p = Parser(
        prog="python -m reports",
        description="Compare sweeps' trials from MLflow against the documented baselines.",
        epilog=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--tracking-uri", default=DEFAULT_URI, help="MLflow store the sweeps wrote to")
    p.add_argument(
        "--experiment", nargs="+", default=None, help="experiments (default: cifar10 and catdog, those that exist)"
    )
    p.add_argument("--sweep", nargs="+", default=None, help="sweep names, or `all` (default: the newest of each)")
    p.add_argument("--out", type=path_arg, default=Path("reports/out"), help="reports go to OUT/<sweep>/")
    return p


def main(argv: list[str] | None = None) -> int:
    try:
        return _main(build_parser().parse_args(sys.argv[1:] if argv is None else argv))
    except UsageError as e:  # ReportError too: unusable input
        print(f"reports: error: {one_line(e)}", file=sys.stderr)
        return EXIT_USAGE


def check_args(args: argparse.Namespace) -> None:
    """What can be checked before MLflow opens the store: --sweep, --out, and the store itself."""
    from reports.data import ReportError, check_store

    for n in args.sweep or ():
        if n != "all" and (why := name_error(n)):
            raise ReportError(f"--sweep: {why}")
    out = args.out
    existing = next(p for p in (out, *out.parents) if p.exists() or p == p.parent)
    if existing.exists() and not existing.is_dir():
        raise ReportError(f"--out: {existing} is a file, not a folder")
    if existing.exists() and not os.access(existing, os.W_OK):
        raise ReportError(f"--out: {existing} is not writable")
    # Reading must create nothing: MLflow would make an empty file, a foreign one or a missing path a
    # store of its own (sweeps.store.check with write=False refuses each).
    check_store(args.tracking_uri)


def _main(args: argparse.Namespace) -> int:
    from reports.data import ReportError, client, experiment_id, list_sweeps, resolve_sweeps

    check_args(args)
    uri = args.tracking_uri
    explicit = args.experiment is not None
    experiments = list(dict.fromkeys(args.experiment or DEFAULT_EXPERIMENTS))
    try:
        c = client(uri)
    except ReportError:
        raise
    except Exception as e:  # an unknown scheme, a database MLflow cannot open: unusable input, not a bug
        first = next((line for line in str(e).splitlines() if line.strip()), type(e).__name__)
        raise ReportError(f"--tracking-uri: cannot open {uri}: {first.strip()}") from None
    known, refused = {}, []
    for exp in experiments:
        if experiment_id(c, exp, uri) is None:
            if explicit:
                raise ReportError(f"--experiment: no experiment {exp!r} in {uri}")
            continue
        bad: list[tuple[str, str]] = []  # names from the store that are not sweep names (paths): never reported
        sweeps = list_sweeps(uri, exp, bad)
        refused += [(exp, name, why) for name, why in bad]
        if sweeps.empty:
            if explicit and not bad:
                raise ReportError(f"--experiment: experiment {exp!r} has no sweeps")
            if not bad:
                print(f"reports: experiment {exp!r} has no sweeps; skipped", file=sys.stderr)
            continue
        known[exp] = sweeps
    if not known and refused:
        exp, _, why = refused[0]
        more = f" (and {len(refused) - 1} more)" if len(refused) > 1 else ""
        raise ReportError(f"--sweep: experiment {exp!r} has no sweep a report can be written for: {why}{more}")
    if not known:
        raise ReportError(f"--experiment: no sweeps in experiment {' or '.join(map(repr, experiments))} in {uri}")
    every_sweep = bool(args.sweep) and "all" in args.sweep
    named = [] if every_sweep or not args.sweep else list(dict.fromkeys(args.sweep))
    every = {n for df in known.values() for n in df["sweep"]}
    unknown = [n for n in named if n not in every]
    if unknown:
        raise ReportError(f"--sweep: no sweep {', '.join(map(repr, unknown))} in {', '.join(map(repr, known))}")
    from reports.report import build_report  # matplotlib and Optuna only once there is something to draw

    todo = []  # every check first: a bad name is exit 2 before any report is written
    for exp, sweeps in known.items():
        if named:
            names = [n for n in named if n in set(sweeps["sweep"])]
            if not names:
                continue
        else:
            names = resolve_sweeps(sweeps, args.sweep, exp)
        folder = names[0] if len(names) == 1 else f"{exp}-compare"
        if why := name_error(folder):  # a name from the store (an old sweep, another tool) never leaves --out
            raise ReportError(f"--sweep: cannot write a report folder for it: {why}")
        todo.append((exp, names, args.out / folder))
    for exp, _, why in [] if named else refused:  # the newest or every sweep was asked for: say what was left out
        print(f"reports: warning: skipped a sweep of experiment {exp!r}: {why}", file=sys.stderr)
    if uri.startswith("sqlite:///"):
        for where in missing_artifacts(uri):  # a moved store: its runs would list no artifacts, silently
            print(f"reports: warning: the artifact folder of experiment {where} is missing", file=sys.stderr)
    for exp, names, out in todo:
        files = build_report(uri, exp, names, out)
        plots = sum(f.suffix == ".png" for f in files)
        print(f"{exp}: {files[0]} (+ report.html, trials.csv, {plots} plots) for {', '.join(names)}", flush=True)
    return EXIT_OK


if __name__ == "__main__":
    sys.exit(main())
