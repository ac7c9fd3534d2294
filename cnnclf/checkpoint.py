"""Checkpoints: the file `train` writes every epoch to resume from (and `predict` reads), and the checks a file
passes before anything is built from it.

A checkpoint is a dict of tensors and plain types, read back with `torch.load(weights_only=True)`, so that a
file that would run code is refused before any of it runs. Its keys (cnnclf.train writes them): format,
config, classes, normalization, epoch, seconds, metrics, model, optimizer, scheduler and rng ({"torch": ...}).
Format 1 also held Python's `random` state, which training never used; such a checkpoint still loads, and
resumes to the same result. One written before the format was recorded has format 1's keys.
"""

from __future__ import annotations

import contextlib
import errno
import math
import os
from pathlib import Path
from typing import NoReturn

import torch
from torch import nn

from cnnclf.args import first_line
from cnnclf.config import TrainConfig
from cnnclf.files import atomic_write
from cnnclf.recipe import check_model_fits, model_for

CHECKPOINT_FORMAT = 2  # bump when the keys change; a newer one is refused (CheckpointError), not misread
READABLE_FORMATS = (1, 2)
_CHECKPOINT_KEYS = ("config", "classes", "normalization", "epoch", "model")
# What a checkpoint may ask for before any model is built from it: its config's model, counted on the meta
# device (no memory), against these and against the tensors it holds. The largest model the sweeps search
# has about 28M parameters (catdog, width 48, depth 8, 7x7 kernels); a crafted config asks for billions.
MAX_PARAMS = 2**28  # parameters and buffers: 268M, 1 GiB in float32
MAX_ACTIVATION = 2**27  # elements of one layer's output for one image: 512 MiB in float32
MAX_TENSOR_ELEMENTS = 4 * MAX_PARAMS  # every tensor in the checkpoint together (model, optimizer, RNG state)
MAX_CLASSES = 1000


# --- writing ----------------------------------------------------------------------------------


class CheckpointWriteError(OSError):
    """A checkpoint that could not be written (a full disk, a quota, a failing device): one line naming the
    file and why. Its temp file is removed and an earlier checkpoint at the path is left as it was."""


def save_checkpoint(state: dict, path: str | os.PathLike) -> None:
    path = Path(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        # A crash mid-write never leaves a truncated checkpoint behind (cnnclf/files.py). A file object: torch's
        # writer then fails with Python's OSError as context.
        with atomic_write(path) as tmp, open(tmp, "wb") as f:
            torch.save(state, f)
    except Exception as e:
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


# --- reading ----------------------------------------------------------------------------------


class CheckpointError(ValueError):
    """A file that is not a cnnclf checkpoint, holds more than tensors and plain types, or is of a format this
    version does not read; one line that names the file."""


def load_checkpoint(path: str | os.PathLike) -> dict:
    """A checkpoint's state, read with `weights_only=True`: a pickle that would run code is refused
    before any of it runs. Raises CheckpointError for anything that is not a cnnclf checkpoint."""
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:
        # weights_only's refusal is a long UnpicklingError text; its first line names the offending global.
        why = str(e).strip().splitlines()[0][:160] if str(e).strip() else type(e).__name__
        raise CheckpointError(f"{path} is not a cnnclf checkpoint ({type(e).__name__}: {why})") from None
    if isinstance(state, dict):
        check_format(state, path)
    if not isinstance(state, dict) or any(k not in state for k in _CHECKPOINT_KEYS):
        raise CheckpointError(f"{path} is not a cnnclf checkpoint (missing {', '.join(_CHECKPOINT_KEYS)})")
    try:
        cfg = TrainConfig.from_dict(state["config"])
        int(state["epoch"])
    except Exception as e:
        raise CheckpointError(f"{path} is not a cnnclf checkpoint (config: {type(e).__name__}: {e})") from None
    _check_size(path, state, cfg)
    return state


def check_format(state: dict, path: str | os.PathLike) -> None:
    """Refuse a checkpoint of a format this version does not read (a newer one's keys may mean other things);
    one without a format is of format 1."""
    fmt = state.get("format", 1)
    if type(fmt) is int and fmt in READABLE_FORMATS:
        return
    reads = f"formats {', '.join(map(str, READABLE_FORMATS))}"
    if type(fmt) is int and fmt > CHECKPOINT_FORMAT:
        raise CheckpointError(
            f"{path} is a checkpoint of format {fmt}, newer than this cnnclf reads ({reads}); "
            "use the cnnclf that wrote it, or train without it"
        )
    shown = " ".join(repr(fmt).split())
    shown = shown if len(shown) <= 40 else shown[:37] + "..."
    raise CheckpointError(f"{path} is not a cnnclf checkpoint (format {shown}; this cnnclf reads {reads})")


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


def _tensor_elements(state: dict) -> int:
    """Every tensor's values in `state`, however nested, without recursion and once each (a pickle can share a
    list, or hold itself); a view counts what it claims, which can be far more than its file holds."""
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
    return total


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
    total = _tensor_elements(state)
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
