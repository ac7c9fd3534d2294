"""The training loop: a plain function of a config, the data and a `report` callback.

    result = train(cfg, data, report=lambda epoch, metrics, save_checkpoint: ...)

`report` is called once per epoch with docs/tracking.md's metric names; `save_checkpoint(path)`
writes everything needed to resume (model, optimizer, schedule, RNG state, epoch), and
`train(..., resume=path)` continues from it to the same result as an uninterrupted run.
No Ray, Optuna or MLflow here: sweeps/ adapts this to Tune and MLflow.

With `cfg.compile` on (auto: on CUDA), the forward pass, loss and accuracy count are one
`torch.compile`d function (its backward compiled with it); on CUDA in "reduce-overhead" mode, so
that forward and backward each replay as one CUDA graph: what makes batch 4 fast. The optimizer
step stays torch's fused kernel. Every compiled step has one shape: the ragged last batch of each
epoch is dropped (see `steps_per_epoch`).
"""

from __future__ import annotations

import contextlib
import errno
import functools
import itertools
import math
import os
import random
import time
from collections.abc import Callable
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import NoReturn

import torch
from torch import nn

from cnnclf.args import first_line
from cnnclf.config import TrainConfig
from cnnclf.data import Normalizer, TaskData, eval_batches, make_augment, normalization, train_batches
from cnnclf.models import build_model
from cnnclf.pace import PROBE_S, PROBE_STEPS, Pace, Probe, pace_now, probe_due  # noqa: F401 (re-exported)

SaveCheckpoint = Callable[[str | os.PathLike], None]
Report = Callable[[int, dict, SaveCheckpoint | None], None]


@dataclass(frozen=True)
class Hooks:
    report: Report | None = None
    probe: Probe | None = None


def resolve_device(device: str | torch.device | None = None) -> torch.device:
    if device is None or str(device) == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise RuntimeError("--device cuda was asked for, but torch sees no CUDA device")
    return device


def model_for(cfg: TrainConfig, num_classes: int) -> nn.Module:
    return build_model(
        cfg.model,
        num_classes=num_classes,
        depth=cfg.depth,
        kernel_size=cfg.kernel_size,
        width=cfg.width,
        image_size=cfg.image_size,
    )


def check_model_fits(cfg: TrainConfig, num_classes: int = 2) -> None:
    """Build cfg's model on the meta device and push one batch through it: a shape that does not fit
    (the tutorial net at 64x64) fails here in milliseconds, with ValueError, not after the data is decoded."""
    s = cfg.image_size
    try:
        with torch.device("meta"):
            model_for(cfg, num_classes)(torch.zeros(1, 3, s, s))
    except Exception as e:
        raise ValueError(f"the {cfg.model} model does not take {s}x{s} images ({str(e).splitlines()[0]})") from None


def make_optimizer(cfg: TrainConfig, model: nn.Module) -> torch.optim.Optimizer:
    # No weight decay on BatchNorm and bias parameters: decaying them only fights the scale.
    decay = [p for p in model.parameters() if p.ndim > 1]
    no_decay = [p for p in model.parameters() if p.ndim <= 1]
    groups = [{"params": decay, "weight_decay": cfg.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    # fused=True: one kernel per step for all parameters, on the CPU as on CUDA; at batch 4 the
    # per-parameter Python loop of the default implementation is a large share of a step.
    if cfg.optimizer == "sgd":
        return torch.optim.SGD(
            groups, lr=cfg.lr, momentum=cfg.momentum, nesterov=cfg.nesterov and cfg.momentum > 0, fused=True
        )
    if cfg.optimizer == "adam":
        return torch.optim.Adam(groups, lr=cfg.lr, amsgrad=cfg.amsgrad, fused=True)
    if cfg.optimizer == "adamw":
        return torch.optim.AdamW(groups, lr=cfg.lr, amsgrad=cfg.amsgrad, fused=True)
    raise ValueError(f"unknown optimizer {cfg.optimizer!r}")


def lr_factor(cfg: TrainConfig, steps_per_epoch: int) -> Callable[[int], float]:
    """Multiplier of the peak lr at a step: linear warm-up, then constant, cosine or linear decay."""
    warm = int(cfg.warmup_epochs * steps_per_epoch)
    total = cfg.epochs * steps_per_epoch

    def factor(step: int) -> float:
        if step < warm:
            return (step + 1) / warm
        p = min(1.0, (step - warm) / max(1, total - warm))
        if cfg.schedule == "cosine":
            return 0.5 * (1 + math.cos(math.pi * p))
        if cfg.schedule == "linear":
            return 1 - p
        return 1.0

    return factor


def _epoch_seed(seed: int, epoch: int) -> int:
    # Each epoch's shuffle and augmentation depend on (seed, epoch) alone, so a resumed run
    # draws exactly the batches the uninterrupted run would have drawn.
    return (seed * 1_000_003 + epoch * 7919) % (2**63)


# torch.compile mode per device: CUDA graphs remove the per-kernel launch cost that dominates small
# batches on a GPU; on the CPU there are no graphs to replay.
COMPILE_MODES = {"cuda": "reduce-overhead", "cpu": "default"}
WARMUP_STEPS = 3  # compiled: the 1st step compiles (forward, then backward), the 2nd records CUDA graphs


def compile_mode(cfg: TrainConfig, device: torch.device) -> str | None:
    """The torch.compile mode `cfg` trains with on `device`, or None for eager."""
    on = cfg.compile == "on" or (cfg.compile == "auto" and device.type == "cuda")
    return COMPILE_MODES.get(device.type, "default") if on else None


def steps_per_epoch(n: int, batch_size: int, fixed_shapes: bool) -> int:
    """Optimizer steps in an epoch of `n` images.

    Eager: every image, the last batch ragged. Compiled (`fixed_shapes`): the ragged last batch is
    dropped, not padded. Padding would put made-up images into BatchNorm's batch statistics and need
    a masked loss; dropping keeps every step the same computation. Each epoch's shuffle differs, so
    the (at most batch_size - 1) images left out differ too. With fewer images than one batch, the
    one batch of `n` is the fixed shape.
    """
    if fixed_shapes and n >= batch_size:
        return n // batch_size
    return math.ceil(n / batch_size)


def _reset_compiled() -> None:
    # Dynamo's caches and the CUDA-graph pools of an earlier train() in this process (a reused sweep
    # worker) are freed, and its recompile limit (8 per function) never turns a later trial eager.
    import torch._dynamo

    torch._dynamo.reset()
    if torch.cuda.is_initialized():
        try:
            from torch._inductor.cudagraph_trees import reset_cudagraph_trees

            reset_cudagraph_trees()
        except (ImportError, AttributeError):
            pass


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


def _autocast(device: torch.device, bf16: bool):
    return torch.autocast(device.type, dtype=torch.bfloat16) if bf16 else nullcontext()


@torch.no_grad()
def evaluate(
    model: nn.Module,
    x: torch.Tensor,
    y: torch.Tensor,
    normalize: Normalizer,
    num_classes: int,
    batch_size: int = 1024,
    bf16: bool | None = None,
) -> dict:
    """Accuracy, mean loss, per-class accuracy and confusion matrix (rows: true, cols: predicted), under
    bf16 autocast with channels-last inputs when `bf16` (None: on CUDA)."""
    was_training = model.training
    model.eval()
    device = x.device
    channels_last = bf16 = device.type == "cuda" if bf16 is None else bf16
    loss_sum = torch.zeros((), device=device, dtype=torch.float64)
    confusion = torch.zeros(num_classes * num_classes, device=device, dtype=torch.int64)
    for xb, yb in eval_batches(x, y, batch_size, normalize):
        if channels_last:
            xb = xb.contiguous(memory_format=torch.channels_last)
        with _autocast(device, bf16):
            out = model(xb)
        loss_sum += nn.functional.cross_entropy(out.float(), yb, reduction="sum")
        confusion += torch.bincount(yb * num_classes + out.argmax(1), minlength=num_classes * num_classes)
    model.train(was_training)
    confusion = confusion.view(num_classes, num_classes).cpu()
    per_class_n = confusion.sum(1).clamp_min(1)
    n = max(1, len(y))
    return {
        "acc": confusion.diag().sum().item() / n,
        "loss": loss_sum.item() / n,
        "per_class": (confusion.diag() / per_class_n).tolist(),
        "confusion": confusion.tolist(),
    }


def train(
    cfg: TrainConfig,
    data: TaskData,
    report: Report | None = None,
    *,
    device: str | torch.device | None = None,
    resume: str | os.PathLike | dict | None = None,
    mode: str | None = None,
    probe: Probe | None = None,
) -> dict:
    """Train `cfg` on `data`; returns the final metrics plus `status` ("completed" or "diverged").

    `data` may already sit on the device (the sweeps move it once per trial); if not, it is
    moved here. The test set is evaluated once, after the last epoch, and never steers anything.
    `mode` overrides the torch.compile mode of a compiled run (benchmarks compare modes).
    `probe` is called once with the run's `Pace`, after PROBE_STEPS timed steps or PROBE_S seconds of
    the first epoch trained in this process (at that epoch's end if it is shorter); it may raise to
    stop the run there (the sweeps' cost guard).
    """
    device = resolve_device(device)
    mode = (mode or compile_mode(cfg, device)) if compile_mode(cfg, device) else None
    hooks = Hooks(report, probe)
    if mode is None:
        return _train(cfg, data, hooks, device, resume, None)
    _reset_compiled()
    try:
        return _train(cfg, data, hooks, device, resume, mode)
    finally:
        _reset_compiled()  # the CUDA-graph memory pools go with the run, also when it fails (out of memory)


def _train(
    cfg: TrainConfig,
    data: TaskData,
    hooks: Hooks,
    device: torch.device,
    resume: str | os.PathLike | dict | None,
    mode: str | None,
) -> dict:
    started = time.perf_counter()
    report, probe = hooks.report, hooks.probe
    data = data.to(device)
    num_classes = len(data.classes)

    random.seed(cfg.seed)
    torch.manual_seed(cfg.seed)  # model initialization
    model = model_for(cfg, num_classes).to(device)
    bf16 = uses_bf16(cfg, device)
    if bf16:  # convolutions in bf16 are fastest on channels-last tensors (oneDNN on the CPU, cuDNN)
        model = model.to(memory_format=torch.channels_last)
    optimizer = make_optimizer(cfg, model)
    n_steps = steps_per_epoch(len(data.train_y), cfg.batch_size, fixed_shapes=mode is not None)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_factor(cfg, n_steps))
    criterion = nn.CrossEntropyLoss(label_smoothing=cfg.label_smoothing)

    def forward_loss(xb: torch.Tensor, yb: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        with _autocast(device, bf16):
            out = model(xb)
            loss = criterion(out, yb)
        return loss, (out.argmax(1) == yb).sum()

    step_fn = forward_loss if mode is None else torch.compile(forward_loss, mode=mode, dynamic=False)
    graphs = mode is not None and device.type == "cuda" and "reduce-overhead" in mode
    mean, std = normalization(cfg.normalize, data)
    normalize = Normalizer(mean, std, device)
    augment = make_augment(cfg.augment)

    start_epoch, elapsed_before = 0, 0.0
    metrics: dict = {}
    if resume is not None:
        state = resume if isinstance(resume, dict) else load_checkpoint(resume)
        model.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
        torch.set_rng_state(state["rng"]["torch"])
        version, internal, gauss = state["rng"]["python"]
        random.setstate((version, tuple(internal), gauss))
        start_epoch, elapsed_before = state["epoch"], state.get("seconds", 0.0)
        metrics = dict(state.get("metrics") or {})  # the last epoch's: the result when nothing is left to train

    def checkpoint_state(epoch: int, epoch_metrics: dict) -> dict:
        # Tensors and plain types only, so that torch.load(weights_only=True) reads it back.
        version, internal, gauss = random.getstate()
        return {
            "format": CHECKPOINT_FORMAT,
            "config": cfg.to_dict(),
            "classes": list(data.classes),
            "normalization": {"mean": [float(v) for v in mean], "std": [float(v) for v in std]},
            "epoch": epoch,
            "seconds": elapsed_before + time.perf_counter() - started,
            "metrics": {k: v for k, v in epoch_metrics.items() if isinstance(v, (int, float, list))},
            "model": model.state_dict(),
            "optimizer": optimizer.state_dict(),
            "scheduler": scheduler.state_dict(),
            "rng": {"torch": torch.get_rng_state(), "python": [version, list(internal), gauss]},
        }

    # A non-finite loss stays non-finite in the running sum, so checking the sum every few
    # steps catches divergence within those steps without a host sync (CUDA) or a Python
    # call (CPU) on every step.
    check_every = 16
    constant_lr = cfg.schedule == "constant" and int(cfg.warmup_epochs * n_steps) == 0
    status = "completed"
    compile_s: float | None = None
    # What the run has cost so far, carried across resumes in the checkpoint's metrics: training
    # seconds (each epoch's wall time, its validation included) and images seen.
    cost = {k: float(metrics.get(k, 0.0)) for k in ("cost/train_s", "cost/images")}
    n_params = float(sum(p.numel() for p in model.parameters()))
    for epoch in range(start_epoch + 1, cfg.epochs + 1):
        model.train()
        g = torch.Generator(device=device).manual_seed(_epoch_seed(cfg.seed, epoch))
        # A compiled run's first steps in this process compile and record: timed apart, as
        # time/compile_s, and left out of throughput/train_img_s (always at least one step timed).
        warmup = min(WARMUP_STEPS, n_steps - 1) if mode is not None and compile_s is None else 0
        t0 = time.perf_counter()
        t_timed, seen_warmup = t0, 0
        loss_sum = torch.zeros((), device=device)
        correct = torch.zeros((), device=device, dtype=torch.int64)
        seen = 0
        diverged = False
        batches = train_batches(data.train_x, data.train_y, cfg.batch_size, normalize, augment, g)
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
            if probe is not None and step >= warmup and probe_due(step - warmup + 1, t_timed):
                per_epoch = n_steps * cfg.batch_size
                left = per_epoch - seen + per_epoch * (cfg.epochs - epoch)
                probe(pace_now(device, (t0, t_timed), seen - seen_warmup, left, cost))
                probe = None
            if step % check_every == check_every - 1 and not torch.isfinite(loss_sum):
                diverged = True
                break
        if not diverged and not torch.isfinite(loss_sum):
            diverged = True
        if probe is not None and not diverged:  # an epoch shorter than the probe's steps: measured whole
            probe(pace_now(device, (t0, t_timed), seen - seen_warmup, seen * (cfg.epochs - epoch), cost))
            probe = None
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        train_s = time.perf_counter() - t_timed
        timed_images = seen - seen_warmup
        if mode is not None and compile_s is None:
            # The warm-up steps' wall time, less what they would have taken at the timed steps' pace.
            warmup_s = t_timed - t0
            per_image = train_s / max(1, timed_images)
            compile_s = max(0.0, warmup_s - seen_warmup * per_image) if seen_warmup else train_s
        if diverged:
            status = "diverged"
            metrics = {
                "epoch": epoch,
                "train/loss": float("nan"),
                "train/acc": correct.item() / max(1, seen),
                "val/loss": float("nan"),
                "val/acc": float("nan"),
                "diverged": 1.0,
                "time/epoch_s": time.perf_counter() - t0,
                "throughput/train_img_s": timed_images / max(train_s, 1e-9),
                "train/lr": optimizer.param_groups[0]["lr"],
                **_spent(cost, time.perf_counter() - t0, seen, n_params),
            }
            if compile_s is not None and epoch == start_epoch + 1:
                metrics["time/compile_s"] = compile_s
            if report is not None:
                report(epoch, metrics, None)
            break
        val = evaluate(model, data.val_x, data.val_y, normalize, num_classes, bf16=bf16)
        epoch_s = time.perf_counter() - t0
        metrics = {
            "epoch": epoch,
            "train/loss": loss_sum.item() / seen,
            "train/acc": correct.item() / seen,
            "val/loss": val["loss"],
            "val/acc": val["acc"],
            "diverged": 0.0,
            "time/epoch_s": epoch_s,
            "throughput/train_img_s": timed_images / train_s,
            "train/lr": optimizer.param_groups[0]["lr"],
            **_spent(cost, epoch_s, seen, n_params),
        }
        if compile_s is not None and epoch == start_epoch + 1:
            metrics["time/compile_s"] = compile_s  # the first epoch trained in this process
        if epoch == cfg.epochs:
            t_test = time.perf_counter()
            test = evaluate(model, data.test_x, data.test_y, normalize, num_classes, bf16=bf16)
            metrics["time/test_s"] = time.perf_counter() - t_test  # part of a trial's work, not of the sweep's
            metrics.update(test_metrics(test, data.classes))
        if report is not None:
            report(epoch, dict(metrics), _saver(checkpoint_state, epoch, dict(metrics)))

    if start_epoch >= cfg.epochs and "test/acc" not in metrics:
        # A finished checkpoint without its last epoch's metrics (or cut before them): measure them now.
        val = evaluate(model, data.val_x, data.val_y, normalize, num_classes, bf16=bf16)
        test = evaluate(model, data.test_x, data.test_y, normalize, num_classes, bf16=bf16)
        metrics = {**metrics, "epoch": start_epoch, "val/loss": val["loss"], "val/acc": val["acc"]}
        metrics.update(test_metrics(test, data.classes))
    result = dict(metrics)
    confusion = result.pop("test/confusion", None)
    if compile_s is not None:
        result["time/compile_s"] = compile_s
    result.update(
        compile_mode=mode,
        precision="bf16" if bf16 else "fp32",
        status=status,
        epochs=metrics.get("epoch", start_epoch),
        seconds=elapsed_before + time.perf_counter() - started,
        classes=data.classes,
        confusion=confusion,
    )
    return result


def test_metrics(test: dict, classes: list[str]) -> dict:
    """evaluate()'s result on the test split as metrics: accuracy (overall, per class), loss, the confusion
    matrix ((C, C) rows true, cols predicted), and what the report needs to judge the accuracy: the
    number of test images (for its binomial interval), the accuracy of always answering the most frequent
    class (chance), and the largest share of predictions that went to one class (1.0: a constant predictor)."""
    confusion = torch.tensor(test["confusion"], dtype=torch.float64)
    n = max(1.0, confusion.sum().item())
    return {
        "test/loss": test["loss"],
        "test/acc": test["acc"],
        **{f"test/acc/{name}": acc for name, acc in zip(classes, test["per_class"], strict=True)},
        "test/n": confusion.sum().item(),
        "test/majority_acc": confusion.sum(1).max().item() / n,
        "test/top_pred_share": confusion.sum(0).max().item() / n,
        "test/confusion": test["confusion"],
    }


def _spent(cost: dict, seconds: float, images: int, n_params: float) -> dict:
    """Add an epoch to the run's running cost; the cost metrics as of this epoch."""
    cost["cost/train_s"] += seconds
    cost["cost/images"] += images
    return {**cost, "model/params": n_params}


def _saver(state_fn: Callable[[int, dict], dict], epoch: int, metrics: dict) -> SaveCheckpoint:
    def save(path: str | os.PathLike) -> None:
        save_checkpoint(state_fn(epoch, metrics), path)

    return save


class CheckpointWriteError(OSError):
    """A checkpoint that could not be written (a full disk, a quota, a failing device): one line naming the
    file and why. Its temp file is removed and an earlier checkpoint at the path is left as it was."""


def save_checkpoint(state: dict, path: str | os.PathLike) -> None:
    path = Path(path)
    tmp = path.with_name(path.name + f".tmp{os.getpid()}")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        with open(tmp, "wb") as f:  # a file object: torch's writer then fails with Python's OSError as context
            torch.save(state, f)
        os.replace(tmp, path)  # a crash mid-write never leaves a truncated checkpoint behind
    except Exception as e:
        with contextlib.suppress(OSError):
            tmp.unlink()
        why = _write_failure(e, path.parent)
        if why is None:
            raise  # not a failed write (a state that does not pickle): a bug, with its traceback
        raise CheckpointWriteError(f"cannot write the checkpoint {path}: {why}") from None


def _write_failure(e: BaseException, folder: Path) -> str | None:
    """Why a checkpoint write failed, in a few words; None when `e` is no failed write. torch reports a
    write that fell short as RuntimeError ("[enforce fail at inline_container.cc] unexpected pos 64 vs 0"),
    with the OSError that stopped it as its context when it wrote through a Python file."""
    seen: BaseException | None = e
    while seen is not None and not isinstance(seen, OSError):
        seen = seen.__cause__ or seen.__context__
    err = seen.errno if isinstance(seen, OSError) else None
    if err is None and not (isinstance(e, RuntimeError) and "inline_container" in str(e)):
        return None
    with contextlib.suppress(OSError):
        if err is None and os.statvfs(folder).f_bavail == 0:
            err = errno.ENOSPC  # torch's own file writer drops the OSError; the free space says it
    if err in (errno.ENOSPC, errno.EDQUOT):
        what = "the disk is full" if err == errno.ENOSPC else "the disk quota is used up"
        return f"{what} ({os.strerror(err)}); free some space and run again"
    if err is not None:
        return f"the write failed ({os.strerror(err)})"
    return f"the write failed ({first_line(e)})"


class CheckpointError(ValueError):
    """A file that is not a cnnclf checkpoint, or that holds more than tensors and plain types; names the file."""


CHECKPOINT_FORMAT = 1  # bump when the keys below change
_CHECKPOINT_KEYS = ("config", "classes", "normalization", "epoch", "model")
# What a checkpoint may ask for before any model is built from it: its config's model, counted on the meta
# device (no memory), against these and against the tensors it holds. The largest model the sweeps search
# has about 28M parameters (catdog, width 48, depth 8, 7x7 kernels); a crafted config asks for billions.
MAX_PARAMS = 2**28  # parameters and buffers: 268M, 1 GiB in float32
MAX_ACTIVATION = 2**27  # elements of one layer's output for one image: 512 MiB in float32
MAX_TENSOR_ELEMENTS = 4 * MAX_PARAMS  # every tensor in the checkpoint together (model, optimizer, RNG state)
MAX_CLASSES = 1000


def load_checkpoint(path: str | os.PathLike) -> dict:
    """A checkpoint's state, read with `weights_only=True`: a pickle that would run code is refused
    before any of it runs. Raises CheckpointError for anything that is not a cnnclf checkpoint."""
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:
        # weights_only's refusal is a long UnpicklingError text; its first line names the offending global.
        why = str(e).strip().splitlines()[0][:160] if str(e).strip() else type(e).__name__
        raise CheckpointError(f"{path} is not a cnnclf checkpoint ({type(e).__name__}: {why})") from None
    if not isinstance(state, dict) or any(k not in state for k in _CHECKPOINT_KEYS):
        raise CheckpointError(f"{path} is not a cnnclf checkpoint (missing {', '.join(_CHECKPOINT_KEYS)})")
    try:
        cfg = TrainConfig.from_dict(state["config"])
        int(state["epoch"])
    except Exception as e:
        raise CheckpointError(f"{path} is not a cnnclf checkpoint (config: {type(e).__name__}: {e})") from None
    _check_size(path, state, cfg)
    return state


def model_plan(cfg: TrainConfig, num_classes: int) -> tuple[dict[str, tuple[int, ...]], int]:
    """cfg's model as built on the meta device, where nothing is allocated: the shape of each entry of its
    state dict, and the largest output of one layer for one image of cfg.image_size (elements).
    ValueError when the model does not take that image size."""
    check_model_fits(cfg, num_classes)
    largest = 0

    def widest(_module: nn.Module, _inputs: object, out: object) -> None:
        nonlocal largest
        if isinstance(out, torch.Tensor):
            largest = max(largest, out.numel())

    s = cfg.image_size
    with torch.device("meta"):
        model = model_for(cfg, num_classes)
        for m in model.modules():
            if not any(True for _ in m.children()):
                m.register_forward_hook(widest)
        model.eval()(torch.zeros(1, 3, s, s))
    return {k: tuple(v.shape) for k, v in model.state_dict().items()}, largest


def _check_size(path: str | os.PathLike, state: dict, cfg: TrainConfig) -> None:
    """Refuse, before any model is built, a checkpoint whose config asks for more than MAX_PARAMS parameters
    or MAX_ACTIVATION per layer and image, or whose weights are not the shapes that config's model has."""

    def refuse(why: str) -> NoReturn:
        raise CheckpointError(f"{path} is not a usable cnnclf checkpoint ({why})")

    classes, weights = state["classes"], state["model"]
    if not isinstance(classes, list) or not 1 <= len(classes) <= MAX_CLASSES:
        refuse(f"classes: expected a list of 1 to {MAX_CLASSES} names")
    if not isinstance(weights, dict) or not all(isinstance(v, torch.Tensor) for v in weights.values()):
        refuse("model: expected a state dict of tensors")
    # Every tensor, however nested, without recursion and once each (a pickle can share a list, or hold
    # itself); a view can claim far more values than its file holds.
    total, todo, seen = 0, [state], set()
    while todo:
        x = todo.pop()
        if id(x) in seen:
            continue
        seen.add(id(x))
        if isinstance(x, torch.Tensor):
            total += x.numel()
        elif isinstance(x, dict):
            todo += x.values()
        elif isinstance(x, (list, tuple)):
            todo += x
    if total > MAX_TENSOR_ELEMENTS:
        refuse(f"its tensors hold {total:,} values, more than the {MAX_TENSOR_ELEMENTS:,} a checkpoint may")
    try:
        shapes, largest = model_plan(cfg, len(classes))
    except ValueError as e:
        refuse(str(e))
    n = sum(math.prod(shape) for shape in shapes.values())
    asks = f"its config asks for a {cfg.model} model"
    asks += f" of width {cfg.width}, depth {cfg.depth}, kernel {cfg.kernel_size}" if cfg.model == "cnn" else ""
    if n > MAX_PARAMS:
        refuse(f"{asks}: {n:,} parameters ({4 * n / 2**30:.1f} GiB), more than the {MAX_PARAMS:,} a model may have")
    if largest > MAX_ACTIVATION:
        refuse(f"{asks} at {cfg.image_size}px: {largest:,} values per image in one layer, more than {MAX_ACTIVATION:,}")
    have = {k: tuple(v.shape) for k, v in weights.items()}
    if have != shapes:
        n_have = sum(math.prod(shape) for shape in have.values())
        wrong = next((k for k in shapes if have.get(k) != shapes[k]), None) or next(k for k in have if k not in shapes)
        refuse(
            f"{asks}: {n:,} parameters, but its weights hold {n_have:,}; {wrong}: "
            f"{have.get(wrong, 'missing')} in the file, {shapes.get(wrong, 'none')} in the model"
        )


def load_model(path: str | os.PathLike, device: str | torch.device = "cpu") -> tuple[nn.Module, TrainConfig, dict]:
    """A checkpoint's model in eval mode, its config, and its classes and normalization."""
    state = load_checkpoint(path)
    cfg = TrainConfig.from_dict(state["config"])
    model = model_for(cfg, len(state["classes"]))
    model.load_state_dict(state["model"])
    model.to(device).eval()
    return model, cfg, {"classes": state["classes"], **state["normalization"]}
