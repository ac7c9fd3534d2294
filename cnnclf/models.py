"""Models by name: the CIFAR-10 tutorial net and a configurable CNN family.

`build_model(name, num_classes=..., **kw)` looks the name up in a small registry
(timm's habit); keyword arguments a model does not use are ignored, so a sweep can
pass every hyperparameter to every model.
"""

from __future__ import annotations

import inspect
import math
from collections.abc import Callable

import torch
from torch import nn

_REGISTRY: dict[str, Callable[..., nn.Module]] = {}


def register(name: str) -> Callable:
    def deco(fn: Callable[..., nn.Module]) -> Callable[..., nn.Module]:
        _REGISTRY[name] = fn
        return fn

    return deco


def model_names() -> list[str]:
    return sorted(_REGISTRY)


def build_model(name: str, num_classes: int = 10, **kw: object) -> nn.Module:
    try:
        fn = _REGISTRY[name]
    except KeyError:
        raise ValueError(f"unknown model {name!r}; known: {', '.join(model_names())}") from None
    accepted = inspect.signature(fn).parameters
    return fn(num_classes=num_classes, **{k: v for k, v in kw.items() if k in accepted})


class TutorialNet(nn.Module):
    """The PyTorch CIFAR-10 tutorial net, exactly (62,006 parameters at 10 classes)."""

    def __init__(self, num_classes: int = 10) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, 6, 5)
        self.pool = nn.MaxPool2d(2, 2)
        self.conv2 = nn.Conv2d(6, 16, 5)
        self.fc1 = nn.Linear(16 * 5 * 5, 120)
        self.fc2 = nn.Linear(120, 84)
        self.fc3 = nn.Linear(84, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # x: (B, 3, 32, 32)
        # relu(pool(x)) == pool(relu(x)) (both monotone), with the relu on 4x fewer values.
        x = torch.relu(self.pool(self.conv1(x)))  # (B, 6, 14, 14)
        x = torch.relu(self.pool(self.conv2(x)))  # (B, 16, 5, 5)
        x = torch.flatten(x, 1)
        x = torch.relu(self.fc1(x))
        x = torch.relu(self.fc2(x))
        return self.fc3(x)


@register("tutorial")
def tutorial(num_classes: int = 10) -> nn.Module:
    return TutorialNet(num_classes)


def stage_plan(depth: int, image_size: int) -> list[int]:
    """Conv layers per pooling stage.

    Each stage ends in a 2x2 max-pool, and pooling stops at 4x4 pixels (3 stages at
    32x32, 5 at 128x128), so extra depth turns into more convs per stage rather than
    into pooling a 1x1 map. Later stages get the extra convs: they are cheaper
    (fewer pixels) and hold the wider features.
    """
    max_stages = max(1, int(math.log2(image_size)) - 2)
    stages = min(depth, max_stages)
    base, extra = divmod(depth, stages)
    return [base + (1 if i >= stages - extra else 0) for i in range(stages)]


class ConvBNReLU(nn.Sequential):
    def __init__(self, c_in: int, c_out: int, k: int) -> None:
        super().__init__(
            nn.Conv2d(c_in, c_out, k, padding=k // 2, bias=False),
            nn.BatchNorm2d(c_out),
            nn.ReLU(inplace=True),
        )


class CNN(nn.Module):
    """`depth` conv-BN-ReLU layers in pooled stages, then global average pool and a linear head.

    Channels: `width` in the first stage, doubling per stage, capped at 8x width.
    """

    def __init__(
        self,
        num_classes: int = 10,
        depth: int = 4,
        kernel_size: int = 3,
        width: int = 32,
        image_size: int = 32,
    ) -> None:
        super().__init__()
        layers: list[nn.Module] = []
        c_in = 3
        for s, n_convs in enumerate(stage_plan(depth, image_size)):
            c_out = width * min(2**s, 8)
            for _ in range(n_convs):
                layers.append(ConvBNReLU(c_in, c_out, kernel_size))
                c_in = c_out
            layers.append(nn.MaxPool2d(2))
        self.features = nn.Sequential(*layers)
        self.head = nn.Linear(c_in, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # x: (B, 3, S, S)
        x = self.features(x)  # (B, C, S / 2**stages, same)
        return self.head(torch.flatten(nn.functional.adaptive_avg_pool2d(x, 1), 1))


@register("cnn")
def cnn(
    num_classes: int = 10, depth: int = 4, kernel_size: int = 3, width: int = 32, image_size: int = 32
) -> nn.Module:
    return CNN(num_classes, depth, kernel_size, width, image_size)


def count_parameters(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())
