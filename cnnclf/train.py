"""The training loop: a plain function of a config, the data and a `report` callback.

    result = train(cfg, data, report=lambda epoch, metrics, save_checkpoint: ...)

`report` is called once per epoch with docs/tracking.md's metric names; `save_checkpoint(path)`
writes everything needed to resume (model, optimizer, schedule, RNG state, epoch: cnnclf/checkpoint.py), and
`train(..., resume=path)` continues from it to the same result as an uninterrupted run.
No Ray, Optuna or MLflow here: sweeps/ adapts this to Tune and MLflow.

With `cfg.compile` on (auto: on CUDA), the forward pass, loss and accuracy count are one
`torch.compile`d function (its backward compiled with it); on CUDA in "reduce-overhead" mode, so
that forward and backward each replay as one CUDA graph: what makes batch 4 fast. The optimizer
step stays torch's fused kernel. Every compiled step has one shape: the ragged last batch of each
epoch is dropped (cnnclf.device.steps_per_epoch).

What a run builds from its config lives in cnnclf/recipe.py, the device, compile and autocast settings in
cnnclf/device.py, checkpoints in cnnclf/checkpoint.py; their names are importable from here as well.
"""

from __future__ import annotations

import functools
import itertools
import os
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

# Re-exported (noqa: F401): tests/, sweeps/ and benchmarks/ import these names from cnnclf.train.
from cnnclf.checkpoint import (  # noqa: F401
    CHECKPOINT_FORMAT,
    CheckpointError,
    CheckpointWriteError,
    check_format,
    load_checkpoint,
    load_model,
    save_checkpoint,
)
from cnnclf.config import TrainConfig
from cnnclf.data import Normalizer, TaskData, make_augment, normalization, train_batches
from cnnclf.device import (  # noqa: F401
    COMPILE_MODES,
    WARMUP_STEPS,
    autocast,
    compile_mode,
    reset_compiled,
    resolve_device,
    steps_per_epoch,
)
from cnnclf.evaluation import evaluate, test_metrics
from cnnclf.pace import PROBE_S, PROBE_STEPS, Pace, Probe, pace_now, probe_due  # noqa: F401
from cnnclf.recipe import check_model_fits, epoch_seed, lr_factor, make_optimizer, model_for  # noqa: F401

SaveCheckpoint = Callable[[str | os.PathLike], None]
Report = Callable[[int, dict, SaveCheckpoint | None], None]
# A non-finite loss stays non-finite in the running sum, so checking the sum every few steps catches divergence
# within those steps without a host sync (CUDA) or a Python call (CPU) on every step.
CHECK_EVERY = 16
COST_KEYS = ("cost/train_s", "cost/images")


@functools.cache
def cpu_has_bf16() -> bool:
    """Whether this CPU computes bfloat16 natively (AVX512-BF16 or AMX; Linux's /proc/cpuinfo flags). Without
    them torch emulates bf16 and autocast is slower than float32."""
    try:
        flags = Path("/proc/cpuinfo").read_text(errors="replace").split()
    except OSError:
        return False
    return "avx512_bf16" in flags or "amx_bf16" in flags


def uses_bf16(cfg: TrainConfig, device: torch.device) -> bool:
    """Whether `cfg` runs its forward passes under bfloat16 autocast on `device` (no loss scaling needed).
    auto: on CUDA, and on a CPU with bf16 units, where it trained a CNN 1.6x faster than float32 (2.3x with
    channels-last tensors; docs/results.md); float32 elsewhere."""
    if cfg.precision != "auto":
        return cfg.precision == "bf16"
    return device.type == "cuda" or (device.type == "cpu" and cpu_has_bf16())


def train(
    cfg: TrainConfig,
    data: TaskData,
    report: Report | None = None,
    *,
    device: str | torch.device | None = None,
    resume: str | os.PathLike | dict | None = None,
    probe: Probe | None = None,
) -> dict:
    """Train `cfg` on `data`; returns the final metrics plus `status` ("completed" or "diverged").

    `data` may already sit on the device (the sweeps move it once per trial); if not, it is
    moved here. The test set is evaluated once, after the last epoch, and never steers anything.
    `resume`: a checkpoint's path, or the state load_checkpoint read from one (CheckpointError for a format
    this version does not read).
    `probe` is called once with the run's `Pace`, after PROBE_STEPS timed steps or PROBE_S seconds of
    the first epoch trained in this process (at that epoch's end if it is shorter); it may raise to
    stop the run there (the sweeps' cost guard).
    """
    device = resolve_device(device)
    mode = compile_mode(cfg, device)  # cfg.compile may name torch.compile's mode (benchmarks compare them)
    if mode is None:
        return _train(_Run(cfg, data, device, None), resume, report, probe)
    reset_compiled()
    try:
        return _train(_Run(cfg, data, device, mode), resume, report, probe)
    finally:
        reset_compiled()  # the CUDA-graph memory pools go with the run, also when it fails (out of memory)


def _train(run: _Run, resume: str | os.PathLike | dict | None, report: Report | None, probe: Probe | None) -> dict:
    """The loop: restore, then epoch by epoch train, measure and report (with a checkpoint writer), to the last
    epoch or the first non-finite loss."""
    metrics = run.restore(resume) if resume is not None else {}
    status = "completed"
    for epoch in range(run.start_epoch + 1, run.cfg.epochs + 1):
        first = epoch == run.start_epoch + 1  # the probe measures the first epoch trained in this process
        trained = run.train_epoch(epoch, probe if first else None)
        metrics = run.epoch_metrics(epoch, trained)
        if report is not None:
            report(epoch, dict(metrics), None if trained.diverged else run.saver(epoch, dict(metrics)))
        if trained.diverged:
            status = "diverged"
            break
    return run.result(metrics, status)


@dataclass(frozen=True)
class _Epoch:
    """An epoch's training pass as measured: what its metrics are made of."""

    start: float  # perf_counter at its start
    train_s: float  # the timed steps' seconds (the compile and record steps of a compiled run's first epoch left out)
    seen: int  # images trained on
    timed_images: int  # of them, in the timed steps
    loss_sum: torch.Tensor  # on the device: summed over the images
    correct: torch.Tensor
    diverged: bool  # a non-finite loss: the epoch stopped there


class _Run:
    """One call of `train`: what it builds once from the config and the data (the model, optimizer and schedule,
    the training step, compiled or not), where it starts (a checkpoint's epoch) and what it has cost so far.
    Its methods are the loop's steps."""

    def __init__(self, cfg: TrainConfig, data: TaskData, device: torch.device, mode: str | None) -> None:
        self.started = time.perf_counter()
        self.cfg, self.device, self.mode = cfg, device, mode
        self.data = data.to(device)
        torch.manual_seed(cfg.seed)  # model initialization
        model = model_for(cfg, len(self.data.classes)).to(device)
        self.bf16 = uses_bf16(cfg, device)
        if self.bf16:  # convolutions in bf16 are fastest on channels-last tensors (oneDNN on the CPU, cuDNN)
            model = model.to(memory_format=torch.channels_last)
        self.model, self.optimizer = model, make_optimizer(cfg, model)
        self.n_steps = steps_per_epoch(len(self.data.train_y), cfg.batch_size, fixed_shapes=mode is not None)
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(self.optimizer, lr_factor(cfg, self.n_steps))
        self.constant_lr = cfg.schedule == "constant" and int(cfg.warmup_epochs * self.n_steps) == 0
        criterion = nn.CrossEntropyLoss(label_smoothing=cfg.label_smoothing)
        self.step_fn = _step_fn(model, criterion, device, self.bf16, mode)
        self.graphs = mode is not None and device.type == "cuda" and "reduce-overhead" in mode
        self.mean, self.std = normalization(cfg.normalize, self.data)
        self.normalize = Normalizer(self.mean, self.std, device)
        self.augment = make_augment(cfg.augment)
        self.n_params = float(sum(p.numel() for p in model.parameters()))
        self.start_epoch, self.elapsed_before = 0, 0.0
        # What the run has cost so far, carried across resumes in the checkpoint's metrics: training
        # seconds (each epoch's wall time, its validation included) and images seen.
        self.cost = dict.fromkeys(COST_KEYS, 0.0)
        self.compile_s: float | None = None  # a compiled run's first epoch in this process sets it

    def restore(self, resume: str | os.PathLike | dict) -> dict:
        """Continue from a checkpoint: the model, optimizer, schedule and torch's RNG as they were, its epoch,
        seconds and cost; returns its last epoch's metrics (the result when nothing is left to train)."""
        if isinstance(resume, dict):  # read by load_checkpoint (the CLI's, a sweep trial's), or built by the caller
            check_format(resume, "the checkpoint to resume")
        state = resume if isinstance(resume, dict) else load_checkpoint(resume)
        self.model.load_state_dict(state["model"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        torch.set_rng_state(state["rng"]["torch"])  # a format 1 checkpoint's Python `random` state is not needed
        self.start_epoch, self.elapsed_before = state["epoch"], state.get("seconds", 0.0)
        metrics = dict(state.get("metrics") or {})
        self.cost = {k: float(metrics.get(k, 0.0)) for k in COST_KEYS}
        return metrics

    def train_epoch(self, epoch: int, probe: Probe | None) -> _Epoch:
        """One pass over the training images in (seed, epoch)'s order; `probe`, when given, is called once with
        the run's pace (see train). Stops at a non-finite loss."""
        cfg, device, n_steps, bf16, graphs, constant_lr = (
            self.cfg, self.device, self.n_steps, self.bf16, self.graphs, self.constant_lr
        )  # fmt: skip
        optimizer, scheduler, step_fn = self.optimizer, self.scheduler, self.step_fn
        self.model.train()
        g = torch.Generator(device=device).manual_seed(epoch_seed(cfg.seed, epoch))
        # A compiled run's first steps in this process compile and record: timed apart, as
        # time/compile_s, and left out of throughput/train_img_s (always at least one step timed).
        warmup = min(WARMUP_STEPS, n_steps - 1) if self.mode is not None and self.compile_s is None else 0
        t0 = time.perf_counter()
        t_timed, seen_warmup = t0, 0
        loss_sum = torch.zeros((), device=device)
        correct = torch.zeros((), device=device, dtype=torch.int64)
        seen, diverged, probing = 0, False, probe is not None
        batches = train_batches(self.data.train_x, self.data.train_y, cfg.batch_size, self.normalize, self.augment, g)
        for step, (xb, yb) in enumerate(itertools.islice(batches, n_steps)):
            if warmup and step == warmup:
                if device.type == "cuda":
                    torch.cuda.synchronize(device)
                t_timed, seen_warmup = time.perf_counter(), seen
            if bf16:
                xb = xb.contiguous(memory_format=torch.channels_last)
            optimizer.zero_grad(set_to_none=True)
            if graphs:
                torch.compiler.cudagraph_mark_step_begin()  # the last step's graph outputs are no longer read
            loss, step_correct = step_fn(xb, yb)
            loss.backward()
            optimizer.step()
            if not constant_lr:
                scheduler.step()
            loss_sum += loss.detach() * len(yb)
            correct += step_correct
            seen += len(yb)
            if probing and step >= warmup and probe_due(step - warmup + 1, t_timed):
                per_epoch = n_steps * cfg.batch_size
                left = per_epoch - seen + per_epoch * (cfg.epochs - epoch)
                probe(pace_now(device, (t0, t_timed), seen - seen_warmup, left, self.cost))
                probing = False
            if step % CHECK_EVERY == CHECK_EVERY - 1 and not torch.isfinite(loss_sum):
                diverged = True
                break
        diverged = diverged or not torch.isfinite(loss_sum)
        if probing and not diverged:  # an epoch shorter than the probe's steps: measured whole
            probe(pace_now(device, (t0, t_timed), seen - seen_warmup, seen * (cfg.epochs - epoch), self.cost))
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        train_s = time.perf_counter() - t_timed
        if self.mode is not None and self.compile_s is None:
            # The warm-up steps' wall time, less what they would have taken at the timed steps' pace.
            per_image = train_s / max(1, seen - seen_warmup)
            self.compile_s = max(0.0, t_timed - t0 - seen_warmup * per_image) if seen_warmup else train_s
        return _Epoch(t0, train_s, seen, seen - seen_warmup, loss_sum, correct, diverged)

    def evaluate(self, split: str) -> dict:
        """evaluate() on the "val" or "test" images."""
        x, y = getattr(self.data, f"{split}_x"), getattr(self.data, f"{split}_y")
        return evaluate(self.model, (x, y), self.normalize, len(self.data.classes), bf16=self.bf16)

    def epoch_metrics(self, epoch: int, trained: _Epoch) -> dict:
        """An epoch's metrics, validation included (a diverged epoch's losses and val/acc: NaN), with the
        run's cost so far; the last epoch's carry the test metrics."""
        val = None if trained.diverged else self.evaluate("val")
        epoch_s = time.perf_counter() - trained.start
        nan = float("nan")
        metrics = {
            "epoch": epoch,
            "train/loss": nan if val is None else trained.loss_sum.item() / trained.seen,
            "train/acc": trained.correct.item() / max(1, trained.seen),
            "val/loss": nan if val is None else val["loss"],
            "val/acc": nan if val is None else val["acc"],
            "diverged": float(trained.diverged),
            "time/epoch_s": epoch_s,
            "throughput/train_img_s": trained.timed_images / max(trained.train_s, 1e-9),
            "train/lr": self.optimizer.param_groups[0]["lr"],
            **_spent(self.cost, epoch_s, trained.seen, self.n_params),
        }
        if self.compile_s is not None and epoch == self.start_epoch + 1:
            metrics["time/compile_s"] = self.compile_s  # the first epoch trained in this process
        if epoch == self.cfg.epochs and val is not None:
            t_test = time.perf_counter()
            test = self.evaluate("test")
            metrics["time/test_s"] = time.perf_counter() - t_test  # part of a trial's work, not of the sweep's
            metrics.update(test_metrics(test, self.data.classes))
        return metrics

    def checkpoint_state(self, epoch: int, metrics: dict) -> dict:
        # Tensors and plain types only, so that torch.load(weights_only=True) reads it back.
        return {
            "format": CHECKPOINT_FORMAT,
            "config": self.cfg.to_dict(),
            "classes": list(self.data.classes),
            "normalization": {"mean": [float(v) for v in self.mean], "std": [float(v) for v in self.std]},
            "epoch": epoch,
            "seconds": self.elapsed_before + time.perf_counter() - self.started,
            "metrics": {k: v for k, v in metrics.items() if isinstance(v, (int, float, list))},
            "model": self.model.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict(),
            "rng": {"torch": torch.get_rng_state()},
        }

    def saver(self, epoch: int, metrics: dict) -> SaveCheckpoint:
        """`report`'s save_checkpoint: writes this epoch's state when called (atomically: save_checkpoint)."""

        def save(path: str | os.PathLike) -> None:
            save_checkpoint(self.checkpoint_state(epoch, metrics), path)

        return save

    def result(self, metrics: dict, status: str) -> dict:
        """train()'s answer: the last epoch's metrics (of a finished checkpoint that lacks them: measured now),
        the confusion matrix apart, and how the run went."""
        if self.start_epoch >= self.cfg.epochs and "test/acc" not in metrics:
            val, test = self.evaluate("val"), self.evaluate("test")
            metrics = {**metrics, "epoch": self.start_epoch, "val/loss": val["loss"], "val/acc": val["acc"]}
            metrics.update(test_metrics(test, self.data.classes))
        result = dict(metrics)
        confusion = result.pop("test/confusion", None)
        if self.compile_s is not None:
            result["time/compile_s"] = self.compile_s
        result.update(
            compile_mode=self.mode,
            precision="bf16" if self.bf16 else "fp32",
            status=status,
            epochs=metrics.get("epoch", self.start_epoch),
            seconds=self.elapsed_before + time.perf_counter() - self.started,
            classes=self.data.classes,
            confusion=confusion,
        )
        return result


def _step_fn(
    model: nn.Module, criterion: nn.Module, device: torch.device, bf16: bool, mode: str | None
) -> Callable[[torch.Tensor, torch.Tensor], tuple[torch.Tensor, torch.Tensor]]:
    """The training step's forward pass: (loss, correct count) of a batch; torch.compile'd in `mode`."""

    def forward_loss(xb: torch.Tensor, yb: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        with autocast(device, bf16):
            out = model(xb)
            loss = criterion(out, yb)
        return loss, (out.argmax(1) == yb).sum()

    return forward_loss if mode is None else torch.compile(forward_loss, mode=mode, dynamic=False)


def _spent(cost: dict, seconds: float, images: int, n_params: float) -> dict:
    """Add an epoch to the run's running cost; the cost metrics as of this epoch."""
    cost["cost/train_s"] += seconds
    cost["cost/images"] += images
    return {**cost, "model/params": n_params}
