"""TrainConfig, the one frozen description of a training run, and named presets.

A trial's config is `dataclasses.replace(preset, **params)`, so an unknown
hyperparameter name fails loudly instead of being silently ignored.
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from cnnclf.args import nonnegative_float, positive_float, positive_int
from cnnclf.args import seed as seed_arg

TASKS = ("cifar10", "catdog")
CIFAR10_CLASSES = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"]
CATDOG_CLASSES = ["cat", "dog"]
CLASSES = {"cifar10": CIFAR10_CLASSES, "catdog": CATDOG_CLASSES}  # label order: the index is the label
MODELS = ("tutorial", "cnn")  # cnnclf.models' registry (tests/test_cli_flags.py checks)
OPTIMIZERS = ("sgd", "adam", "adamw")
SCHEDULES = ("constant", "cosine", "linear")
NORMALIZATIONS = ("half", "dataset", "imagenet")
AUGMENTATIONS = ("none", "crop-flip", "resized-crop-flip")
KERNEL_SIZES = (3, 5, 7)
# torch.compile of the training step; auto: on for CUDA, off on the CPU; on: the device's mode
# (cnnclf/device.py COMPILE_MODES); or on with one of torch.compile's own modes, by name.
TORCH_COMPILE_MODES = ("default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs")
COMPILE = ("auto", "on", "off", *TORCH_COMPILE_MODES)
# Arithmetic of the forward pass: auto is bfloat16 autocast (with channels-last tensors) where the device has
# bf16 units (CUDA; a CPU with AVX512-BF16 or AMX), float32 elsewhere. cnnclf.train.uses_bf16 decides.
PRECISIONS = ("auto", "fp32", "bf16")
MAX_DEPTH = 10


# Sweep names become folder names (storage path, --out) and MLflow tags: letters, digits and `._-`,
# not starting with `.` (no `..`, no hidden folders) or `-` (a flag), short enough for every file system.
NAME_PATTERN = re.compile(r"[A-Za-z0-9_][A-Za-z0-9._-]{0,99}")  # not starting with `-`: it would read as a flag


def name_error(name: str) -> str | None:
    """Why `name` cannot be a sweep name (None when it can); the message is one line for the user."""
    if NAME_PATTERN.fullmatch(name):
        return None
    shown = name if len(name) <= 40 else name[:37] + "..."
    return (
        f"{shown!r} is not a valid name: letters, digits, '.', '_' and '-', not starting with '.' or '-', at most 100"
    )


class ConfigError(ValueError):
    """A config value is out of range; the message names the field."""


@dataclass(frozen=True)
class Flag:
    """How `python -m cnnclf train` reads a TrainConfig field: `--name` in dashes (a bool: `--name/--no-name`),
    its text parsed by `type` (None: the text) and checked against `choices`. cnnclf/__main__.py builds the
    flags from these; left out, a flag keeps the preset's value."""

    type: Callable[[str], object] | None = None
    choices: tuple | None = None
    help: str | None = None
    required: bool = False


def flag(default: Any, **how: Any) -> Any:
    """A TrainConfig field with its command-line flag (Flag's fields as keywords)."""
    return field(default=default, metadata={"flag": Flag(**how)})


def no_flag(default: Any, why: str, **kw: Any) -> Any:
    """A TrainConfig field without a command-line flag, and why (tests/test_cli_flags.py holds every field to one)."""
    return field(default=default, metadata={"flag": None, "no_flag": why}, **kw)


@dataclass(frozen=True)
class TrainConfig:
    task: str = flag("cifar10", choices=TASKS, required=True)  # selects the preset too (cnnclf/__main__.py)
    model: str = flag("cnn", choices=MODELS)
    # optimizer (names as torch.optim spells them)
    optimizer: str = flag("adam", choices=OPTIMIZERS)
    lr: float = flag(1e-3, type=positive_float, help="peak learning rate, after warm-up")
    momentum: float = flag(0.9, type=nonnegative_float, help="sgd only")
    nesterov: bool = flag(False, help="sgd only")
    amsgrad: bool = flag(False, help="adam and adamw only")
    weight_decay: float = flag(0.0, type=nonnegative_float, help="not on biases and BatchNorm weights")
    batch_size: int = flag(128, type=positive_int)
    epochs: int = flag(10, type=positive_int)
    schedule: str = flag(
        "constant", choices=SCHEDULES, help="lr after warm-up: constant, or cosine or linear decay to 0"
    )
    warmup_epochs: float = flag(0.0, type=nonnegative_float, help="linear warm-up from 0, in (fractional) epochs")
    label_smoothing: float = flag(0.0, type=nonnegative_float)
    # model family (ignored by fixed nets such as `tutorial`)
    depth: int = flag(4, type=positive_int, help="conv layers")
    kernel_size: int = flag(3, type=int, choices=KERNEL_SIZES)
    width: int = flag(32, type=positive_int, help="channels of the first stage; doubles per stage, capped at 8x")
    # data
    image_size: int = flag(32, type=positive_int, help="pixels per side; Cat/Dog photos are resized to this once")
    normalize: str = flag(
        "dataset", choices=NORMALIZATIONS, help="half: mean=std=0.5 (the CIFAR-10 seed); dataset: the train split's"
    )
    augment: str = flag("crop-flip", choices=AUGMENTATIONS)
    val_fraction: float = no_flag(0.1, "the data's, fixed per task")  # of the labelled training images, stratified
    # only where the data set has no labelled test set (Kaggle Cat/Dog)
    test_fraction: float = no_flag(0.1, "the data's, fixed per task")
    subset: int | None = flag(None, type=positive_int, help="train on this many training images")  # stratified
    eval_subset: int | None = flag(None, type=positive_int, help="cap val and test at this many images each")
    seed: int = flag(0, type=seed_arg, help="model initialization, batch order and augmentation")
    # The split and subsets; None: `seed` (a sweep's confirmation runs keep the sweep's split and change only `seed`).
    split_seed: int | None = flag(
        None, type=seed_arg, help="seed of the train/val/test split and subsets (default: --seed)"
    )
    # torch.compile of the training step (cnnclf.train). A compiled step drops each epoch's ragged
    # last batch, so that every step has one shape: docs/training.md#compiled-training-step
    compile: str = flag(
        "auto",
        choices=COMPILE,
        help="torch.compile the training step (auto, the default: on with CUDA, off on the CPU)",
    )
    precision: str = flag(  # the seeds pin fp32, as they were documented
        "auto",
        choices=PRECISIONS,
        help="forward-pass arithmetic (auto, the default: bf16 autocast on CUDA and on a CPU with bf16 units, "
        "else fp32; the seed presets: fp32)",
    )
    tags: tuple[str, ...] = no_flag((), "free-form labels, e.g. ('baseline',)", compare=False)

    def __post_init__(self) -> None:
        def check(ok: bool, name: str, why: str) -> None:
            if not ok:
                raise ConfigError(f"{name}={getattr(self, name)!r}: {why}")

        check(self.task in TASKS, "task", f"expected one of {', '.join(TASKS)}")
        check(self.optimizer in OPTIMIZERS, "optimizer", f"expected one of {', '.join(OPTIMIZERS)}")
        check(self.schedule in SCHEDULES, "schedule", f"expected one of {', '.join(SCHEDULES)}")
        check(self.normalize in NORMALIZATIONS, "normalize", f"expected one of {', '.join(NORMALIZATIONS)}")
        check(self.augment in AUGMENTATIONS, "augment", f"expected one of {', '.join(AUGMENTATIONS)}")
        check(self.lr > 0 and self.lr < 100, "lr", "expected 0 < lr < 100")
        check(0 <= self.momentum < 1, "momentum", "expected 0 <= momentum < 1")
        check(self.weight_decay >= 0, "weight_decay", "expected >= 0")
        check(1 <= self.batch_size <= 65536, "batch_size", "expected 1..65536")
        check(1 <= self.epochs <= 10000, "epochs", "expected 1..10000")
        check(self.warmup_epochs >= 0, "warmup_epochs", "expected >= 0")
        check(0 <= self.label_smoothing < 1, "label_smoothing", "expected 0 <= x < 1")
        check(1 <= self.depth <= MAX_DEPTH, "depth", f"expected 1..{MAX_DEPTH}")
        check(self.kernel_size in KERNEL_SIZES, "kernel_size", "expected 3, 5 or 7")
        check(1 <= self.width <= 1024, "width", "expected 1..1024")
        check(8 <= self.image_size <= 512, "image_size", "expected 8..512")
        check(0 < self.val_fraction < 1, "val_fraction", "expected 0 < x < 1")
        check(0 < self.test_fraction < 1, "test_fraction", "expected 0 < x < 1")
        check(self.subset is None or self.subset >= 2, "subset", "expected >= 2 images")
        check(self.eval_subset is None or self.eval_subset >= 2, "eval_subset", "expected >= 2 images")
        check(self.compile in COMPILE, "compile", f"expected one of {', '.join(COMPILE)}")
        check(self.precision in PRECISIONS, "precision", f"expected one of {', '.join(PRECISIONS)}")

    @property
    def data_seed(self) -> int:
        """The seed of the data's split and subsets (cnnclf.data.load_task)."""
        return self.seed if self.split_seed is None else self.split_seed

    def replace(self, **changes: object) -> TrainConfig:
        """`dataclasses.replace` that names an unknown field instead of a TypeError wall."""
        unknown = sorted(set(changes) - {f.name for f in dataclasses.fields(self)})
        if unknown:
            raise ConfigError(f"unknown config field(s): {', '.join(unknown)}")
        return dataclasses.replace(self, **changes)

    def to_dict(self) -> dict:
        d = dataclasses.asdict(self)
        d["tags"] = list(self.tags)
        return d

    def cli_args(self) -> list[str]:
        """`python -m cnnclf train` arguments that train exactly this config (every flag spelled out)."""
        args = []
        for f in flag_fields():
            v = getattr(self, f.name)
            if v is None:
                continue  # the preset's None (subset, eval_subset, split_seed)
            if isinstance(v, bool):  # amsgrad, nesterov
                args.append(flag_name(f.name) if v else flag_name(f.name, negative=True))
            else:
                args += [flag_name(f.name), str(v)]
        return args

    @classmethod
    def from_dict(cls, d: dict) -> TrainConfig:
        d = dict(d)
        if "tags" in d:
            d["tags"] = tuple(d["tags"])
        return cls().replace(**d)


# The optimizer recipe of the strong presets and of the sweeps' reference configurations (sweeps/*.py base):
# SGD with Nesterov momentum, weight decay and label smoothing; each picks its own lr.
STRONG_SGD = {"optimizer": "sgd", "momentum": 0.9, "nesterov": True, "weight_decay": 5e-4, "label_smoothing": 0.1}

# The seeds, as documented (docs/results.md): tutorial net at batch 4 for 2 epochs.
CIFAR10_SEED = TrainConfig(
    task="cifar10",
    model="tutorial",
    optimizer="adam",
    amsgrad=True,
    lr=1e-3,
    batch_size=4,
    epochs=2,
    normalize="half",
    augment="none",  # the tutorial trains on un-augmented images
    precision="fp32",  # the seeds trained in float32
)

PRESETS: dict[str, TrainConfig] = {
    "cifar10-seed": CIFAR10_SEED,  # documented: 61% test
    "cifar10-seed-sgd": CIFAR10_SEED.replace(optimizer="sgd", amsgrad=False, momentum=0.9),  # ~54%
    # A hand-picked member of the family: 3 stages of 2 BN convs (64/128/256 channels),
    # SGD+nesterov with warm-up and cosine decay; needs a GPU for its full 40 epochs.
    "cifar10-strong": TrainConfig(
        task="cifar10",
        model="cnn",
        optimizer="sgd",
        lr=0.1,
        momentum=0.9,
        nesterov=True,
        weight_decay=5e-4,
        batch_size=256,
        epochs=40,
        schedule="cosine",
        warmup_epochs=2,
        label_smoothing=0.1,
        depth=6,
        kernel_size=3,
        width=64,
        normalize="dataset",
        augment="crop-flip",
    ),
    # The Cat/Dog seed: 5 convs with 7x7 kernels at 128x128, ImageNet normalization,
    # random resized crop + flip, SGD lr 0.008 (momentum not stated: torch's default 0), batch 10.
    "catdog-seed": TrainConfig(
        task="catdog",
        model="cnn",
        optimizer="sgd",
        lr=0.008,
        momentum=0.0,
        batch_size=10,
        epochs=60,
        depth=5,
        kernel_size=7,
        width=16,
        image_size=128,
        normalize="imagenet",
        augment="resized-crop-flip",
        precision="fp32",  # the seeds trained in float32
    ),
    "catdog-strong": TrainConfig(
        task="catdog",
        model="cnn",
        optimizer="sgd",
        lr=0.05,
        momentum=0.9,
        nesterov=True,
        weight_decay=5e-4,
        batch_size=64,
        epochs=40,
        schedule="cosine",
        warmup_epochs=2,
        label_smoothing=0.1,
        depth=7,
        kernel_size=3,
        width=32,
        image_size=128,
        normalize="imagenet",
        augment="resized-crop-flip",
    ),
}

# The sweeps' reference configurations (sweeps/*.py SPEC.base, and benchmarks/gpu.py, which cannot import
# sweeps/ since it imports Ray): every search trial is one of these with the searched fields replaced; the
# searched fields' values here are the search's first trial, and its measured pace sets the time limit. The
# optimizer is the strong presets' (docs/results.md: 91.0% Cat/Dog test at 16 epochs of width 16 at 64 px).
SWEEP_BASES = {
    "cifar10": TrainConfig(
        task="cifar10", model="cnn", schedule="cosine", warmup_epochs=1, augment="crop-flip", normalize="dataset",
        **STRONG_SGD, lr=0.05, depth=6, width=32, kernel_size=3, batch_size=64,
    ),
    "catdog": TrainConfig(
        task="catdog", model="cnn", image_size=64, schedule="cosine", warmup_epochs=1, augment="resized-crop-flip",
        normalize="imagenet", **STRONG_SGD, lr=0.05, depth=6, width=16, kernel_size=3, batch_size=64,
    ),
}  # fmt: skip


def flag_fields() -> list[dataclasses.Field]:
    """TrainConfig's fields that `python -m cnnclf train` has a flag for, in declaration order (--task first)."""
    return [f for f in dataclasses.fields(TrainConfig) if f.metadata.get("flag") is not None]


def flag_name(name: str, negative: bool = False) -> str:
    """A field's flag: `--batch-size`; `negative`: a bool's `--no-nesterov`."""
    return ("--no-" if negative else "--") + name.replace("_", "-")


DEFAULT_PRESET = {"cifar10": "cifar10-seed", "catdog": "catdog-seed"}


def get_preset(name: str) -> TrainConfig:
    try:
        return PRESETS[name]
    except KeyError:
        raise ConfigError(f"unknown preset {name!r}; known: {', '.join(PRESETS)}") from None
