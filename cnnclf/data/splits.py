"""A task's decoded data split three ways (TaskData), and the seeded, stratified splits that make it."""

from __future__ import annotations

import dataclasses
import hashlib
from dataclasses import dataclass, field

import torch


@dataclass
class TaskData:
    """Decoded, split data of one task. Images are uint8 (N, 3, S, S), labels int64 (N,)."""

    task: str
    classes: list[str]
    train_x: torch.Tensor
    train_y: torch.Tensor
    val_x: torch.Tensor
    val_y: torch.Tensor
    test_x: torch.Tensor
    test_y: torch.Tensor
    manifest: dict = field(default_factory=dict)  # source, layout, counts, skipped files, splits

    @property
    def image_size(self) -> int:
        return int(self.train_x.shape[-1])

    def train_stats(self) -> tuple[tuple[float, ...], tuple[float, ...]]:
        """Per-channel mean and std of the training split, computed once and kept in the manifest
        (which travels with the data to every sweep trial)."""
        if "train_mean" not in self.manifest:
            self.manifest["train_mean"], self.manifest["train_std"] = channel_stats(self.train_x)
        return tuple(self.manifest["train_mean"]), tuple(self.manifest["train_std"])

    def to(self, device: torch.device | str) -> TaskData:
        moved = {
            f.name: getattr(self, f.name).to(device, non_blocking=True)
            for f in dataclasses.fields(self)
            if isinstance(getattr(self, f.name), torch.Tensor)
        }
        return dataclasses.replace(self, **moved)


def data_digest(data: TaskData) -> str:
    """16 hex digits of sha256 over every split's decoded pixels and labels, in order: two runs with the
    same digest trained and were measured on the same images (a subset, a split seed, an image size or
    a different decoder all change it). About 1 s per GB of uint8 pixels."""
    h = hashlib.sha256()
    for name in ("train", "val", "test"):
        for t in (getattr(data, f"{name}_x"), getattr(data, f"{name}_y")):
            h.update(f"{name} {tuple(t.shape)} {t.dtype}\n".encode())
            h.update(t.contiguous().numpy().data)
    return h.hexdigest()[:16]


def channel_stats(x: torch.Tensor, chunk: int = 4096) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """Per-channel mean and std of uint8 images (N, 3, S, S), in [0, 1] units."""
    s = torch.zeros(3, dtype=torch.float64, device=x.device)
    s2 = torch.zeros(3, dtype=torch.float64, device=x.device)
    for i in range(0, len(x), chunk):
        xb = x[i : i + chunk].to(torch.float64) / 255
        s += xb.sum(dim=(0, 2, 3))
        s2 += (xb * xb).sum(dim=(0, 2, 3))
    n = len(x) * x.shape[2] * x.shape[3]
    mean = s / n
    std = (s2 / n - mean * mean).clamp_min(1e-12).sqrt()
    return tuple(mean.tolist()), tuple(std.tolist())


# Splits: seeded and stratified, so every class keeps its share in every split.


def stratified_split(y: torch.Tensor, fraction: float, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Indices (keep, split) with round(fraction * n_c) of each class c in `split`."""
    g = torch.Generator().manual_seed(seed)
    keep, split = [], []
    for c in torch.unique(y).tolist():
        idx = torch.nonzero(y == c).flatten()
        idx = idx[torch.randperm(len(idx), generator=g)]
        n = round(fraction * len(idx))
        n = min(max(n, 1), len(idx) - 1) if len(idx) > 1 else 0
        split.append(idx[:n])
        keep.append(idx[n:])
    return torch.sort(torch.cat(keep)).values, torch.sort(torch.cat(split)).values


def stratified_subset(y: torch.Tensor, n: int, seed: int) -> torch.Tensor:
    if n >= len(y):
        return torch.arange(len(y))
    _, sub = stratified_split(y, n / len(y), seed)
    return sub
