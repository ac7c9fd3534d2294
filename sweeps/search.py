"""The search space (Optuna define-by-run) and the searcher (the seed baseline first, then Optuna TPE).

Both are module-level classes because Tune pickles the searcher into its experiment
state, and `--resume` unpickles it.
"""

from __future__ import annotations

import pickle

from optuna.samplers import TPESampler
from ray.tune.search import ConcurrencyLimiter, Searcher
from ray.tune.search.optuna import OptunaSearch

from sweeps.core import METRIC, MODE, Ranges


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

    def set_search_properties(self, metric, mode, config, **spec) -> bool:
        return self.inner.set_search_properties(metric, mode, config, **spec)

    def suggest(self, trial_id: str):
        if self.baseline is not None and self.baseline_trial is None:
            self.baseline_trial = trial_id
            return dict(self.baseline)
        return self.inner.suggest(trial_id)

    def on_trial_result(self, trial_id: str, result: dict) -> None:
        if trial_id != self.baseline_trial:
            self.inner.on_trial_result(trial_id, result)

    def on_trial_complete(self, trial_id: str, result: dict | None = None, error: bool = False) -> None:
        if trial_id != self.baseline_trial:
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

    def suggest(self, trial_id: str):
        if trial_id in self.issued:
            return dict(self.configs[self.issued[trial_id]])
        if len(self.issued) >= len(self.configs):
            return Searcher.FINISHED
        self.issued[trial_id] = len(self.issued)
        return dict(self.configs[self.issued[trial_id]])

    def on_trial_complete(self, trial_id: str, result: dict | None = None, error: bool = False) -> None:
        pass

    def save(self, checkpoint_path: str) -> None:
        with open(checkpoint_path, "wb") as f:
            pickle.dump({"configs": self.configs, "issued": self.issued}, f)

    def restore(self, checkpoint_path: str) -> None:
        with open(checkpoint_path, "rb") as f:
            state = pickle.load(f)
        self.configs, self.issued = state["configs"], state["issued"]
