"""What one sweep's driver, searchers and callbacks share in this process: a `SweepContext`, opened by the
driver once its journal is open, and closed with it.

It holds the live objects those parts cannot carry themselves: the sweep's journal (which owns every fact
about a trial: docs/internals.md "Who owns what") and the trials to hand out again on `--resume`. Tune pickles
the searchers and callbacks into its experiment state and `Tuner.restore` unpickles them, with no public way
to hand them live objects; so they keep only the sweep's folder and find its context here, through `of`.
This registry is the one piece of process-wide state in `sweeps/`.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from sweeps.journal import Journal


@dataclass
class SweepContext:
    journal: Journal
    # Tune experiment name -> the trials its searcher hands out again first (sweeps/resume.py Orphans).
    orphans: dict[str, object] = field(default_factory=dict)

    @property
    def folder(self) -> Path:
        """The sweep's own folder (--out/<name>): its journal, study, log and report live in it."""
        return self.journal.folder.parent.resolve()


_OPEN: dict[Path, SweepContext] = {}  # the sweep's folder -> its context, while its driver runs


def open_context(journal: Journal) -> SweepContext:
    """The context of the sweep whose journal this is (one per sweep folder in this process)."""
    ctx = SweepContext(journal)
    _OPEN[ctx.folder] = ctx
    return ctx


def close_context(ctx: SweepContext) -> None:
    if _OPEN.get(ctx.folder) is ctx:
        del _OPEN[ctx.folder]


def of(folder: Path) -> SweepContext:
    """The context open on the sweep folder `folder` (a searcher's or callback's own, kept through pickling)."""
    return _OPEN[Path(folder).resolve()]
