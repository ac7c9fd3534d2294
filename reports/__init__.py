"""MLflow runs of the sweeps -> tables, plots, Markdown and self-contained HTML (`python -m reports`).

`build_report` is imported on first use: the CLI's argument and store checks then run without
loading matplotlib.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from reports.data import ReportError
    from reports.report import build_report

__all__ = ["ReportError", "build_report", "write"]


def write(tracking_uri: str, experiment: str, sweeps: list[str], out_dir: Path) -> list[Path]:
    """`build_report`, loaded on the first call: what the sweep scripts hand the sweep to write its report
    (no `sweeps` module imports `reports`)."""
    from reports.report import build_report

    return build_report(tracking_uri, experiment, sweeps, out_dir)


def __getattr__(name: str):
    if name == "build_report":
        from reports.report import build_report

        return build_report
    if name == "ReportError":
        from reports.data import ReportError

        return ReportError
    raise AttributeError(f"module 'reports' has no attribute {name!r}")
