"""One trial's Ray side, run in its worker: the resources Ray assigned, Tune's reports and checkpoints, and the
point the trial resumes from. `sweeps/worker.py` imports this module when the trial runs; the rest of the trial
(`sweeps/trainable.py`) imports without Ray, as the GPU machine's tests need (tests/test_gpu.py).

Checkpoints load with `weights_only=True` (cnnclf.train.load_checkpoint): one that holds anything
but tensors and plain types is ignored, never run.
"""

from __future__ import annotations

import contextlib
import json
import os
import tempfile
from pathlib import Path

import ray
import torch
from ray import tune

from sweeps.faults import fire
from sweeps.spec import METRIC, trial_config
from sweeps.trainable import (
    CHECKPOINT_FILE,
    METRICS_FILE,
    TrialSetup,
    checkpoint_dirs,
    cost_guard,
    device_seconds,
    prune_checkpoints,
    read_checkpoint,
    system_metrics,
    task_data,
    train_or_oom,
    write_checkpoint_dir,
)


def run_trial(config: dict, data: dict, setup: TrialSetup) -> None:
    """`data`: TaskData's fields as arrays, in the Ray object store once and shared by a node's trials."""

    cfg = trial_config(config, setup.base, setup.baseline)
    ctx = ray.get_runtime_context()
    assigned = ctx.get_assigned_resources()
    torch.set_num_threads(max(1, int(assigned.get("CPU", 1))))
    # torch.compile's worker pool takes the trial's CPU share, not the machine's (trials share a node).
    os.environ.setdefault("TORCHINDUCTOR_COMPILE_THREADS", str(max(1, int(assigned.get("CPU", 1)))))
    device = "cuda" if assigned.get("GPU", 0) > 0 and torch.cuda.is_available() else "cpu"
    extra = {
        "resources/gpu": float(assigned.get("GPU", 0)),
        "resources/cpu": float(assigned.get("CPU", 0)),
        "node_id": ctx.get_node_id(),
    }
    trial_id = tune.get_context().get_trial_id()
    own_folder = None
    if "://" not in setup.experiment_path:
        own_folder = Path(setup.experiment_path) / f"{config.get('role', 'trial')}-{trial_id}"
    found = _resume_point(config, own_folder, extra)
    ended = bool((config.get("adopt") or {}).get("ended")) or trial_id in setup.finished
    if found is not None and (found[1]["epoch"] >= cfg.epochs or ended) and METRIC in found[1]:
        return  # the trial had ended before the driver went down; it is not trained twice

    trained = [found[1].get("epoch", 0) if found else 0]  # the last epoch trained (a failure's result says it)

    def report(epoch: int, metrics: dict, save) -> None:
        trained[0] = epoch
        m = {**metrics, **extra, **system_metrics(device), **device_seconds(metrics, extra)}
        fire(list(setup.faults), "epoch_end", config, epoch)
        if m.get("diverged"):
            # The worst accuracy, not NaN: ASHA never stops a NaN trial and Optuna cannot record
            # one; with 0.0 both treat the trial as the worst, and TPE learns to avoid it.
            m.update({METRIC: 0.0, "val/loss": float("inf"), "train/loss": float("inf")})
        if save is None:
            tune.report(m)
            return
        with tempfile.TemporaryDirectory() as d:
            save(Path(d) / CHECKPOINT_FILE)
            fire(list(setup.faults), "checkpoint", config, epoch)
            (Path(d) / METRICS_FILE).write_text(json.dumps(m))  # beside the state: replayed after a crash
            tune.report(m, checkpoint=tune.Checkpoint.from_directory(d))
        if own_folder is not None:
            prune_checkpoints(own_folder)

    probe = cost_guard(config, setup) if config.get("role", "trial") == "trial" else None  # never the baseline
    failure = train_or_oom(cfg, task_data(data), report, device=device, resume=found and found[0], probe=probe)
    if failure is not None:
        tune.report({"epoch": trained[0], METRIC: 0.0, **failure, **extra, **device_seconds(failure, extra)})


def _resume_point(config: dict, own_folder: Path | None, extra: dict) -> tuple[dict, dict] | None:
    """(state, metrics) of the newest complete checkpoint: Tune's, a newer one in this trial's folder
    (written after Tune's last snapshot), or one of the trial this one continues (`adopt`).

    Epochs that finished after the driver's last look (it went down) are reported again, in order,
    so nothing they measured is lost (the MLflow writer skips epochs it has logged); the newest goes
    with its checkpoint, so Tune knows it from now on.
    """

    folders = [Path(d) for d in (config.get("adopt") or {}).get("dirs", [])]
    if own_folder is not None:
        folders.append(own_folder)
    found, tune_epoch = None, 0
    checkpoint = tune.get_checkpoint()
    if checkpoint is not None:
        with checkpoint.as_directory() as d:
            found = read_checkpoint(Path(d))
        tune_epoch = found[1]["epoch"] if found else 0
    on_disk = checkpoint_dirs(folders)
    for epoch in sorted((e for e in on_disk if e > tune_epoch), reverse=True):
        if (newer := read_checkpoint(on_disk[epoch])) is not None:
            found = newer
            break
    if found is not None and found[1]["epoch"] > tune_epoch:
        for epoch in sorted(e for e in on_disk if tune_epoch < e < found[1]["epoch"]):
            with contextlib.suppress(OSError, ValueError):
                tune.report({**json.loads((on_disk[epoch] / METRICS_FILE).read_text()), **extra, "replayed": 1.0})
        with tempfile.TemporaryDirectory() as d:
            write_checkpoint_dir(Path(d), found[0], {**found[1], **extra})
            tune.report({**found[1], **extra, "replayed": 1.0}, checkpoint=tune.Checkpoint.from_directory(d))
    return found
