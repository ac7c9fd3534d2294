"""A Tuner's results as rows (`collect`), and the search trials ranked by val/acc (`rank`): what the end of a
sweep (sweeps/finish.py) prints, saves and confirms."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from cnnclf.config import TrainConfig
from sweeps.spec import METRIC, Run, finite, outcome_of, ranked_by
from sweeps.spec import trial_config as config_of


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
