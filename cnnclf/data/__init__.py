"""Find, download and decode the data sets, split them, and feed batches on the device.

Files are decoded once into uint8 tensors (N, 3, S, S) and cached beside the data,
keyed by the file list and the resolution. A training run moves those tensors to
its device once; shuffling, augmentation and normalization then run there, a whole
batch at a time, with no per-image Python work inside an epoch.

One concern a module, each importing only those above it:

    errors     constants, DataError, the Source type, file names as text
    downloads  resumable, checked downloads and atomic extraction (the only network code)
    layouts    finding a task's files in the layouts it may come in
    decode     image files -> uint8 arrays, or the reason each is skipped
    cache      the decode cache beside the data: keys, checks, atomic writes, stale temp files
    cifar      torchvision's CIFAR-10 batches, md5-checked before unpickling
    splits     TaskData and its seeded, stratified splits
    batches    normalization, augmentation and batches on the device (needs only splits)
    task       load_task and prune_caches, built from the above

Every public name is importable from `cnnclf.data` as before. A name is imported from its module
when it is first used: training (`from cnnclf.data import Normalizer`) loads `splits` and `batches`
alone, not the download, archive and decode code.
"""

from __future__ import annotations

import importlib
from typing import Any

_EXPORTS = {
    "cnnclf.config": ("CATDOG_CLASSES", "CIFAR10_CLASSES", "CLASSES"),
    "cnnclf.data.errors": (
        "CACHE_DIR",
        "IMAGE_FORMATS",
        "MAX_IMAGE_PIXELS",
        "PETIMAGES_URL",
        "SYSTEM_FILES",
        "DataError",
        "FormatMismatch",
        "ImageTooLarge",
        "Source",
        "Unknown",
    ),
    "cnnclf.data.downloads": ("download", "download_catdog", "download_cifar10"),
    "cnnclf.data.layouts": ("find_catdog", "find_cifar10"),
    "cnnclf.data.decode": ("decode_image", "skip_reason", "strict_decoding"),
    "cnnclf.data.cache": ("STALE_TEMP_S", "decode_source"),
    "cnnclf.data.splits": ("TaskData", "channel_stats", "data_digest", "stratified_split", "stratified_subset"),
    "cnnclf.data.batches": (
        "IMAGENET_MEAN",
        "IMAGENET_STD",
        "Normalizer",
        "eval_batches",
        "make_augment",
        "normalization",
        "random_crop",
        "random_flip",
        "random_resized_crop",
        "train_batches",
    ),
    "cnnclf.data.task": ("LoadOptions", "load_task", "prune_caches"),
}
_MODULE_OF = {name: module for module, names in _EXPORTS.items() for name in names}

__all__ = sorted(_MODULE_OF)


def __getattr__(name: str) -> Any:
    """A public name, imported from its module on first use (PEP 562) and kept here after."""
    module = _MODULE_OF.get(name)
    if module is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted({*globals(), *__all__})
