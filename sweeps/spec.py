"""The sweep's rules, each written once: metric, search parameters, roles, outcomes, ranking and
confirmation statistics. The sweep (sweeps/) and the report (reports/) both import them from here.

A leaf module: it imports nothing heavier than cnnclf.config (no torch, Ray, Optuna or MLflow),
so `python -m reports` stays light.
"""

from __future__ import annotations

import math
import numbers
import shlex
import statistics
from collections.abc import Sequence
from dataclasses import dataclass

from cnnclf.config import TrainConfig
from sweeps import stats
from sweeps.stats import Difference, Estimate

METRIC, MODE = "val/acc", "max"  # selection; the test set chooses nothing
# The hyperparameters Optuna searches (names as torch spells them), in display order.
SEARCH_PARAMS = (
    "optimizer",
    "lr",
    "momentum",
    "amsgrad",
    "weight_decay",
    "batch_size",
    "depth",
    "kernel_size",
    "width",
)
SGD_ONLY, ADAM_ONLY = ("momentum", "nesterov"), ("amsgrad",)  # conditional: blank for the other family
OPTIMIZER_FAMILIES = {"sgd": ("sgd",), "adam": ("adam", "adamw")}  # who has SGD_ONLY, who has ADAM_ONLY
LOG_PARAMS = ("lr", "weight_decay")  # searched log-uniform (sweeps/searchers.py Space)
CATEGORICAL_PARAMS = ("batch_size", "kernel_size", "width")  # searched as categories (Space)
META_KEYS = ("role", "confirm_of", "adopt")  # Tune config keys that are not TrainConfig fields
SWEEP_PARAM_PREFIX = "sweep."  # the parent run's params are the sweep's flags, apart from trial hyperparameters
METRIC_PREFIXES = ("train/", "val/", "test/", "time/", "throughput/", "resources/", "system/", "cost/", "model/")
ROLES = ("trial", "baseline", "confirm")
# How a trial ended. completed: all its epochs; early_stopped: by ASHA; too_slow: by the cost guard
# (projected over --max-trial-minutes); diverged: non-finite loss; oom: out of device memory; error:
# raised on every attempt.
OUTCOMES = ("completed", "early_stopped", "too_slow", "diverged", "oom", "error")
MEASURED = ("completed", "early_stopped")  # outcomes whose val/acc is a measurement, not a stand-in
FAILED = ("oom", "error")  # the sweep exits 1 when any trial ended so


TASKS = {  # what each task is, for the MLflow experiment's description
    "cifar10": "CIFAR-10: 10 classes of 32x32 photos (50,000 train, 10,000 test)",
    "catdog": "Cat/Dog: Kaggle's Dogs vs. Cats photos (25,000), resized square",
}


@dataclass(frozen=True)
class Documented:
    """A baseline as the seed project documented it (its hand-tuned results), with the budget it had."""

    test_acc: float  # fraction
    what: str
    per_class: dict[str, float]  # fractions, where the seed reported them
    hours: float | None = None  # the seed's training time
    epochs: int | None = None
    train_images: int | None = None
    image_size: int | None = None  # pixels per side

    def budget_differences(self, epochs: object, train_images: object, image_size: object) -> list[str]:
        """How a run's budget differs from this baseline's, one phrase each ("1 epoch vs 2"); [] when alike
        or unknown. Accuracies from different budgets are not comparable without saying so."""
        out = []
        for what, mine, theirs in (
            ("epochs", epochs, self.epochs),
            ("training images", train_images, self.train_images),
            ("px", image_size, self.image_size),
        ):
            if finite(mine) and theirs is not None and int(mine) != theirs:
                unit = "epoch" if what == "epochs" and int(mine) == 1 else what  # type: ignore[arg-type]
                out.append(f"{int(mine):,} {unit} vs {theirs:,}")
        return out


DOCUMENTED = {
    "cifar10": Documented(
        0.61,
        "the PyTorch tutorial net with Adam (amsgrad), batch 4, 2 epochs",
        {},
        epochs=2,
        train_images=50_000,
        image_size=32,
    ),
    "catdog": Documented(
        0.88,
        "the seed's 5-6 layer CNN, SGD lr 0.008, about 60 epochs, 5 hours (dog 87%, cat 89%; "
        "its other runs reached dog/cat 90/84 and 88/80)",
        {"cat": 0.89, "dog": 0.87},
        hours=5.0,
        epochs=60,
        train_images=20_000,
        image_size=128,
    ),
}


@dataclass(frozen=True)
class Ranges:
    """A task's search ranges (documented in each script's docstring). The optimizer's ranges are the
    same for both tasks; the model's differ."""

    batch_size: tuple[int, ...]
    depth: tuple[int, int]  # inclusive
    width: tuple[int, ...]
    lr_sgd: tuple[float, float] = (1e-3, 0.5)  # log-uniform
    lr_adam: tuple[float, float] = (1e-4, 1e-2)  # log-uniform, adam and adamw
    momentum: tuple[float, float] = (0.5, 0.99)  # uniform, sgd only
    weight_decay: tuple[float, float] = (1e-6, 1e-2)  # log-uniform
    kernel_size: tuple[int, ...] = (3, 5, 7)

    @classmethod
    def smoke(cls, depth: tuple[int, int], width: tuple[int, ...]) -> Ranges:
        """--smoke-test: narrow, well-behaved ranges and small nets, so it takes about a minute on a CPU."""
        return cls((32, 64), depth, width, (1e-2, 0.2), (1e-3, 1e-2), (0.8, 0.95), (1e-5, 1e-3), (3, 5))


@dataclass(frozen=True)
class TaskSpec:
    task: str
    base: TrainConfig  # every search trial is base.replace(**suggested)
    baseline: TrainConfig  # the seed, re-measured in the same sweep
    ranges: Ranges
    smoke_ranges: Ranges  # --smoke-test: small nets only, so it takes about a minute on a CPU
    smoke_image_size: int
    default_max_epochs: int
    doc: str = ""


def applies(field: str, optimizer: str) -> bool:
    """Whether a TrainConfig field means anything for `optimizer` (momentum and nesterov only for SGD,
    amsgrad only for the Adam family): a run logs only the fields that apply to it."""
    if field in SGD_ONLY:
        return optimizer in OPTIMIZER_FAMILIES["sgd"]
    if field in ADAM_ONLY:
        return optimizer in OPTIMIZER_FAMILIES["adam"]
    return True


def finite(x: object) -> bool:
    """A real number (Python or NumPy) that is not NaN or infinite; bools are not numbers here."""
    return isinstance(x, numbers.Real) and not isinstance(x, bool) and math.isfinite(x)


def trial_config(config: dict, base: TrainConfig, baseline: TrainConfig) -> TrainConfig:
    """A Tune trial's config dict -> the TrainConfig it trains (unknown keys fail loudly)."""
    params = {k: v for k, v in config.items() if k not in META_KEYS}
    return (baseline if config.get("role") == "baseline" else base).replace(**params)


def reproduce_command(cfg: TrainConfig) -> str:
    """The `python -m cnnclf train` command that trains `cfg` (every field spelled out)."""
    return shlex.join(["python", "-m", "cnnclf", "train", *cfg.cli_args()])


# What a trial's error says when its worker was killed for memory: Ray's memory monitor raises
# ray.exceptions.OutOfMemoryError ("...killed due to the node running low on memory"), torch its own.
MEMORY_KILL = ("OutOfMemoryError", "running low on memory", "memory monitor")


def error_outcome(error: object) -> str:
    """The outcome of a trial that ended in `error` (an exception or its text): oom when its worker ran out
    of memory (or Ray killed it for memory), else error."""
    text = f"{type(error).__name__}: {error}" if isinstance(error, BaseException) else str(error)
    return "oom" if any(k in text for k in MEMORY_KILL) else "error"


def outcome_of(last: dict, planned_epochs: int, errored: object = False) -> str:
    """A trial's outcome from its last reported result (`errored`: the error it ended in, if any)."""
    if errored:
        return error_outcome(errored) if not isinstance(errored, bool) else "error"
    if last.get("failure"):
        return str(last["failure"])  # oom
    if last.get("diverged"):
        return "diverged"
    return "completed" if last.get("epoch", 0) >= planned_epochs else "early_stopped"


def ranked_by(role: str, outcome: str, val_acc: object) -> tuple | None:
    """The sort key of a trial in the ranking (smaller is better), or None when it is not ranked.

    Search trials only, by val/acc; those that ran all their epochs (and so have a test/acc) first.
    """
    if role != "trial" or outcome not in MEASURED or not finite(val_acc):
        return None
    return (outcome != "completed", -float(val_acc))


def confirmation_stats(test: Sequence[float], val: Sequence[float]) -> dict:
    """n, mean and sample std (ddof 1) of a configuration's retrainings with fresh seeds.

    With one run the std is NaN (undefined), never 0.0: one run says nothing about the spread.
    """
    n = len(test)

    def std(xs: Sequence[float]) -> float:
        return statistics.stdev(xs) if len(xs) > 1 else math.nan

    return {
        "n": n,
        "test_mean": statistics.fmean(test) if n else math.nan,
        "test_std": std(test),
        "val_mean": statistics.fmean(val) if val else math.nan,
        "val_std": std(val),
    }


def only_finite(values: dict) -> dict:
    """The finite numbers of a dict (for MLflow metrics and JSON)."""
    return {k: v for k, v in values.items() if finite(v)}


# ---------------------------------------------------------------------------------------------
# The sweep's answer: which configuration to train and how sure that is. The sweep (sweeps/finish.py)
# and the report (reports/) both build a list of Run records and call `answer`.


@dataclass(frozen=True)
class Run:
    """What the answer needs of one run (a search trial, the baseline or a confirmation run)."""

    trial_id: str
    role: str
    outcome: str
    val: float | None
    test: float | None
    test_n: float | None = None  # test images it was measured on (test/n)
    majority: float | None = None  # accuracy of always answering the most frequent class (test/majority_acc)
    top_share: float | None = None  # largest share of its predictions given to one class (test/top_pred_share)
    confirm_of: str | None = None
    seed: int | None = None

    @classmethod
    def of(cls, trial_id: str, role: str, outcome: str, metrics: dict, **more: object) -> Run:
        """From a run's last metrics (Tune's result or MLflow's); val and test only where measured."""
        ok = outcome in MEASURED

        def get(k: str) -> float | None:
            v = metrics.get(k)
            return float(v) if finite(v) else None

        val, test = (get(METRIC), get("test/acc")) if ok else (None, None)
        extra = {"test_n": get("test/n"), "majority": get("test/majority_acc"), "top_share": get("test/top_pred_share")}
        return cls(trial_id, role, outcome, val, test, **extra, **more)  # type: ignore[arg-type]

    @property
    def measured(self) -> bool:
        return self.outcome == "completed" and finite(self.test)

    def test_estimate(self) -> Estimate:
        return stats.one_run(float(self.test) if finite(self.test) else math.nan, self.test_n)


@dataclass(frozen=True)
class Confirmed:
    """One configuration retrained with fresh seeds: its search trial, the runs that completed, their means."""

    trial: Run
    runs: tuple[Run, ...]
    failed: int  # confirmation runs that did not complete
    test: Estimate  # over the completed runs' test/acc
    val: Estimate  # over their val/acc: what chooses

    @property
    def flag(self) -> str | None:
        return chance_flag(self.test, self.runs)


@dataclass(frozen=True)
class Answer:
    """The recommended configuration and the evidence for it (docs/sweeps.md, "The answer")."""

    trial: Run  # the recommended configuration's search trial
    confirmed: Confirmed | None  # None: recommended from one unconfirmed run (--confirm 0, or none completed)
    search_rank: int  # where the search ranked it (1: its best by val/acc)
    search_top: Run
    ranking: tuple[Confirmed, ...]  # every confirmed configuration, best mean val/acc first
    model: Run  # the run whose checkpoint is the logged model: best val/acc among the trial and its confirmations
    baseline: Run | None

    @property
    def test(self) -> Estimate:
        return self.confirmed.test if self.confirmed else self.trial.test_estimate()

    @property
    def val(self) -> Estimate:
        return self.confirmed.val if self.confirmed else stats.one_run(_num(self.trial.val), None)

    @property
    def runner_up(self) -> Confirmed | None:
        return self.ranking[1] if len(self.ranking) > 1 else None

    @property
    def reordered(self) -> bool:
        """Confirmation chose another configuration than the search's best."""
        return self.confirmed is not None and self.trial.trial_id != self.search_top.trial_id

    def vs_runner_up(self) -> Difference | None:
        return stats.difference(self.test, self.runner_up.test) if self.runner_up else None

    def vs_baseline(self) -> Difference | None:
        if self.baseline is None or not finite(self.baseline.test):
            return None
        return stats.difference(self.test, self.baseline.test_estimate())

    @property
    def flag(self) -> str | None:
        return self.confirmed.flag if self.confirmed else chance_flag(self.test, (self.trial,))


def _num(x: object) -> float:
    return float(x) if finite(x) else math.nan  # type: ignore[arg-type]


def chance_flag(test: Estimate, runs: Sequence[Run]) -> str | None:
    """Why an accuracy says nothing about the configuration, or None: every one of its runs gave every test
    image the same class (a constant predictor), or its 95% interval reaches chance (the accuracy of always
    answering the most frequent class)."""
    shares = [r.top_share for r in runs if finite(r.top_share)]
    if shares and all(x >= 1 - 1e-9 for x in shares):
        return "constant predictor: it gives every test image the same class"
    majority = [r.majority for r in runs if finite(r.majority)]
    if majority and stats.at_chance(test, max(majority)):
        return f"at chance: its 95% interval reaches {max(majority):.2%}, the accuracy of always answering one class"
    return None


def answer(runs: Sequence[Run]) -> Answer | None:
    """The sweep's recommendation from its runs (None when no search trial has a val/acc).

    With confirmation runs, the recommended configuration is the confirmed one with the highest mean val/acc
    over its fresh seeds (the search trial itself is not counted: it was picked because it was high; ties go
    to the better search rank). Without any (--confirm 0, or none completed), the best search trial by
    val/acc, one unconfirmed run. The test set chooses nothing.
    """
    keyed = [(k, i, r) for i, r in enumerate(runs) if (k := ranked_by(r.role, r.outcome, r.val)) is not None]
    ranked = [r for _, _, r in sorted(keyed, key=lambda t: (t[0], t[1]))]
    if not ranked:
        return None
    confirmed = []
    for rank, trial in enumerate(ranked):
        mine = [r for r in runs if r.role == "confirm" and r.confirm_of == trial.trial_id]
        done = tuple(r for r in mine if r.measured)
        if done:
            val = stats.over_seeds([_num(r.val) for r in done])
            # one run: its binomial interval on the test set; several: the spread across seeds
            test = stats.over_seeds([_num(r.test) for r in done]) if len(done) > 1 else done[0].test_estimate()
            confirmed.append((rank, Confirmed(trial, done, len(mine) - len(done), test, val)))
    confirmed.sort(key=lambda rc: (-rc[1].val.mean if finite(rc[1].val.mean) else math.inf, rc[0]))
    ranking = tuple(c for _, c in confirmed)
    chosen = ranking[0] if ranking else None
    trial = chosen.trial if chosen else ranked[0]
    candidates = [trial, *(chosen.runs if chosen else ())]
    model = max(candidates, key=lambda r: _num(r.val) if finite(r.val) else -math.inf)  # first wins ties
    baseline = next((r for r in reversed(runs) if r.role == "baseline" and r.outcome != "interrupted"), None)
    return Answer(trial, chosen, ranked.index(trial) + 1, ranked[0], ranking, model, baseline)
