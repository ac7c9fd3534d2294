"""MLflow runs of the sweeps -> tables, plots, Markdown and self-contained HTML (`python -m reports`).

`build_report` is imported on first use: the CLI's argument and store checks then run without
loading matplotlib.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from reports.data import ReportError

if TYPE_CHECKING:
    from reports.report import build_report

__all__ = ["ReportError", "build_report"]


def __getattr__(name: str):
    if name == "build_report":
        from reports.report import build_report

        return build_report
    raise AttributeError(f"module 'reports' has no attribute {name!r}")
