"""CIFAR-10 from torchvision's `cifar-10-batches-py`: pickles, so every file is md5-checked first."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from cnnclf.config import CIFAR10_CLASSES
from cnnclf.data.errors import DataError


def load_torchvision_cifar10(d: Path) -> dict:
    """torchvision's pickled batches, each md5-checked against the official one before anything unpickles it."""
    from torchvision.datasets import CIFAR10
    from torchvision.datasets.utils import check_integrity

    folder = d / CIFAR10.base_folder
    # torchvision checks the batches again itself (CIFAR10._check_integrity, and the meta file's md5
    # in _load_meta) before it unpickles them; this pass names the file that fails.
    for name, md5 in [*CIFAR10.train_list, *CIFAR10.test_list, (CIFAR10.meta["filename"], CIFAR10.meta["md5"])]:
        if not check_integrity(folder / name, md5):
            what = "does not match CIFAR-10's official md5" if (folder / name).is_file() else "is missing"
            raise DataError(
                f"{folder / name} {what}; nothing in the folder was loaded (it is a pickle, which can run code). "
                f"Delete {folder} to download CIFAR-10 again"
            )
    try:
        parts = [CIFAR10(str(d), train=train, download=False) for train in (True, False)]
    except Exception as e:
        raise DataError(f"{folder} is damaged ({type(e).__name__}: {e}); delete it to re-download") from None
    if list(parts[0].classes) != CIFAR10_CLASSES:
        raise DataError(f"{folder / CIFAR10.meta['filename']} names other classes than CIFAR-10's")
    x = np.concatenate([p.data for p in parts])  # (N, 32, 32, 3) uint8
    return {
        "x": torch.from_numpy(x).permute(0, 3, 1, 2).contiguous(),
        "y": torch.tensor(parts[0].targets + parts[1].targets, dtype=torch.int64),
        "test": torch.tensor([False] * len(parts[0].targets) + [True] * len(parts[1].targets)),
        "files": [f"train[{i}]" for i in range(len(parts[0].targets))]
        + [f"test[{i}]" for i in range(len(parts[1].targets))],
        "skipped": [],  # pickled arrays: nothing to skip file by file
        "cache_error": None,
    }
