"""A model's accuracy on a split: overall, per class, and its confusion matrix; and the test split's metrics."""

from __future__ import annotations

import torch
from torch import nn

from cnnclf.data import Normalizer, eval_batches
from cnnclf.device import autocast


@torch.no_grad()
def evaluate(
    model: nn.Module,
    split: tuple[torch.Tensor, torch.Tensor],
    normalize: Normalizer,
    num_classes: int,
    batch_size: int = 1024,
    bf16: bool | None = None,
) -> dict:
    """Accuracy, mean loss, per-class accuracy and confusion matrix (rows: true, cols: predicted), under
    bf16 autocast with channels-last inputs when `bf16` (None: on CUDA). `split`: its images and labels."""
    x, y = split
    was_training = model.training
    model.eval()
    device = x.device
    channels_last = bf16 = device.type == "cuda" if bf16 is None else bf16
    loss_sum = torch.zeros((), device=device, dtype=torch.float64)
    confusion = torch.zeros(num_classes * num_classes, device=device, dtype=torch.int64)
    for xb, yb in eval_batches(x, y, batch_size, normalize):
        if channels_last:
            xb = xb.contiguous(memory_format=torch.channels_last)
        with autocast(device, bf16):
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
