"""Where and how a run computes: its device, torch.compile's mode with the fixed step shapes a compiled step
needs, and bfloat16 autocast (whether a run uses it: cnnclf.train.uses_bf16)."""

from __future__ import annotations

import math
from contextlib import AbstractContextManager, nullcontext

import torch

from cnnclf.config import TORCH_COMPILE_MODES, TrainConfig

# torch.compile mode per device: CUDA graphs remove the per-kernel launch cost that dominates small
# batches on a GPU; on the CPU there are no graphs to replay.
COMPILE_MODES = {"cuda": "reduce-overhead", "cpu": "default"}
WARMUP_STEPS = 3  # compiled: the 1st step compiles (forward, then backward), the 2nd records CUDA graphs


def resolve_device(device: str | torch.device | None = None) -> torch.device:
    if device is None or str(device) == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise RuntimeError("--device cuda was asked for, but torch sees no CUDA device")
    return device


def compile_mode(cfg: TrainConfig, device: torch.device) -> str | None:
    """The torch.compile mode `cfg` trains with on `device`, or None for eager."""
    if cfg.compile in TORCH_COMPILE_MODES:
        return cfg.compile
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


def reset_compiled() -> None:
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


def autocast(device: torch.device, bf16: bool) -> AbstractContextManager:
    return torch.autocast(device.type, dtype=torch.bfloat16) if bf16 else nullcontext()
