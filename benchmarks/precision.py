"""Training-step speed of the sweeps' CNNs in float32 and bfloat16 autocast, with and without channels-last
tensors: what `precision=auto` rests on (cnnclf.train.uses_bf16).

    OMP_NUM_THREADS=1 python benchmarks/precision.py            # one core, as a sweep's trial has
    python benchmarks/precision.py --threads 2 --steps 20

Times the forward pass, backward pass and SGD step on synthetic batches (no data, no augmentation), after
3 untimed steps, and prints images per second per configuration. On the 2-core development CPU (AVX512-BF16)
bf16 with channels-last trained 1.9-2.4x the images of float32 (docs/results.md). Run it with nothing else
on the machine.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from cnnclf.models import build_model
from cnnclf.train import cpu_has_bf16

# (name, image size, width, depth, kernel, batch): the Cat/Dog and CIFAR-10 reference configurations and a
# costly CIFAR-10 trial.
CASES = (
    ("catdog 64px w16 d6 k3 b64", 64, 16, 6, 3, 64),
    ("cifar10 w32 d6 k3 b64", 32, 32, 6, 3, 64),
    ("cifar10 w48 d6 k5 b32", 32, 48, 6, 5, 32),
)


def images_per_s(size: int, width: int, depth: int, k: int, batch: int, channels_last: bool, bf16: bool,
                 steps: int) -> float:  # fmt: skip
    model = build_model("cnn", num_classes=10, depth=depth, kernel_size=k, width=width, image_size=size)
    opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
    x, y = torch.randn(batch, 3, size, size), torch.randint(0, 10, (batch,))
    if channels_last:
        model, x = model.to(memory_format=torch.channels_last), x.contiguous(memory_format=torch.channels_last)

    def step() -> None:
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
            loss = torch.nn.functional.cross_entropy(model(x), y)
        opt.zero_grad()
        loss.backward()
        opt.step()

    for _ in range(3):
        step()
    t0 = time.perf_counter()
    for _ in range(steps):
        step()
    return batch * steps / (time.perf_counter() - t0)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's own)")
    p.add_argument("--steps", type=int, default=12)
    args = p.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} thread(s), CPU bf16 units: {cpu_has_bf16()}")
    for name, *shape in CASES:
        fp32 = images_per_s(*shape, channels_last=False, bf16=False, steps=args.steps)
        row = [f"{name:26s} fp32 {fp32:6.0f} img/s"]
        for cl, bf in ((False, True), (True, False), (True, True)):
            r = images_per_s(*shape, channels_last=cl, bf16=bf, steps=args.steps)
            row.append(f"{'bf16' if bf else 'fp32'}{'+cl' if cl else ''} {r:6.0f} ({r / fp32:.2f}x)")
        print("  ".join(row), flush=True)


if __name__ == "__main__":
    main()
