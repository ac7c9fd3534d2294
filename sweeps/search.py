"""The search space (Optuna define-by-run) and the searcher (the seed baseline first, then Optuna TPE).

Both are module-level classes because Tune pickles the searcher into its experiment
state, and `--resume` unpickles it.
"""

from __future__ import annotations

import pickle
import sys
from dataclasses import dataclass, field
from pathlib import Path

import optuna
from optuna.samplers import TPESampler
from ray.tune.search import ConcurrencyLimiter, Searcher
from ray.tune.search.optuna import OptunaSearch

from sweeps.core import META_KEYS, METRIC, MODE, Ranges


@dataclass
class Orphan:
    trial_id: str
    role: str
    config: dict  # its Tune config, without meta keys
    dirs: list[str]  # its storage folder and those of trials that already continued it
    ended: bool = False  # it had ended (ASHA-stopped, say): replay its last result, train no further


@dataclass
class Orphans:
    """Trials the journal knows but Tune's restored state does not: they began after Tune's last
    snapshot before the driver went down. The searchers hand their configurations out again,
    first, each with `adopt` set, so the new trial continues the old one (its checkpoints, its
    MLflow run) instead of running it a second time."""

    entries: list[Orphan] = field(default_factory=list)
    claimed: set[str] = field(default_factory=set)
    enqueued: set[str] = field(default_factory=set)

    @classmethod
    def from_journal(cls, journal, known: set[str], experiment_path: str, roles: tuple[str, ...]) -> Orphans:
        entries = []
        for t in journal.trials.values():
            role = t.config.get("role", "trial")
            if role not in roles or t.trial_id in known or any(a in known for a in t.adopted_by):
                continue
            ids = [t.trial_id, *t.adopted_by]
            dirs = [str(Path(experiment_path) / f"{role}-{i}") for i in ids] if "://" not in experiment_path else []
            entries.append(Orphan(t.trial_id, role, _strip(t.config), dirs, ended=t.status is not None))
        return cls(entries)

    def unclaimed(self, role: str) -> list[Orphan]:
        return [o for o in self.entries if o.role == role and o.trial_id not in self.claimed]

    def claim(self, config: dict) -> dict:
        """`config`, with `adopt` added when it is an orphan's configuration."""
        plain = _strip(config)
        for o in self.entries:
            if o.trial_id not in self.claimed and o.config == plain:
                self.claimed.add(o.trial_id)
                return {**config, "adopt": {"trial_id": o.trial_id, "dirs": o.dirs, "ended": o.ended}}
        return config


def _strip(config: dict) -> dict:
    return {k: v for k, v in config.items() if k not in META_KEYS or k == "role"}


def _unwrap(searcher):
    while hasattr(searcher, "searcher"):  # ConcurrencyLimiter, SearchGenerator
        searcher = searcher.searcher
    return searcher


def set_orphans(tuner, orphans: Orphans) -> None:
    """Give the Tuner's searcher (fresh or restored by Tune) this run's orphans."""
    searcher = _unwrap(tuner._local_tuner._tune_config.search_alg)
    searcher.orphans = orphans


def export_study(tuner, path: Path) -> Path | None:
    """The sweep's Optuna study, as an Optuna SQLite database (`optuna-dashboard sqlite:///...`).

    At the end of a sweep no trial may stay RUNNING: any that does (a trial Tune never reported
    on) is told FAIL here, and said so.
    """
    import optuna

    inner = getattr(_unwrap(tuner._local_tuner._tune_config.search_alg), "inner", None)
    study = getattr(inner, "_ot_study", None)
    if study is None:
        return None
    stuck = [t for t in study.get_trials(deepcopy=False) if t.state == optuna.trial.TrialState.RUNNING]
    for t in stuck:
        study.tell(t.number, state=optuna.trial.TrialState.FAIL)
    if stuck:
        print(f"warning: {len(stuck)} Optuna trial(s) were still RUNNING at the end; told FAIL", file=sys.stderr)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.unlink(missing_ok=True)
    optuna.copy_study(from_study_name=study.study_name, from_storage=study._storage, to_storage=f"sqlite:///{path}")
    return path


class Space:
    """An OptunaSearch `space`: `momentum` only for SGD, `amsgrad` only for Adam/AdamW.

    Pinned (`--fix`) parameters are not suggested; they come back as constants, as do
    pinned values of fields outside the search (label_smoothing, image_size, ...).
    """

    def __init__(self, ranges: Ranges, fixed: dict) -> None:
        self.ranges, self.fixed = ranges, dict(fixed)

    def __call__(self, trial) -> dict:
        r, fixed = self.ranges, self.fixed

        def pick(name, suggest):
            return fixed[name] if name in fixed else suggest()

        optimizer = pick("optimizer", lambda: trial.suggest_categorical("optimizer", ["sgd", "adam", "adamw"]))
        lo, hi = r.lr_sgd if optimizer == "sgd" else r.lr_adam
        params = {"optimizer": optimizer, "lr": pick("lr", lambda: trial.suggest_float("lr", lo, hi, log=True))}
        if optimizer == "sgd":
            params["momentum"] = pick("momentum", lambda: trial.suggest_float("momentum", *r.momentum))
        else:
            params["amsgrad"] = pick("amsgrad", lambda: trial.suggest_categorical("amsgrad", [False, True]))
        params["weight_decay"] = pick(
            "weight_decay", lambda: trial.suggest_float("weight_decay", *r.weight_decay, log=True)
        )
        params["batch_size"] = pick("batch_size", lambda: trial.suggest_categorical("batch_size", r.batch_size))
        params["depth"] = pick("depth", lambda: trial.suggest_int("depth", *r.depth))
        params["kernel_size"] = pick("kernel_size", lambda: trial.suggest_categorical("kernel_size", r.kernel_size))
        params["width"] = pick("width", lambda: trial.suggest_categorical("width", r.width))
        params.update({k: v for k, v in fixed.items() if k not in params and k not in ("momentum", "amsgrad")})
        params["role"] = "trial"
        return params


class BaselineThenOptuna(Searcher):
    """Hands out the seed baseline as the first trial, outside Optuna's study (it is not in the
    search space), then delegates to OptunaSearch. An errored trial is told to Optuna as FAIL,
    not as COMPLETE with its last value."""

    def __init__(self, inner: OptunaSearch, baseline: dict | None) -> None:
        super().__init__(metric=METRIC, mode=MODE)
        self.inner = inner
        self.baseline = baseline
        self.baseline_trial: str | None = None
        self.orphans: Orphans | None = None  # set by the driver on every run (set_orphans)

    def __getstate__(self) -> dict:
        return {**self.__dict__, "orphans": None}

    def set_search_properties(self, metric, mode, config, **spec) -> bool:
        return self.inner.set_search_properties(metric, mode, config, **spec)

    def suggest(self, trial_id: str):
        orphans = self.orphans or Orphans()
        if self.baseline is not None and self.baseline_trial is None:
            self.baseline_trial = trial_id
            return orphans.claim(dict(self.baseline))
        for o in orphans.unclaimed("trial"):
            if o.trial_id not in orphans.enqueued:
                # Optuna hands these exact values out next, under this study's bookkeeping; not twice,
                # when an earlier --resume enqueued them already and was killed before they started.
                params = {k: v for k, v in o.config.items() if k in self._suggested_names(o.config)}
                study = self.inner._ot_study
                waiting = study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.WAITING,))
                if not any(t.system_attrs.get("fixed_params") == params for t in waiting):
                    study.enqueue_trial(params, skip_if_exists=False)
                orphans.enqueued.add(o.trial_id)
        config = self.inner.suggest(trial_id)
        return orphans.claim(config) if isinstance(config, dict) else config

    def _suggested_names(self, config: dict) -> set[str]:
        fixed = set(getattr(self.inner._space, "fixed", {}))
        return {k for k in config if k not in fixed and k != "role"}

    def on_trial_result(self, trial_id: str, result: dict) -> None:
        if trial_id != self.baseline_trial:
            self.inner.on_trial_result(trial_id, result)

    def on_trial_complete(self, trial_id: str, result: dict | None = None, error: bool = False) -> None:
        if trial_id == self.baseline_trial or trial_id in self.inner._completed_trials:
            return  # e.g. an errored trial that --resume runs again: Optuna has already been told
        ot_trial = self.inner._ot_trials.get(trial_id)
        if ot_trial is not None:
            # Diverged and out-of-memory trials are told as the worst value (0.0, what the
            # trainable reported), not NaN, so TPE learns from them; the attribute says why.
            status = (
                "error"
                if error
                else (result or {}).get("failure") or ("diverged" if (result or {}).get("diverged") else "completed")
            )
            ot_trial.set_user_attr("status", status)
        self.inner.on_trial_complete(trial_id, result=None if error else result, error=error)

    def save(self, checkpoint_path: str) -> None:
        with open(checkpoint_path, "wb") as f:
            pickle.dump({"baseline_trial": self.baseline_trial, "inner": self.inner.__dict__.copy()}, f)

    def restore(self, checkpoint_path: str) -> None:
        with open(checkpoint_path, "rb") as f:  # our own experiment folder: trusted, as Tune's own pickles
            state = pickle.load(f)
        self.baseline_trial = state["baseline_trial"]
        self.inner.__dict__.update(state["inner"])


def make_searcher(space: Space, baseline_config: dict | None, seed: int, max_concurrent: int | None) -> Searcher:
    inner = OptunaSearch(
        space=space,
        metric=METRIC,  # define-by-run: metric and mode must be given here, or the sweep fails
        mode=MODE,
        sampler=TPESampler(seed=seed, multivariate=True, group=True, n_startup_trials=8),
    )
    searcher = BaselineThenOptuna(inner, baseline_config)
    return ConcurrencyLimiter(searcher, max_concurrent=max_concurrent) if max_concurrent else searcher


class FixedConfigs(Searcher):
    """Hands out a fixed list of configs in order (the confirmation runs), then FINISHED."""

    def __init__(self, configs: list[dict]) -> None:
        super().__init__(metric=METRIC, mode=MODE)
        self.configs = [dict(c) for c in configs]
        self.issued: dict[str, int] = {}  # trial_id -> index
        self.orphans: Orphans | None = None

    def __getstate__(self) -> dict:
        return {**self.__dict__, "orphans": None}

    def suggest(self, trial_id: str):
        if trial_id in self.issued:
            return dict(self.configs[self.issued[trial_id]])
        if len(self.issued) >= len(self.configs):
            return Searcher.FINISHED
        self.issued[trial_id] = len(self.issued)
        return (self.orphans or Orphans()).claim(dict(self.configs[self.issued[trial_id]]))

    def on_trial_complete(self, trial_id: str, result: dict | None = None, error: bool = False) -> None:
        pass

    def save(self, checkpoint_path: str) -> None:
        with open(checkpoint_path, "wb") as f:
            pickle.dump({"configs": self.configs, "issued": self.issued}, f)

    def restore(self, checkpoint_path: str) -> None:
        with open(checkpoint_path, "rb") as f:
            state = pickle.load(f)
        self.configs, self.issued = state["configs"], state["issued"]
