"""The search space (Optuna define-by-run) and the searchers: the seed baseline first, then Optuna TPE;
and a fixed list for the confirmation runs.

Tune pickles searchers into its experiment state and `--resume` unpickles them, so they are
module-level classes. The Optuna study lives in the sweep's own SQLite file (`optuna.db` beside its
report) through `OptunaSearch(study_name=..., storage=...)`; everything here goes through public
Ray and Optuna APIs.
"""

from __future__ import annotations

import contextlib
import pickle
import sqlite3
import sys
import tempfile
import zlib
from dataclasses import dataclass, field
from pathlib import Path

import optuna
from optuna.samplers import TPESampler
from ray.tune.search import ConcurrencyLimiter, Searcher
from ray.tune.search.optuna import OptunaSearch

from cnnclf.config import TrainConfig
from sweeps import context
from sweeps.spec import METRIC, MODE, SEARCH_PARAMS, Ranges, applies
from sweeps.warmstart import SETTINGS_ATTR, WARM_ATTR


def optuna_storage(path: Path) -> optuna.storages.RDBStorage:
    """The study's SQLite storage."""
    path = Path(path).resolve()
    path.parent.mkdir(parents=True, exist_ok=True)
    return optuna.storages.RDBStorage(f"sqlite:///{path}")


class Space:
    """An OptunaSearch `space`: `momentum` only for SGD, `amsgrad` only for Adam/AdamW.

    Pinned (`--fix`) parameters are not suggested; they come back as constants, as do
    pinned values of fields outside the search (label_smoothing, image_size, ...).
    """

    def __init__(self, ranges: Ranges, fixed: dict, experiment: str = "sweep") -> None:
        self.ranges, self.fixed, self.experiment = ranges, dict(fixed), experiment

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


@dataclass(frozen=True)
class Known:
    """What a sweep's sampler starts from besides its own trials: the settings its trials run under
    (recorded on each, for later warm starts), earlier sweeps' trials (`--warm-start`), and a salt that
    gives its random start-up draws their own sequence (a warm-started or extended sweep with the
    seed of the sweep it learns from would otherwise draw that sweep's first configurations again);
    and the Tune experiment its phase hands trials to."""

    settings: dict = field(default_factory=dict)
    prior: list = field(default_factory=list)  # optuna FrozenTrials (sweeps.warmstart.Priors.trials)
    salt: str = ""
    start: dict | None = None  # the first search trial's params in a new study without priors (the reference)
    tune_name: str | None = None  # None: the study's own name; an extension's Tuner has another (the same study)

    def sampler_seed(self, seed: int) -> int:
        return seed if not self.salt else (seed + zlib.crc32(self.salt.encode())) % 2**31


def start_params(base: TrainConfig, ranges: Ranges, fixed: dict) -> dict | None:
    """The searched values of `base` (the task's reference configuration) as the Space suggests them, or None
    when one lies outside `ranges` (a --smoke-test's narrow ones) or --fix pins another optimizer: the sweep's
    first search trial."""
    if fixed.get("optimizer", base.optimizer) != base.optimizer:
        return None
    params = {k: getattr(base, k) for k in SEARCH_PARAMS if k not in fixed and applies(k, base.optimizer)}
    lr = ranges.lr_sgd if base.optimizer == "sgd" else ranges.lr_adam
    bounds = {"lr": lr, "momentum": ranges.momentum, "weight_decay": ranges.weight_decay, "depth": ranges.depth}
    choices = {"batch_size": ranges.batch_size, "kernel_size": ranges.kernel_size, "width": ranges.width}
    for k, v in params.items():
        if (k in bounds and not bounds[k][0] <= v <= bounds[k][1]) or (k in choices and v not in choices[k]):
            return None
    return params


class BaselineThenOptuna(Searcher):
    """Hands out the seed baseline as the first trial, outside Optuna's study (it is not in the
    search space), then delegates to OptunaSearch. An errored trial is told to Optuna as FAIL,
    not as COMPLETE with its last value; every told trial carries a `status` user attribute."""

    def __init__(self, space: Space, baseline: dict | None, seed: int, study: Path, known: Known | None = None) -> None:
        super().__init__(metric=METRIC, mode=MODE)
        known = known or Known()
        self.experiment, self.space, self.baseline = space.experiment, space, baseline
        self.tune_name = known.tune_name or space.experiment  # an extended sweep's later Tuners: the same study
        self.study_path = study
        self.settings = known.settings
        self.storage = optuna_storage(study)  # one connection pool for this searcher and its OptunaSearch
        self.inner = OptunaSearch(
            space=space,
            metric=METRIC,  # define-by-run: metric and mode must be given here, or the sweep fails
            mode=MODE,
            sampler=TPESampler(seed=known.sampler_seed(seed), multivariate=True, group=True, n_startup_trials=8),
            study_name=space.experiment,
            storage=self.storage,
        )
        study_now = self.study()
        if known.start and not known.prior and not study_now.get_trials(deepcopy=False):
            study_now.enqueue_trial(known.start)  # a new study: the search starts from a known configuration
        if known.prior and not any(WARM_ATTR in t.user_attrs for t in study_now.get_trials(deepcopy=False)):
            study_now.add_trials(known.prior)  # once: a restored study has them already
        self.baseline_trial: str | None = None
        self.numbers: dict[str, int] = {}  # Tune trial id -> Optuna trial number
        self.told: set[str] = set()  # trials whose end Optuna was told (a rerun errored trial is not told twice)

    def set_search_properties(self, metric, mode, config, **spec) -> bool:
        return self.inner.set_search_properties(metric, mode, config, **spec)

    def suggest(self, trial_id: str):
        orphans = context.of(self.study_path.parent).orphans.get(self.tune_name or self.experiment)
        if self.baseline is not None and self.baseline_trial is None:
            self.baseline_trial = trial_id
            return orphans.claim(dict(self.baseline)) if orphans else dict(self.baseline)
        if orphans:
            self._enqueue(orphans)
        config = self.inner.suggest(trial_id)
        if not isinstance(config, dict):
            return config
        if trial_id not in self.numbers:
            self.numbers[trial_id] = self._asked(config)
        return orphans.claim(config) if orphans else config

    def _asked(self, config: dict) -> int:
        """The number of the Optuna trial OptunaSearch just asked for `config`: the running trial of the study,
        not yet handed to a Tune trial, whose suggested values `config` holds (the newest, if several do)."""
        taken = set(self.numbers.values())
        running = self.study().get_trials(deepcopy=False, states=(optuna.trial.TrialState.RUNNING,))
        mine = [t.number for t in running if t.number not in taken and t.params.items() <= config.items()]
        return max(mine)

    def _enqueue(self, orphans) -> None:
        """Optuna hands orphans' exact values out next, under this study's bookkeeping; not twice, when an
        earlier --resume enqueued them already and was killed before they started."""
        study = self.study()
        waiting = None
        for o in orphans.unclaimed("trial"):
            if o.trial_id in orphans.enqueued:
                continue
            params = {k: v for k, v in o.config.items() if k not in self.space.fixed and k != "role"}
            if waiting is None:
                waiting = study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.WAITING,))
            if not any(t.params == params or t.system_attrs.get("fixed_params") == params for t in waiting):
                study.enqueue_trial(params, skip_if_exists=False)
            orphans.enqueued.add(o.trial_id)

    def study(self) -> optuna.Study:
        return optuna.load_study(study_name=self.experiment, storage=self.storage)

    def on_trial_result(self, trial_id: str, result: dict) -> None:
        if trial_id in self.numbers:
            self.inner.on_trial_result(trial_id, result)

    def on_trial_complete(self, trial_id: str, result: dict | None = None, error: bool = False) -> None:
        if trial_id not in self.numbers or trial_id in self.told:
            return  # the baseline; or an errored trial that --resume runs again: Optuna has been told
        # Diverged and out-of-memory trials are told as the worst value (0.0, what the trainable
        # reported), not NaN, so TPE learns from them; too slow ones as pruned; the attribute says why.
        last = result or {}
        status = "error" if error else last.get("failure") or ("diverged" if last.get("diverged") else "completed")
        storage = self.storage  # public BaseStorage calls: set before the trial is told
        study_id = storage.get_study_id_from_name(self.experiment)
        tid = storage.get_trial_id_from_study_id_trial_number(study_id, self.numbers[trial_id])
        storage.set_trial_user_attr(tid, "status", status)
        if self.settings:  # what a later --warm-start compares (sweeps/warmstart.py)
            storage.set_trial_user_attr(tid, SETTINGS_ATTR, self.settings)
        self.told.add(trial_id)
        if status == "too_slow":  # pruned: TPE ranks it below every finished trial, and learns the region is costly
            self.study().tell(self.numbers[trial_id], state=optuna.trial.TrialState.PRUNED)
            return
        self.inner.on_trial_complete(trial_id, result=None if error else result, error=error)

    def save(self, checkpoint_path: str) -> None:
        """Our state, OptunaSearch's (through its own save) and the study's database as of now: Tune
        takes these snapshots together, so a restore puts the study back where the searcher was."""
        with tempfile.TemporaryDirectory() as d:
            self.inner.save(str(Path(d) / "optuna.pkl"))
            inner = (Path(d) / "optuna.pkl").read_bytes()
        state = {"baseline_trial": self.baseline_trial, "numbers": self.numbers, "told": self.told, "inner": inner}
        state["study"] = _serialize(self.study_path)
        with open(checkpoint_path, "wb") as f:
            pickle.dump(state, f)

    def restore(self, checkpoint_path: str) -> None:
        with open(checkpoint_path, "rb") as f:  # the sweep's own storage path: trusted (docs/security.md)
            state = pickle.load(f)
        self.baseline_trial, self.numbers, self.told = state["baseline_trial"], state["numbers"], state["told"]
        # Trials asked or told after that snapshot (the driver went down) leave the study as they were
        # then; the journal hands the orphans out again, so nothing is counted twice or left RUNNING.
        _deserialize(self.study_path, state["study"])
        with tempfile.TemporaryDirectory() as d:
            (Path(d) / "optuna.pkl").write_bytes(state["inner"])
            self.inner.restore(str(Path(d) / "optuna.pkl"))


def _serialize(path: Path) -> bytes:
    """A consistent copy of a SQLite database (sqlite3's own serialize, under its read lock)."""
    with contextlib.closing(sqlite3.connect(path)) as c:
        return c.serialize()


def _deserialize(path: Path, data: bytes) -> None:
    """Put a serialized database back into `path` through SQLite's backup API (open connections see it)."""
    with contextlib.closing(sqlite3.connect(":memory:")) as src, contextlib.closing(sqlite3.connect(path)) as dst:
        src.deserialize(data)
        src.backup(dst)


def make_searcher(
    space: Space, baseline: dict | None, seed: int, study: Path, max_concurrent: int | None, known: Known | None = None
) -> Searcher:
    """The sweep's searcher: `space.experiment` names the Optuna study, kept in the SQLite file `study`;
    `known.tune_name` the Tune experiment it hands trials to (another one than the study's for an extension)."""
    searcher = BaselineThenOptuna(space, baseline, seed, study, known)
    return ConcurrencyLimiter(searcher, max_concurrent=max_concurrent) if max_concurrent else searcher


def close_study(path: Path, experiment: str) -> Path | None:
    """The study at the end of a sweep (`optuna-dashboard sqlite:///<path>`): no trial may stay RUNNING;
    any that does (a trial Tune never reported on) is told FAIL here, and said so."""
    if not path.exists():
        return None
    study = optuna.load_study(study_name=experiment, storage=optuna_storage(path))
    stuck = study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.RUNNING,))
    for t in stuck:
        study.tell(t.number, state=optuna.trial.TrialState.FAIL)
    if stuck:
        print(f"warning: {len(stuck)} Optuna trial(s) were still RUNNING at the end; told FAIL", file=sys.stderr)
    return path


class FixedConfigs(Searcher):
    """Hands out a fixed list of configs in order (the confirmation runs), then FINISHED."""

    def __init__(self, experiment: str, folder: Path, configs: list[dict]) -> None:
        super().__init__(metric=METRIC, mode=MODE)
        self.experiment, self.folder = experiment, folder  # the Tune experiment; the sweep's folder (its context)
        self.configs = [dict(c) for c in configs]
        self.issued: dict[str, int] = {}  # trial_id -> index

    def suggest(self, trial_id: str):
        if trial_id in self.issued:
            return dict(self.configs[self.issued[trial_id]])
        if len(self.issued) >= len(self.configs):
            return Searcher.FINISHED
        self.issued[trial_id] = len(self.issued)
        config = dict(self.configs[self.issued[trial_id]])
        orphans = context.of(self.folder).orphans.get(self.experiment)
        return orphans.claim(config) if orphans else config

    def on_trial_complete(self, trial_id: str, result: dict | None = None, error: bool = False) -> None:
        pass

    def save(self, checkpoint_path: str) -> None:
        with open(checkpoint_path, "wb") as f:
            pickle.dump({"configs": self.configs, "issued": self.issued}, f)

    def restore(self, checkpoint_path: str) -> None:
        with open(checkpoint_path, "rb") as f:  # the sweep's own storage path: trusted (docs/security.md)
            state = pickle.load(f)
        self.configs, self.issued = state["configs"], state["issued"]
