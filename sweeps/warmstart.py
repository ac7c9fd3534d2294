"""`--warm-start NAME`: earlier sweeps' finished search trials, as prior knowledge for a new sweep's sampler.

    priors = load(["cifar10-a"], out, settings_of(base, fixed, ranges, load_kw))

Each sweep keeps its Optuna study in `<out>/<name>/optuna.db`; every search trial there carries the
settings it ran under (`settings`, user attribute, written by the searcher when the trial ends). A
new sweep copies the trials whose settings equal its own into its study, marked `warm_start`, so
TPE starts from them; they are not run again and not counted in `--num-samples`. The rest are left
out, counted, with the first differing setting. Trials an earlier sweep itself was warm-started
with are not copied again (only what a sweep ran is its knowledge).
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from pathlib import Path

from cnnclf.config import TrainConfig
from sweeps.spec import SEARCH_PARAMS, Ranges

WARM_ATTR, SETTINGS_ATTR, STATUS_ATTR = "warm_start", "settings", "status"
STUDY_FILE = "optuna.db"


def settings_of(base: TrainConfig, fixed: dict, ranges: Ranges, load: dict) -> dict:
    """What a search trial's val/acc depends on besides its searched values: every training field the
    search leaves alone (image size, epochs, augmentation, ...), the pinned search values (--fix), the
    search ranges and the data subset. Plain JSON values, so they compare after a round trip."""
    data_fields = ("subset", "eval_subset", "split_seed")  # recorded below, as sweeps before them did
    train = {k: v for k, v in base.to_dict().items() if k not in (*SEARCH_PARAMS, *data_fields, "seed", "tags", "task")}
    pinned = {k: v for k, v in fixed.items() if k in SEARCH_PARAMS}
    data = {k: load.get(k) for k in ("subset", "eval_subset")}
    return json.loads(json.dumps({"train": train, "fixed": pinned, "ranges": dataclasses.asdict(ranges), **data}))


@dataclass
class Priors:
    """What the named sweeps teach: Optuna trials to add, a record of each, and what was left out."""

    sources: list[str]
    trials: list = field(default_factory=list)  # optuna FrozenTrial, ready for study.add_trials
    records: list[dict] = field(default_factory=list)  # sweep, number, params, value, status
    left_out: list[dict] = field(default_factory=list)  # sweep, count, why

    def lines(self) -> list[str]:
        """What the driver prints: one line for what seeds the sampler, one per reason something was left out."""
        if not self.sources:
            return []
        per = {s: sum(r["sweep"] == s for r in self.records) for s in self.sources}
        used = ", ".join(f"{n} of sweep {s}" for s, n in per.items())
        out = [f"warm start: {used} seed the sampler (prior knowledge: not run again, not counted in --num-samples)"]
        for x in self.left_out:
            out.append(f"warm start: left out {x['count']} trial(s) of sweep {x['sweep']}: {x['why']}")
        return out

    def as_json(self) -> dict:
        return {"sources": self.sources, "trials": self.records, "left_out": self.left_out}


def study_path(out: Path, name: str) -> Path:
    return Path(out) / name / STUDY_FILE


def load(sources: list[str], out: Path, settings: dict) -> Priors:
    """The finished search trials of `sources` (their studies under `out`) whose settings equal `settings`."""
    priors = Priors(list(sources))
    for name in sources:
        reasons: dict[str, int] = {}
        for t in _finished(study_path(out, name), name):
            why = _difference(t.user_attrs.get(SETTINGS_ATTR), settings)
            if why:
                reasons[why] = reasons.get(why, 0) + 1
                continue
            priors.trials.append(_copy(t, name))
            status = t.user_attrs.get(STATUS_ATTR, t.state.name.lower())
            record = {"sweep": name, "number": t.number, "params": t.params, "value": t.value, "status": status}
            priors.records.append(record)
        priors.left_out += [{"sweep": name, "count": n, "why": why} for why, n in reasons.items()]
    return priors


def _finished(path: Path, name: str) -> list:
    """The trials `name` ran itself and that ended (complete, pruned or failed), oldest first."""
    import optuna

    storage = optuna.storages.RDBStorage(f"sqlite:///{path}")
    try:
        study = optuna.load_study(study_name=name, storage=storage)
        states = (optuna.trial.TrialState.COMPLETE, optuna.trial.TrialState.PRUNED, optuna.trial.TrialState.FAIL)
        return [t for t in study.get_trials(deepcopy=False, states=states) if WARM_ATTR not in t.user_attrs]
    finally:
        storage.remove_session()
        storage.engine.dispose()


def _difference(theirs: dict | None, ours: dict) -> str | None:
    """None when a trial ran under our settings; else why not, in a few words."""
    if theirs is None:
        return "no record of the settings they ran under (a sweep from before --warm-start)"
    diffs = []
    for part in ("train", "fixed", "ranges", "subset", "eval_subset"):
        a, b = theirs.get(part), ours.get(part)
        if a == b:
            continue
        if isinstance(a, dict) and isinstance(b, dict):
            keys = sorted(set(a) | set(b), key=str)
            diffs += [f"{k} {_v(a.get(k))} vs {_v(b.get(k))}" for k in keys if a.get(k) != b.get(k)]
        else:
            diffs.append(f"{part} {_v(a)} vs {_v(b)}")
    return "fixed settings differ: " + ", ".join(diffs[:3]) + (", ..." if len(diffs) > 3 else "") if diffs else None


def _v(x) -> str:
    return "unset" if x is None else str(x)


def _copy(t, sweep: str):
    """A new trial with the same values, distributions, value and state, marked as prior knowledge."""
    import optuna

    return optuna.trial.create_trial(
        state=t.state,
        value=t.value if t.state == optuna.trial.TrialState.COMPLETE else None,
        params=t.params,
        distributions=t.distributions,
        user_attrs={**t.user_attrs, WARM_ATTR: {"sweep": sweep, "number": t.number}},
        intermediate_values=t.intermediate_values,
    )
