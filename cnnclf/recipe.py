"""What a TrainConfig builds for a run: its model, its optimizer, its learning-rate schedule and each epoch's seed."""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
from torch import nn

from cnnclf.config import TrainConfig
from cnnclf.models import build_model, count_parameters


def model_for(cfg: TrainConfig, num_classes: int) -> nn.Module:
    return build_model(
        cfg.model,
        num_classes=num_classes,
        depth=cfg.depth,
        kernel_size=cfg.kernel_size,
        width=cfg.width,
        image_size=cfg.image_size,
    )


# A model this small (parameters, and parameters x pixels, a bound on its multiply-adds) is checked on the CPU:
# about 0.2 s at most here. A larger one on the meta device, which allocates and computes nothing but loads torch's
# symbolic-shape and dynamo machinery on its first use, about 1.2 s of imports.
CPU_CHECK_PARAMS, CPU_CHECK_WORK = 50_000_000, 1e12


def check_model_fits(cfg: TrainConfig, num_classes: int = 2) -> None:
    """Build cfg's model and push one image through it: a shape that does not fit (the tutorial net at 64x64) fails
    here in a fraction of a second, with ValueError, not after the data is decoded."""
    s = cfg.image_size
    try:
        device = torch.device("meta")
        with device:
            model = model_for(cfg, num_classes)
        params = count_parameters(model)
        if params <= CPU_CHECK_PARAMS and params * s * s <= CPU_CHECK_WORK:
            device = torch.device("cpu")
            model = model_for(cfg, num_classes)  # small: built for real
        with torch.no_grad():
            model.eval()(torch.zeros(1, 3, s, s, device=device))
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


def epoch_seed(seed: int, epoch: int) -> int:
    # Each epoch's shuffle and augmentation depend on (seed, epoch) alone, so a resumed run
    # draws exactly the batches the uninterrupted run would have drawn.
    return (seed * 1_000_003 + epoch * 7919) % (2**63)
