"""A sweep's settings, as the command line resolved them (sweeps/cli.py), and the record of them that a resumed
sweep must match (`resume_record`, checked by sweeps/guard.py `same_sweep`)."""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass
from pathlib import Path

from cnnclf.config import TrainConfig
from sweeps.spec import Ranges, TaskSpec

EXIT_OK, EXIT_FAILED, EXIT_USAGE, EXIT_INTERRUPTED = 0, 1, 2, 130  # the sweep scripts' exit statuses


@dataclass(frozen=True)
class Settings:
    """One sweep, as the command line resolved it (sweeps/cli.py); nothing changes it afterwards."""

    spec: TaskSpec
    name: str
    storage: str  # a local folder (absolute) or a URI
    out: Path  # the sweep's files go to out/name
    tracking_uri: str
    experiment: str
    base: TrainConfig  # search trials are base.replace(**suggested)
    baseline: TrainConfig  # the seed, re-measured on the sweep's data (its epochs capped at max_epochs)
    with_baseline: bool  # False: --no-baseline
    ranges: Ranges
    fixed: dict  # --fix
    num_samples: int
    max_epochs: int
    scheduler: str  # asha | fifo
    grace_period: int
    confirm: int  # fresh seeds per confirmed configuration (0: off)
    confirm_top: int
    cpus_per_trial: float
    gpus_per_trial: float | None  # None: 0.5 with GPUs, else 0
    max_concurrent: int | None
    max_failures: int
    seed: int
    resume: bool
    address: str | None
    connect_timeout: float
    ray_num_gpus: float | None
    mlflow_wait: float
    register_model: str | None = None  # --register-model: the Model Registry name of the best model
    warm_start: tuple[str, ...] = ()  # earlier sweeps whose trials seed the sampler
    gpu_hour_price: float | None = None  # the report prices the sweep's GPU-hours
    budget_by: str = "time"  # what ASHA's rungs count: training seconds (with the cost guard) or epochs
    max_trial_minutes: float | None = None  # the cost guard's limit (None: derived from the baseline's pace)
    trial_settings: dict = dataclasses.field(default_factory=dict)  # sweeps.warmstart.settings_of
    faults: tuple = ()
    params: dict = dataclasses.field(default_factory=dict)  # the flags as given, logged on the parent run
    resume_command: str = ""
    script: str = ""  # the task script, as run (sweeps/cli.py script_of)
    argv: tuple[str, ...] = ()  # its flags (with --name; without --resume)

    @property
    def out_dir(self) -> Path:
        return self.out / self.name

    @property
    def path(self) -> str:
        return f"{self.storage.rstrip('/')}/{self.name}"


# The version of what a sweep saves for --resume (Tune's pickled callbacks and searchers, the journal): a sweep
# saved under another one is refused with one line (sweeps/guard.py same_sweep), never unpickled half-fitting.
STATE_FORMAT = 2


def resume_record(s: Settings) -> dict:
    """What a resumed sweep must share with the sweep it continues (sweeps/guard.py `same_sweep`): the flags that
    shape its results, as plain JSON. Kept in the journal's meta at the sweep's start."""
    record = {
        "task": s.spec.task,
        "experiment": s.experiment,
        "tracking_uri": s.tracking_uri,
        "seed": s.seed,
        "max_epochs": s.max_epochs,
        "scheduler": s.scheduler,
        "grace_period": s.grace_period,
        "budget_by": s.budget_by,
        "max_trial_minutes": s.max_trial_minutes,
        "confirm": s.confirm,
        "confirm_top": s.confirm_top,
        "no_baseline": not s.with_baseline,
        "warm_start": list(s.warm_start),
        "trial": s.trial_settings,
        "format": STATE_FORMAT,
    }
    return json.loads(json.dumps(record))
