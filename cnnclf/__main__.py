"""Command line: train, predict and prepare.

    python -m cnnclf train --task cifar10 --preset cifar10-seed --data-dir data
    python -m cnnclf train --task catdog --preset catdog-strong --subset 4000 --epochs 5 --save cd.pt --json
    python -m cnnclf predict --checkpoint cd.pt photo1.jpg photo2.jpg
    python -m cnnclf prepare --task catdog --data-dir data

Exit codes: 0 success, 2 bad arguments or unusable input (one line on stderr naming the
flag or file), 1 anything else (a diverged run included). Every argument is checked before
anything is written or any data is read, so a bad one costs no time and leaves nothing behind.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys
from pathlib import Path

from cnnclf.args import Parser, UsageError, one_line, positive_int
from cnnclf.args import path as path_arg
from cnnclf.config import (
    DEFAULT_PRESET,
    PRESETS,
    TASKS,
    ConfigError,
    Flag,
    TrainConfig,
    flag_fields,
    flag_name,
    get_preset,
)

# cnnclf.data, cnnclf.train and torch are imported inside the commands: a mistyped flag is
# reported in a fraction of a second instead of after torch's import.


def build_parser() -> Parser:
    p = Parser(prog="cnnclf", description="Train and use small CNNs on CIFAR-10 and Cat/Dog.")
    sub = p.add_subparsers(dest="command", required=True, parser_class=Parser)

    t = sub.add_parser("train", help="train one configuration")
    t.add_argument("--preset", choices=sorted(PRESETS), help="starting config (default: the task's seed baseline)")
    add_config_flags(t)
    t.add_argument("--data-dir", type=path_arg, default=Path("data"))
    t.add_argument("--no-download", action="store_true", help="fail (exit 2) instead of downloading missing data")
    t.add_argument("--device", choices=["auto", "cpu", "cuda"], default="auto")
    t.add_argument("--save", type=path_arg, help="write a checkpoint here after every epoch (for predict, or --resume)")
    t.add_argument(
        "--resume", type=path_arg, help="continue a checkpoint written by --save; a larger --epochs trains on"
    )
    t.add_argument("--json", action="store_true", help="print the result as one JSON object, last on stdout")

    pr = sub.add_parser("predict", help="classify images with a saved checkpoint")
    pr.add_argument("--checkpoint", type=path_arg, required=True)
    pr.add_argument("images", type=path_arg, nargs="+")
    pr.add_argument("--device", choices=["auto", "cpu", "cuda"], default="cpu")
    pr.add_argument("--json", action="store_true")

    pp = sub.add_parser("prepare", help="download (if missing), decode and cache a task's data")
    pp.add_argument("--task", choices=TASKS, required=True)
    pp.add_argument("--data-dir", type=path_arg, default=Path("data"))
    pp.add_argument("--image-size", type=positive_int)
    pp.add_argument("--no-download", action="store_true")
    pp.add_argument(
        "--prune",
        action="store_true",
        help="remove the decode caches that the current files no longer match (with --image-size: other sizes too)",
    )
    return p


def add_config_flags(parser: argparse.ArgumentParser) -> None:
    """A flag for each TrainConfig field that declares one (cnnclf.config.flag): names follow TrainConfig (and
    torch); a bool is --x/--no-x; a flag left out is None and keeps the preset's value."""
    for f in flag_fields():
        how: Flag = f.metadata["flag"]
        if isinstance(f.default, bool):
            parser.add_argument(flag_name(f.name), action=argparse.BooleanOptionalAction, default=None, help=how.help)
        else:
            kw = {"type": how.type, "choices": how.choices, "help": how.help, "required": how.required}
            parser.add_argument(flag_name(f.name), **kw)


_FLAG_FIELDS = [f.name for f in flag_fields() if f.name != "task"]  # the task picks the preset


def config_from_args(args: argparse.Namespace) -> TrainConfig:
    preset = get_preset(args.preset or DEFAULT_PRESET[args.task])
    if preset.task != args.task:
        raise UsageError(f"argument --preset: {args.preset} is a {preset.task} preset, not {args.task}")
    changes = {f: getattr(args, f) for f in _FLAG_FIELDS if getattr(args, f) is not None}
    if changes.get("optimizer") == "sgd" and args.amsgrad:
        raise UsageError("argument --amsgrad: only applies to --optimizer adam or adamw")
    try:
        return preset.replace(**changes)
    except ConfigError as e:
        raise UsageError(f"argument --{str(e).split('=', 1)[0].replace('_', '-')}: {e}") from None


def _device(name: str):
    from cnnclf.train import resolve_device

    try:
        return resolve_device(name)
    except RuntimeError as e:
        raise UsageError(f"argument --device: {e}") from None


def _load_task(task: str, data_dir: Path, **kw: object):
    from cnnclf.data import DataError, load_task

    try:
        return load_task(task, data_dir, **kw)
    except DataError as e:
        raise UsageError(str(e)) from None


def _check_model(cfg: TrainConfig) -> None:
    from cnnclf.train import check_model_fits

    try:
        check_model_fits(cfg)
    except ValueError as e:
        raise UsageError(f"argument --image-size: {e}") from None


def _check_output_file(path: Path, flag: str) -> None:
    """A file the run will write at the end: refuse a folder or an unwritable place now, not after training."""
    if path.is_dir():
        raise UsageError(f"argument {flag}: {path} is a folder; give a file name")
    parent = next(p for p in path.parents if p.exists())  # missing folders are created at the end
    if not parent.is_dir():
        raise UsageError(f"argument {flag}: {parent} is a file, not a folder")
    if not os.access(parent, os.W_OK):
        raise UsageError(f"argument {flag}: {parent} is not writable")


def _load_resume(path: Path, cfg: TrainConfig) -> dict:
    """The checkpoint to continue, if it was trained with cfg (its epochs aside: a larger --epochs trains on)."""
    from cnnclf.train import CheckpointError, load_checkpoint

    if not path.is_file():
        raise UsageError(f"argument --resume: no checkpoint at {path}")
    try:
        state = load_checkpoint(path)
    except CheckpointError as e:
        raise UsageError(f"argument --resume: {e}") from None
    saved = TrainConfig.from_dict(state["config"])
    if saved.replace(epochs=cfg.epochs) != cfg:
        fields = [f.name for f in dataclasses.fields(cfg) if f.compare]
        changed = [n for n in fields if getattr(saved, n) != getattr(cfg, n)]
        raise UsageError(
            f"argument --resume: {path} was trained with a different config ({', '.join(changed)}); "
            "only --epochs may change"
        )
    if int(state["epoch"]) > cfg.epochs:
        raise UsageError(f"argument --resume: {path} is at epoch {state['epoch']}, beyond --epochs {cfg.epochs}")
    return state


def _skipped_summary(m: dict) -> str:
    reasons = ", ".join(f"{n} {r}" for r, n in m.get("skipped_by_reason", {}).items())
    return f"{m['files_skipped']} files skipped" + (f": {reasons}" if reasons else "")


def cmd_train(args: argparse.Namespace) -> int:
    from tqdm.auto import tqdm

    from cnnclf.train import train

    cfg = config_from_args(args)
    _check_model(cfg)
    device = _device(args.device)
    resume = _load_resume(args.resume, cfg) if args.resume is not None else None
    if args.save is not None:
        _check_output_file(args.save, "--save")
    data = _load_task(
        cfg.task,
        args.data_dir,
        image_size=cfg.image_size,
        val_fraction=cfg.val_fraction,
        test_fraction=cfg.test_fraction,
        subset=cfg.subset,
        eval_subset=cfg.eval_subset,
        seed=cfg.data_seed,
        download_missing=not args.no_download,
    )
    m = data.manifest
    print(
        f"{cfg.task}: {m['splits']['train']['n']} train / {m['splits']['val']['n']} val / "
        f"{m['splits']['test']['n']} test images ({m['layout']}; {_skipped_summary(m)}; "
        f"manifest {m['manifest_path'] or 'not written: no cache'}); device {device}",
        file=sys.stderr,
    )
    done = resume is not None and int(resume["epoch"]) >= cfg.epochs
    if done:
        print(f"{args.resume}: already trained {cfg.epochs} epochs; nothing left to train", file=sys.stderr)
    bar = tqdm(total=cfg.epochs, initial=resume["epoch"] if resume else 0, desc="epochs", unit="ep", file=sys.stderr)

    def report(epoch: int, metrics: dict, save) -> None:
        bar.update(1)
        bar.set_postfix({k: f"{metrics[k]:.3f}" for k in ("train/loss", "val/acc") if k in metrics})
        if args.save is not None and save is not None:
            save(args.save)  # every epoch (atomically): a killed run resumes from its last epoch

    result = train(cfg, data, report, device=device, resume=resume)
    bar.close()
    if done and args.save is not None and args.save.resolve() != args.resume.resolve():
        from cnnclf.train import save_checkpoint

        save_checkpoint(resume, args.save)
    data_summary = {
        "layout": m["layout"],
        "files_read": m["files_read"],
        "files_skipped": m["files_skipped"],
        "skipped_by_reason": m["skipped_by_reason"],
        "manifest": m["manifest_path"],
        "digest": m["digest"],  # the sweep records the same digest on every run (docs/tracking.md)
        "n": {k: v["n"] for k, v in m["splits"].items()},
    }
    if args.json:
        out = {k: v for k, v in result.items() if k != "confusion"}
        print(json.dumps(out | {"config": cfg.to_dict(), "data": data_summary}))
    elif result["status"] != "diverged":  # a diverged run has no test metrics to print
        _print_summary(result)
    if result["status"] == "diverged":
        print(
            f"cnnclf: error: training diverged at epoch {result['epochs']} (non-finite loss); try a lower --lr",
            file=sys.stderr,
        )
        return 1
    return 0


def _print_summary(result: dict) -> None:
    print(
        f"val/acc {result['val/acc']:.4f}  test/acc {result['test/acc']:.4f}  "
        f"{result['throughput/train_img_s']:.0f} train img/s ({result['precision']})  {result['seconds']:.1f} s"
        + (f" (compiling {result['time/compile_s']:.1f} s)" if "time/compile_s" in result else "")
    )
    print("per-class test accuracy:")
    for name in result["classes"]:
        print(f"  {name:<12s} {100 * result[f'test/acc/{name}']:5.1f}%")


def cmd_predict(args: argparse.Namespace) -> int:
    if not args.checkpoint.is_file():
        raise UsageError(f"argument --checkpoint: no checkpoint at {args.checkpoint}")
    for path in args.images:
        if not path.is_file():
            raise UsageError(f"{path}: no such image file")
    import torch

    from cnnclf.data import Normalizer, decode_image, strict_decoding
    from cnnclf.train import CheckpointError, load_model

    device = _device(args.device)
    try:
        model, cfg, meta = load_model(args.checkpoint, device)
    except CheckpointError as e:
        raise UsageError(f"argument --checkpoint: {e}") from None
    except Exception as e:  # keys and shapes that do not make the model the config names
        raise UsageError(
            f"argument --checkpoint: {args.checkpoint} is not a cnnclf checkpoint ({type(e).__name__})"
        ) from None
    images = []
    for path in args.images:
        try:
            with strict_decoding():
                images.append(torch.from_numpy(decode_image(path, cfg.image_size)).permute(2, 0, 1))
        except Exception as e:
            raise UsageError(f"{path}: not a readable image ({type(e).__name__})") from None
    normalize = Normalizer(meta["mean"], meta["std"], device)
    with torch.no_grad():
        probs = torch.softmax(model(normalize(torch.stack(images).to(device))).float(), dim=1).cpu()
    rows = []
    for path, p in zip(args.images, probs, strict=True):
        k = int(p.argmax())
        rows.append({"image": str(path), "class": meta["classes"][k], "probability": float(p[k])})
    if args.json:
        print(json.dumps(rows))
    else:
        for r in rows:
            print(f"{r['image']}\t{r['class']}\t{r['probability']:.3f}")
    return 0


def cmd_prepare(args: argparse.Namespace) -> int:
    if args.image_size is not None:
        try:
            get_preset(DEFAULT_PRESET[args.task]).replace(image_size=args.image_size)  # the range training accepts
        except ConfigError as e:
            raise UsageError(f"argument --image-size: {e}") from None
    if args.prune:
        from cnnclf.data import DataError, prune_caches

        try:
            removed = prune_caches(args.task, args.data_dir, image_size=args.image_size)
        except DataError as e:
            raise UsageError(str(e)) from None
        for path in removed:
            print(path)
        print(f"removed {len(removed)} stale cache files", file=sys.stderr)
        return 0
    data = _load_task(args.task, args.data_dir, image_size=args.image_size, download_missing=not args.no_download)
    m = data.manifest
    print(json.dumps({k: v for k, v in m.items() if k != "skipped"} | {"skipped": m["skipped"][:20]}, indent=1))
    return 0


def main(argv: list[str] | None = None) -> int:
    try:
        args = build_parser().parse_args(argv)
        return {"train": cmd_train, "predict": cmd_predict, "prepare": cmd_prepare}[args.command](args)
    except UsageError as e:
        print(f"cnnclf: error: {one_line(e)}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("cnnclf: interrupted", file=sys.stderr)
        return 130
    except Exception as e:
        if os.environ.get("CNNCLF_DEBUG"):
            raise
        print(
            f"cnnclf: error: {type(e).__name__}: {one_line(e)} (set CNNCLF_DEBUG=1 for the traceback)", file=sys.stderr
        )
        return 1


if __name__ == "__main__":
    sys.exit(main())
