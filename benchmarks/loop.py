"""Training-loop speed: cnnclf's on-device loop against a plain seed-style loop, side by side.

    python benchmarks/loop.py --data-dir /tmp/data/cifar10-jpg --batch-sizes 4 128

The seed-style loop is the PyTorch tutorial's: torchvision ImageFolder (or CIFAR10 for
torchvision's layout) + DataLoader(num_workers=2) with ToTensor/Normalize on the CPU,
per image. Both loops train the same model with the same optimizer and batch size;
cnnclf's figure is `throughput/train_img_s` of one epoch of `cnnclf.train.train` on a
stratified subset (decoding is cached and not timed, as in a real run's second epoch).
Targets on the 2-core CPU, tutorial net: >= 5x at batch 128, >= 2.5x at batch 4.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch
from torch import nn

from cnnclf.config import PRESETS
from cnnclf.data import find_cifar10, load_task
from cnnclf.train import model_for, resolve_device, train


def seed_style_img_s(data_dir: Path, batch_size: int, images: int, device: torch.device, preset: str) -> float:
    import torchvision
    import torchvision.transforms as T

    cfg = PRESETS[preset]
    tf = T.Compose([T.ToTensor(), T.Normalize((0.5, 0.5, 0.5), (0.5, 0.5, 0.5))])
    layout, where = find_cifar10(data_dir)
    if layout == "torchvision":
        ds = torchvision.datasets.CIFAR10(str(where), train=True, transform=tf)
    else:
        train_dir = Path(where[0][0]).parent.parent  # <root>/train/<class>/<file>
        ds = torchvision.datasets.ImageFolder(str(train_dir), transform=tf)
    loader = torch.utils.data.DataLoader(ds, batch_size=batch_size, shuffle=True, num_workers=2)
    torch.manual_seed(0)
    model = model_for(cfg, 10).to(device)
    opt = torch.optim.Adam(model.parameters(), lr=cfg.lr, amsgrad=cfg.amsgrad)
    crit = nn.CrossEntropyLoss()
    warmup = max(2, 200 // batch_size)
    seen, t0 = 0, None
    for i, (x, y) in enumerate(loader):
        if i == warmup:
            t0, seen = time.perf_counter(), 0
        x, y = x.to(device), y.to(device)
        opt.zero_grad()
        loss = crit(model(x), y)
        loss.backward()
        opt.step()
        seen += len(y)
        if t0 is not None and seen >= images:
            break
    if device.type == "cuda":
        torch.cuda.synchronize()
    return seen / (time.perf_counter() - t0)


def cnnclf_img_s(data_dir: Path, batch_size: int, images: int, device: torch.device, preset: str) -> float:
    cfg = PRESETS[preset].replace(batch_size=batch_size, epochs=1, subset=images)
    data = load_task("cifar10", data_dir, subset=images, download_missing=False, progress=False)
    return train(cfg, data, device=device)["throughput/train_img_s"]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--data-dir", type=Path, required=True)
    p.add_argument("--batch-sizes", type=int, nargs="+", default=[4, 128])
    p.add_argument(
        "--images", type=int, default=0, help="images timed per loop (default: 6000 at batch < 32, else 30000)"
    )
    p.add_argument("--preset", default="cifar10-seed", help="model/optimizer to time (default: the tutorial net)")
    p.add_argument("--device", default="auto")
    args = p.parse_args()
    device = resolve_device(args.device)
    load_task("cifar10", args.data_dir, download_missing=False)  # decode and cache once, untimed
    rows = []
    for bs in args.batch_sizes:
        n = args.images or (6000 if bs < 32 else 30000)
        seed = seed_style_img_s(args.data_dir, bs, n, device, args.preset)
        ours = cnnclf_img_s(args.data_dir, bs, n, device, args.preset)
        rows.append(
            {"batch_size": bs, "seed_img_s": round(seed), "cnnclf_img_s": round(ours), "ratio": round(ours / seed, 2)}
        )
        print(
            f"batch {bs:4d}: seed-style {seed:8.0f} img/s   cnnclf {ours:8.0f} img/s   ratio {ours / seed:5.2f}x",
            flush=True,
        )
    print(json.dumps({"device": str(device), "threads": torch.get_num_threads(), "preset": args.preset, "rows": rows}))


if __name__ == "__main__":
    main()
