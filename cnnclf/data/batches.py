"""On-device batches: uint8 in, normalized float out, augmentation batched on the device.

Needs only the tensors (TaskData): nothing here finds, downloads, decodes or caches files
(an import contract in pyproject.toml keeps it so).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator

import torch
import torch.nn.functional as F

from cnnclf.data.splits import TaskData

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


def normalization(kind: str, data: TaskData) -> tuple[tuple[float, ...], tuple[float, ...]]:
    if kind == "half":
        return (0.5, 0.5, 0.5), (0.5, 0.5, 0.5)
    if kind == "imagenet":
        return IMAGENET_MEAN, IMAGENET_STD
    if kind == "dataset":
        return data.train_stats()
    raise ValueError(f"unknown normalization {kind!r}")


class Normalizer:
    """uint8 (B, 3, S, S) -> float32 (x / 255 - mean) / std, as one fused multiply-add."""

    def __init__(self, mean: tuple[float, ...], std: tuple[float, ...], device: torch.device) -> None:
        self.mean, self.std = tuple(mean), tuple(std)
        std_t = torch.tensor(std, device=device).view(1, 3, 1, 1)
        self.scale = 1 / (255 * std_t)
        self.shift = -torch.tensor(mean, device=device).view(1, 3, 1, 1) / std_t

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        return torch.addcmul(self.shift, x.float(), self.scale)


def random_crop(x: torch.Tensor, pad: int, g: torch.Generator) -> torch.Tensor:
    """Reflect-pad by `pad` and crop back to size at a random offset per image; x: (B, C, S, S)."""
    b, c, h, w = x.shape
    padded = F.pad(x, (pad, pad, pad, pad), mode="reflect")
    dy = torch.randint(0, 2 * pad + 1, (b,), device=x.device, generator=g)
    dx = torch.randint(0, 2 * pad + 1, (b,), device=x.device, generator=g)
    rows = (dy[:, None] + torch.arange(h, device=x.device))[:, None, :, None]  # (B, 1, H, 1)
    cols = (dx[:, None] + torch.arange(w, device=x.device))[:, None, None, :]  # (B, 1, 1, W)
    bi = torch.arange(b, device=x.device)[:, None, None, None]
    ci = torch.arange(c, device=x.device)[None, :, None, None]
    return padded[bi, ci, rows, cols]


def random_flip(x: torch.Tensor, g: torch.Generator) -> torch.Tensor:
    flip = torch.rand(x.shape[0], device=x.device, generator=g) < 0.5
    return torch.where(flip[:, None, None, None], x.flip(3), x)


def random_resized_crop(
    x: torch.Tensor,
    g: torch.Generator,
    scale: tuple[float, float] = (0.25, 1.0),
    ratio: tuple[float, float] = (3 / 4, 4 / 3),
) -> torch.Tensor:
    """torchvision's RandomResizedCrop + horizontal flip for a whole batch, as one grid_sample.

    Each image gets a crop of area fraction ~U(scale) and aspect ratio log-uniform in
    `ratio`, resized back to the input size (bilinear), flipped with probability 1/2.
    """
    b = x.shape[0]
    dev = x.device
    area = torch.empty(b, device=dev).uniform_(*scale, generator=g)
    log_r = torch.empty(b, device=dev).uniform_(math.log(ratio[0]), math.log(ratio[1]), generator=g)
    r = log_r.exp()
    w = (area * r).sqrt().clamp(max=1.0)  # crop size as a fraction of the side
    h = (area / r).sqrt().clamp(max=1.0)
    cx = (torch.rand(b, device=dev, generator=g) * 2 - 1) * (1 - w)  # centre in [-1, 1] coordinates
    cy = (torch.rand(b, device=dev, generator=g) * 2 - 1) * (1 - h)
    flip = torch.where(torch.rand(b, device=dev, generator=g) < 0.5, -1.0, 1.0)
    theta = torch.zeros(b, 2, 3, device=dev, dtype=x.dtype)
    theta[:, 0, 0] = w * flip
    theta[:, 0, 2] = cx
    theta[:, 1, 1] = h
    theta[:, 1, 2] = cy
    grid = F.affine_grid(theta, list(x.shape), align_corners=False)
    return F.grid_sample(x, grid, mode="bilinear", padding_mode="reflection", align_corners=False)


def make_augment(kind: str) -> Callable[[torch.Tensor, torch.Generator], torch.Tensor]:
    if kind == "none":
        return lambda x, g: x
    if kind == "crop-flip":
        return lambda x, g: random_flip(random_crop(x, pad=max(1, x.shape[-1] // 8), g=g), g)
    if kind == "resized-crop-flip":
        return random_resized_crop
    raise ValueError(f"unknown augmentation {kind!r}")


def train_batches(
    x: torch.Tensor,
    y: torch.Tensor,
    batch_size: int,
    normalize: Normalizer,
    augment: Callable[[torch.Tensor, torch.Generator], torch.Tensor],
    g: torch.Generator,
) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """One epoch of shuffled, augmented, normalized batches; x, y and g live on the training device."""
    perm = torch.randperm(len(x), device=x.device, generator=g)
    for i in range(0, len(x), batch_size):
        idx = perm[i : i + batch_size]
        yield augment(normalize(x[idx]), g), y[idx]


def eval_batches(
    x: torch.Tensor, y: torch.Tensor, batch_size: int, normalize: Normalizer
) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    for i in range(0, len(x), batch_size):
        yield normalize(x[i : i + batch_size]), y[i : i + batch_size]
