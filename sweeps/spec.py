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
    """A baseline as the seed project documented it (its hand-tuned results)."""

    test_acc: float  # fraction
    what: str
    per_class: dict[str, float]  # fractions, where the seed reported them
    hours: float | None = None  # the seed's training time


DOCUMENTED = {
    "cifar10": Documented(0.61, "the PyTorch tutorial net with Adam (amsgrad), batch 4, 2 epochs", {}),
    "catdog": Documented(
        0.88,
        "the seed's 5-6 layer CNN, SGD lr 0.008, about 60 epochs, 5 hours (dog 87%, cat 89%; "
        "its other runs reached dog/cat 90/84 and 88/80)",
        {"cat": 0.89, "dog": 0.87},
        hours=5.0,
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


def outcome_of(last: dict, planned_epochs: int, errored: bool = False) -> str:
    """A trial's outcome from its last reported result."""
    if errored:
        return "error"
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
