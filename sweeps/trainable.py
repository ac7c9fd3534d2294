"""What one trial runs without Ray: `cnnclf.train.train` with running out of memory as a recorded result, the
cost guard's probe, the checkpoint folders (written, read back, pruned). `sweeps/trial.py` runs it in a Ray
worker, reporting every epoch to Tune with a checkpoint, from the newest complete checkpoint it can find.

Checkpoints load with `weights_only=True` (cnnclf.train.load_checkpoint): one that holds anything
but tensors and plain types is ignored, never run.
"""

from __future__ import annotations

import contextlib
import gc
import json
import resource
import shutil
import sys
import time
import warnings
from dataclasses import dataclass
from pathlib import Path

import torch

from cnnclf.config import TrainConfig
from cnnclf.data import TaskData
from cnnclf.train import CheckpointError, load_checkpoint, save_checkpoint, train
from sweeps.faults import fire
from sweeps.spec import METRIC

CHECKPOINT_FILE, METRICS_FILE = "checkpoint.pt", "metrics.json"
KEEP_RECENT_S = 300.0  # well beyond Tune's experiment snapshot period (10 s or more, "auto")


@dataclass(frozen=True)
class TrialSetup:
    """What every trial of a sweep shares besides the data, handed to Tune through `tune.with_parameters`."""

    base: TrainConfig
    baseline: TrainConfig
    experiment_path: str
    faults: tuple = ()
    finished: frozenset[str] = frozenset()  # trial ids the journal saw end (ASHA stops after Tune's snapshot)
    max_trial_s: float | None = None  # the cost guard: a search trial projected over this stops as too_slow


class TooSlow(Exception):
    """The cost guard's verdict: the trial's projected training seconds are over the sweep's limit."""

    def __init__(self, projected_s: float, limit_s: float, spent_s: float) -> None:
        super().__init__(f"projected {projected_s:.0f} s of training, over the limit of {limit_s:.0f} s")
        self.projected_s, self.limit_s, self.spent_s = projected_s, limit_s, spent_s


def cost_guard(config: dict, setup: TrialSetup):
    """The probe (cnnclf.train's) that stops a search trial whose projected training time is over the limit.

    Injected `probe` faults (a sleep) count as time the timed steps took, as a slower device would.
    """
    if setup.max_trial_s is None:
        return None

    def probe(pace) -> None:
        t = time.perf_counter()
        fire(list(setup.faults), "probe", config, 0)
        extra = time.perf_counter() - t
        projected = pace.projected_s(extra_s=extra)
        if projected > setup.max_trial_s:
            raise TooSlow(projected, setup.max_trial_s, pace.spent + pace.seconds + extra)

    return probe


def device_seconds(metrics: dict, extra: dict) -> dict:
    """GPU-seconds and CPU core-seconds so far: the trial's share of each times its training seconds."""
    seconds = metrics.get("cost/train_s")
    if seconds is None:
        return {}
    return {"cost/gpu_s": extra["resources/gpu"] * seconds, "cost/cpu_s": extra["resources/cpu"] * seconds}


def system_metrics(device: str) -> dict:
    """This trial's own figures (the driver's system metrics would measure the wrong process): peak
    memory in MiB (the device's allocator on CUDA, else the worker's peak resident set, which a reused
    actor carries over from its earlier trials) and, where NVML is there, GPU utilization in percent."""

    if device == "cuda":
        out = {"system/peak_mem_mb": torch.cuda.max_memory_allocated() / 2**20}
        with contextlib.suppress(Exception):  # needs pynvml; absent, the figure is left out
            out["system/gpu_util_pct"] = float(torch.cuda.utilization())
        return out
    return {"system/peak_mem_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}  # Linux: KiB


def task_data(arrays: dict):

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # object-store arrays are read-only; nothing writes to them
        return TaskData(**{k: torch.from_numpy(v) if hasattr(v, "dtype") else v for k, v in arrays.items()})


def train_or_oom(cfg: TrainConfig, data, report, device: str, resume=None, probe=None) -> dict | None:
    """`cnnclf.train.train`, with running out of device memory turned into a recorded failure.

    Out of memory is a property of the configuration (batch, width), not bad luck: retrying
    cannot help. The trial's tensors are freed (they live in train()'s frame, gone once the
    exception is caught) and the allocator's cache emptied, so that later trials get the memory;
    the result is the worst score for Optuna, so TPE learns. Returns None when training ran.
    The cost guard's verdict (TooSlow) is a recorded outcome too: `too_slow`, with the projection.
    """

    try:
        train(cfg, data, report, device=device, resume=resume, probe=probe)
        return None
    except TooSlow as e:  # what it cost until it was stopped counts in the sweep's totals
        return {"failure": "too_slow", "error": str(e), "cost/projected_s": e.projected_s, "cost/train_s": e.spent_s}
    except torch.OutOfMemoryError as e:
        message = str(e).splitlines()[0][:300] if str(e) else "out of memory"
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
    allocated = torch.cuda.memory_allocated() / 2**20 if torch.cuda.is_available() else 0.0
    return {"failure": "oom", "error": f"torch.OutOfMemoryError: {message}", "resources/gpu_mem_after_mb": allocated}


def prune_checkpoints(folder: Path, now: float | None = None) -> list[Path]:
    """Delete a trial's old checkpoints: keep the newest, the best by val/acc, and all from the last
    KEEP_RECENT_S seconds.

    Tune itself keeps them all (num_to_keep=None) because its own pruning deletes a checkpoint
    before its next experiment snapshot stops pointing at it: a driver killed in between leaves a
    trial that cannot be restored. Pruning with a lag longer than the snapshot period avoids that.
    """
    now = time.time() if now is None else now
    found = []
    for d in folder.glob("checkpoint_*"):
        try:
            m = json.loads((d / METRICS_FILE).read_text())
            found.append((m.get("epoch", 0), m.get(METRIC, -1.0), d.stat().st_mtime, d))
        except (OSError, ValueError):
            continue  # being written, or cut short: not ours to judge
    if len(found) <= 2:
        return []
    keep = {max(found, key=lambda f: f[0])[3], max(found, key=lambda f: (f[1], f[0]))[3]}
    gone = []
    for _epoch, _acc, mtime, d in found:
        if d not in keep and now - mtime > KEEP_RECENT_S:
            shutil.rmtree(d, ignore_errors=True)
            gone.append(d)
    return gone


def read_checkpoint(folder: Path) -> tuple[dict, dict] | None:
    """(state, metrics) of a checkpoint folder, or None when it is incomplete, unreadable or not ours."""

    try:
        metrics = json.loads((folder / METRICS_FILE).read_text())
        state = load_checkpoint(folder / CHECKPOINT_FILE)  # weights_only: nothing in it runs
    except CheckpointError as e:  # cut short by a crash, or not ours: the trial does without it
        print(f"ignoring checkpoint: {e}", file=sys.stderr, flush=True)
        return None
    except (OSError, ValueError):  # no metrics file yet: a write cut short by a crash
        return None
    return (state, metrics) if state.get("epoch") == metrics.get("epoch") else None


def checkpoint_dirs(folders: list[Path]) -> dict[int, Path]:
    """epoch -> the newest checkpoint folder of that epoch with readable metrics, across `folders`."""
    found: dict[int, tuple[float, Path]] = {}
    for folder in folders:
        for d in folder.glob("checkpoint_*") if folder.is_dir() else ():
            with contextlib.suppress(OSError, ValueError):
                epoch = int(json.loads((d / METRICS_FILE).read_text()).get("epoch", 0))
                mtime = d.stat().st_mtime
                if epoch > 0 and (epoch not in found or mtime > found[epoch][0]):
                    found[epoch] = (mtime, d)
    return {e: d for e, (_, d) in found.items()}


def write_checkpoint_dir(folder: Path, state: dict, metrics: dict) -> None:

    save_checkpoint(state, folder / CHECKPOINT_FILE)
    (folder / METRICS_FILE).write_text(json.dumps(metrics))
