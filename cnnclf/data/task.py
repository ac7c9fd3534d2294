"""A task's data, ready to train on: `load_task` finds (or downloads) it, decodes it once (cached), splits
it, seeded, and describes it all in a manifest; `prune_caches` removes the caches it no longer keys to.

Layouts read (cnnclf/data/layouts.py):
- CIFAR-10: torchvision's `cifar-10-batches-py` (downloaded when missing; every file's
  md5 is checked against the official one before it is unpickled), or an image-folder
  tree `{train,test}/<class>/*` in any format PIL reads.
- Cat/Dog: Kaggle's flat `train/{cat,dog}.N.jpg`; class folders (`Cat/Dog`,
  `cats/dogs`, any case) alone or under `train/` with `test/` or `validation/` beside;
  Microsoft's `PetImages/{Cat,Dog}` (downloaded when missing).

A folder that holds images in none of these layouts (a class folder misspelled or missing)
is refused, never replaced by a download: downloads go only into an empty or new folder.
Folders beside a layout's own (`unicorn/` beside `cat/` and `dog/`) are not read; their files
are counted in the manifest as skipped, with the reason.
"""

from __future__ import annotations

import dataclasses
import json
import sys
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from cnnclf.config import CLASSES
from cnnclf.data.cache import (
    cache_dir,
    cache_dirs,
    decode_source,
    fallback_cache_dir,
    name_digest,
    prune_dir,
    source_keys,
    write_or_error,
)
from cnnclf.data.cifar import load_torchvision_cifar10
from cnnclf.data.downloads import download_catdog, download_cifar10
from cnnclf.data.errors import CACHE_DIR, DataError, Source, printable
from cnnclf.data.layouts import Found, base_folder, count_images, find, foreign_entries, mismatch, unknown_files
from cnnclf.data.splits import TaskData, data_digest, stratified_split, stratified_subset


@dataclass(frozen=True)
class LoadOptions:
    """How `load_task` reads and splits a task's data. `load_task(task, dir, subset=1000)` changes some
    of them (through dataclasses.replace, so a misspelled name fails loudly)."""

    image_size: int | None = None  # px; None: 32 for CIFAR-10, 128 for Cat/Dog
    val_fraction: float = 0.1  # of the labelled training images, stratified
    test_fraction: float = 0.1  # of all images, stratified, where the data set has no labelled test set
    subset: int | None = None  # training images kept (stratified); val and test stay whole
    eval_subset: int | None = None  # caps val and test too (smoke tests)
    seed: int = 0  # of the splits and subsets
    download_missing: bool = True  # into an empty or missing folder only
    progress: bool = True  # a decoding progress bar, on a terminal


@dataclass(frozen=True)
class _Read:
    """What `load_task` found and decoded, before the split."""

    task: str
    root: Path  # the folder asked for
    base: Path  # the folder the file names in caches and manifests are relative to
    layout: str
    size: int  # px
    source_key: str  # the current file list's cache key at this size
    cache_dir: Path | None  # None: no writable cache folder
    raw: dict  # x uint8 (N, 3, S, S), y, test (bool per image), files, skipped, cache_error
    skipped: list[tuple[str, str, str]]  # (file, reason, detail): raw's, then those in unknown folders
    unknown_folders: list[dict]


def load_task(task: str, data_dir: str | Path = "data", options: LoadOptions | None = None, **changes: Any) -> TaskData:
    """Find (or download) a task's data, decode it once (cached) and split it, seeded.

    `options` (LoadOptions; `changes` replace some of its fields): val is `val_fraction` of the labelled
    training images, stratified. test: the data set's own labelled test set, or else (Kaggle Cat/Dog,
    PetImages) a stratified `test_fraction` of all images, carved out before the validation split.
    `subset` keeps that many training images; val and test stay whole unless `eval_subset` caps them
    too (smoke tests).

    A folder holding images in no layout of the task raises DataError; a download goes only into
    an empty or missing folder. Without a writable cache folder the run goes on uncached, says so in
    one line on stderr, and the manifest's `cache_dir` and `manifest_path` are None.
    """
    opts = dataclasses.replace(options or LoadOptions(), **changes)
    read = _read(task, Path(data_dir).expanduser(), opts)
    idx, test_source = _split(read.raw["y"], read.raw["test"], opts)
    if any(len(i) == 0 for i in idx.values()):
        raise DataError(f"too few readable {task} images under {read.root} to split into train/val/test")
    split_files = {k: [read.raw["files"][i] for i in v.tolist()] for k, v in idx.items()}
    manifest = _manifest(read, idx, split_files, test_source, opts.seed)
    manifest["manifest_path"] = _save_manifest(read, manifest, split_files)
    x, y = read.raw["x"], read.raw["y"]
    data = TaskData(
        task=task,
        classes=list(CLASSES[task]),
        train_x=x[idx["train"]],
        train_y=y[idx["train"]],
        val_x=x[idx["val"]],
        val_y=y[idx["val"]],
        test_x=x[idx["test"]],
        test_y=y[idx["test"]],
        manifest=manifest,
    )
    manifest["digest"] = data_digest(data)
    return data


def _check_task(task: str) -> None:
    if task not in CLASSES:
        raise DataError(f"unknown task {task!r}; expected one of {', '.join(CLASSES)}")


def _source(found: Found) -> Source | None:
    """The files to decode; None for torchvision's batches."""
    return None if found.layout == "torchvision" else found.where  # type: ignore[return-value]


def _read(task: str, root: Path, opts: LoadOptions) -> _Read:
    """Find the task's data under root (or download it) and decode it, or read its cache."""
    _check_task(task)
    size = opts.image_size or (32 if task == "cifar10" else 128)
    existing = next(p for p in (root, *root.parents) if p.exists() or p == p.parent)
    if existing.exists() and not existing.is_dir():
        raise DataError(f"{existing} is a file, not a data folder")
    found = _locate(task, root, opts.download_missing)
    base = base_folder(found, root)
    source = _source(found)
    source_key = source_keys(source, base)(size)
    cache = cache_dir(base)  # also removes what killed writes left, before this run adds to the disk
    if source is None:
        raw = load_torchvision_cifar10(base)
        if size != 32:
            raw["x"] = F.interpolate(raw["x"].float(), size=size, mode="bilinear").round().clamp(0, 255).byte()
    else:
        raw = decode_source(source, base, size, task, progress=opts.progress, key=source_key)
    unknown_skipped, unknown_folders = unknown_files(found.unknown, base)
    skipped = list(raw["skipped"]) + unknown_skipped
    if len(raw["y"]) == 0:
        raise DataError(f"no readable {task} images under {root} ({len(skipped)} files skipped)")
    return _Read(task, root, base, found.layout, size, source_key, cache, raw, skipped, unknown_folders)


def _locate(task: str, root: Path, download_missing: bool, hint: str = ", or run without --no-download") -> Found:
    """Find the task's data under root, downloading it only into an empty or missing folder."""
    found = find(task, root)
    if found is not None:
        return found
    how = (
        "torchvision's cifar-10-batches-py or a {train,test}/<class>/ image tree"
        if task == "cifar10"
        else "Kaggle's dogs-vs-cats train/{cat,dog}.N.jpg, Cat/Dog class folders or PetImages"
    )
    foreign = foreign_entries(root, task)
    images = count_images(foreign)
    if images[0]:
        raise mismatch(root, task, images, how)
    if not download_missing:
        raise DataError(f"no {task} data under {root}; put {how} there{hint}")
    if foreign:
        more = f" and {len(foreign) - 1} more" if len(foreign) > 1 else ""
        raise DataError(
            f"no {task} data under {root}, and it is not empty ({foreign[0].name}{more}): a download goes only "
            f"into an empty or new folder; point --data-dir at one, or put {how} there"
        )
    created = [p for p in (root, *root.parents) if not p.exists()]  # deepest first
    try:
        (download_cifar10 if task == "cifar10" else download_catdog)(root)
    except DataError:
        for d in created:  # a failed download leaves no empty folders behind (a kept .part stays)
            try:
                d.rmdir()
            except OSError:
                break
        raise
    found = find(task, root)
    if found is None:
        raise DataError(f"downloaded {task} data into {root} but could not find it there")
    return found


def _split(y: torch.Tensor, is_test: torch.Tensor, opts: LoadOptions) -> tuple[dict[str, torch.Tensor], str]:
    """Indices of the train, val and test images, seeded and stratified, and where test comes from."""
    if bool(is_test.any()):
        pool_idx = torch.nonzero(~is_test).flatten()
        test_idx = torch.nonzero(is_test).flatten()
        test_source = "labelled test set"
    else:
        pool_idx, test_idx = stratified_split(y, opts.test_fraction, seed=10_000 + opts.seed)
        test_source = f"seeded stratified {opts.test_fraction:.0%} of the labelled images"
    keep, val = stratified_split(y[pool_idx], opts.val_fraction, seed=20_000 + opts.seed)
    train_idx, val_idx = pool_idx[keep], pool_idx[val]
    if opts.subset is not None:
        train_idx = train_idx[stratified_subset(y[train_idx], opts.subset, seed=30_000 + opts.seed)]
    if opts.eval_subset is not None:
        val_idx = val_idx[stratified_subset(y[val_idx], opts.eval_subset, seed=40_000 + opts.seed)]
        test_idx = test_idx[stratified_subset(y[test_idx], opts.eval_subset, seed=50_000 + opts.seed)]
    return {"train": train_idx, "val": val_idx, "test": test_idx}, test_source


def _manifest(
    read: _Read, idx: dict[str, torch.Tensor], split_files: dict[str, list[str]], test_source: str, seed: int
) -> dict:
    """The data's source, layout, counts, skipped files and splits, as JSON-ready values."""
    return {
        "task": read.task,
        "root": printable(str(read.root.resolve())),
        "base": printable(str(read.base.resolve())),
        "layout": read.layout,
        "image_size": read.size,
        "source_key": read.source_key,  # prune_caches keeps the manifests of the current file list
        "cache_dir": printable(str(read.cache_dir)) if read.cache_dir is not None else None,
        "files_read": len(read.raw["files"]),
        "files_skipped": len(read.skipped),
        "skipped_by_reason": dict(sorted(Counter(r for _, r, _ in read.skipped).items())),
        "skipped": [{"file": f, "reason": r, "detail": d} for f, r, d in read.skipped],
        "unknown_folders": read.unknown_folders,
        "seed": seed,
        "test_source": test_source,
        "splits": {
            k: {
                "n": len(files),
                "per_class": torch.bincount(read.raw["y"][idx[k]], minlength=len(CLASSES[read.task])).tolist(),
                "sha256": name_digest(files),
            }
            for k, files in split_files.items()
        },
    }


def _save_manifest(read: _Read, manifest: dict, split_files: dict[str, list[str]]) -> str | None:
    """Write the manifest into the cache folder; its path, or None with a one-line note on stderr (also
    when the decode cache could not be written)."""
    if read.cache_dir is None:
        path, error = None, "no writable cache folder"
    else:
        path, error = _write_manifest(read.cache_dir, manifest, split_files)
    cache_error = read.raw["cache_error"]
    if cache_error or error:
        tried = ", ".join(str(d) for d in (read.base / CACHE_DIR, fallback_cache_dir(read.base)) if d is not None)
        lost = ["the next run decodes the images again"] if cache_error else []
        lost += ["no manifest file is written"] if path is None else []
        why = cache_error or error
        print(f"cnnclf: note: running without a cache ({why}; tried {tried}): {' and '.join(lost)}", file=sys.stderr)
    return printable(str(path)) if path is not None else None


def _write_manifest(d: Path, manifest: dict, split_files: dict[str, list[str]]) -> tuple[Path | None, str | None]:
    """The manifest with every split's file list, named by its content so reruns reuse it; (path, error)."""
    full = {**manifest, "split_files": split_files}
    key = name_digest([json.dumps(full, sort_keys=True)])
    path = d / f"manifest-{manifest['task']}-{manifest['image_size']}px-{key}.json"
    if path.exists():
        return path, None
    error = write_or_error(path, lambda tmp: tmp.write_text(json.dumps(full, indent=1)))
    return (None, error) if error else (path, None)


def prune_caches(task: str, data_dir: str | Path = "data", image_size: int | None = None) -> list[Path]:
    """Remove the decode caches and manifests of `task` that the data's current file list no longer keys to.

    The data is found as `load_task` finds it (never downloaded: DataError if there is none). In its
    cache folders (`<data>/.cnnclf-cache/` and its per-folder fallback under `$XDG_CACHE_HOME/cnnclf/`)
    this removes every `<task>-<S>px-<key>.pt` whose key is not the current file list's at S, every
    `manifest-<task>-<S>px-*.json` not written for the current file list, and stale temp files.
    `image_size` given: the caches and manifests at other resolutions go too. Files of other tasks,
    and the live temp files of a run writing now, are kept. Returns the removed paths.
    """
    _check_task(task)
    root = Path(data_dir).expanduser()
    found = _locate(task, root, download_missing=False, hint="")
    base = base_folder(found, root)
    current = source_keys(_source(found), base)
    removed: list[Path] = []
    for d in cache_dirs(base):
        removed += prune_dir(d, task, current, image_size)
    return sorted(removed)
