"""Find, download and decode the data sets, split them, and feed batches on the device.

Files are decoded once into uint8 tensors (N, 3, S, S) and cached beside the data,
keyed by the file list and the resolution. A training run moves those tensors to
its device once; shuffling, augmentation and normalization then run there, a whole
batch at a time, with no per-image Python work inside an epoch.

Layouts read:
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

import contextlib
import dataclasses
import hashlib
import json
import math
import os
import re
import sys
import tarfile
import tempfile
import time
import urllib.error
import urllib.request
import zipfile
from collections import Counter
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from cnnclf.config import CATDOG_CLASSES, CIFAR10_CLASSES, CLASSES

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)

PETIMAGES_URL = (
    "https://download.microsoft.com/download/3/E/1/3E1C3F21-ECDB-4869-8368-6DEBA77B919F/kagglecatsanddogs_5340.zip"
)
CACHE_DIR = ".cnnclf-cache"
_CACHE_VERSION = 4  # bump when decoding, skipping or the cache format changes, so stale caches are not reused

# Pixels one image may decode to (width x height, after JPEG's draft scaling), checked from the
# header before any pixel is decoded. 40 Mpx is far above the photos of these data sets and costs
# at most about 300 MB per image being decoded (4 bytes a pixel, plus its RGB copy); a 500 KB PNG
# can declare 13,000 x 13,000 pixels and take 2 GB. Larger images are skipped as `image too large`.
MAX_IMAGE_PIXELS = 40_000_000

# What each image extension may hold (PIL's format names). A file whose content is another
# format is skipped: a .jpg that holds a PNG, GIF or WEBP was renamed or mislabelled upstream.
# MPO is the multi-picture JPEG that phone cameras write; PIL names it separately.
IMAGE_FORMATS: dict[str, tuple[str, ...]] = {
    **dict.fromkeys((".jpg", ".jpeg", ".jpe", ".jfif"), ("JPEG", "MPO")),
    ".png": ("PNG",),
    ".gif": ("GIF",),
    ".webp": ("WEBP",),
    ".bmp": ("BMP",),
    **dict.fromkeys((".tif", ".tiff"), ("TIFF",)),
    **dict.fromkeys((".ppm", ".pgm", ".pbm", ".pnm"), ("PPM",)),
}
# Files that operating systems drop into image folders (Windows thumbnails, macOS metadata).
SYSTEM_FILES = frozenset({"thumbs.db", "ehthumbs.db", "desktop.ini", ".ds_store"})
# Skip reasons that depend on the machine rather than the file's bytes (permissions, I/O errors):
# a decode with any of these is not cached, so fixing the cause is seen by the next run.
_TRANSIENT_REASONS = frozenset({"unreadable file"})
_MAGIC = (b"\xff\xd8\xff", b"\x89PNG\r\n\x1a\n", b"GIF87a", b"GIF89a")  # JPEG, PNG, GIF signatures

# What each task's download puts into the data folder: the extracted folder, and the archive
# (with its resumable `.part`) while the download is unfinished.
_DOWNLOADS = {
    "cifar10": ("cifar-10-batches-py", "cifar-10-python.tar.gz"),
    "catdog": ("PetImages", "kagglecatsanddogs_5340.zip"),
}

# Temporary files (`<name>.tmp<pid>`) of a killed write are removed by a later run once nothing
# can still be writing them: their process is gone and they were not touched for a minute (a
# writer on another host that shares the folder over NFS has a pid this host cannot see, but
# keeps touching its file), or whatever the pid, they were not touched for this long.
STALE_TEMP_S = 6 * 3600
_TEMP_QUIET_S = 60
_TEMP_RE = re.compile(r"\.tmp(\d+)$")


class DataError(Exception):
    """Data is missing, unreadable or could not be downloaded; the message is one line for the user."""


class FormatMismatch(ValueError):
    """The file's content is not the format its extension names."""

    def __init__(self, content: str, suffix: str) -> None:
        super().__init__(f"{content.lower()} content named {suffix}")


class ImageTooLarge(ValueError):
    """The image's header declares more than MAX_IMAGE_PIXELS pixels to decode."""


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


# ---------------------------------------------------------------------------------------------
# Downloads: into a `.part` file (resumed with an HTTP Range request), checked, then renamed;
# archives are extracted into a temporary folder and renamed into place, so a failure never
# leaves a half-written data set where the loader would find it.


def download(url: str, dest: Path, md5: str | None = None, desc: str | None = None) -> Path:
    from tqdm.auto import tqdm

    dest = Path(dest)
    if dest.exists():
        return dest
    dest.parent.mkdir(parents=True, exist_ok=True)
    part = dest.with_name(dest.name + ".part")
    have = part.stat().st_size if part.exists() else 0
    req = urllib.request.Request(url, headers={"Range": f"bytes={have}-"} if have else {})
    try:
        with urllib.request.urlopen(req, timeout=30) as resp:
            if have and resp.status != 206:  # server ignored the Range header: start over
                have = 0
            total = resp.length + have if resp.length is not None else None
            with (
                open(part, "ab" if have else "wb") as f,
                tqdm(total=total, initial=have, unit="B", unit_scale=True, desc=desc or dest.name) as bar,
            ):
                while chunk := resp.read(1 << 20):
                    f.write(chunk)
                    bar.update(len(chunk))
            if total is not None and part.stat().st_size != total:
                raise OSError(f"connection closed after {part.stat().st_size} of {total} bytes")
    except (urllib.error.URLError, OSError, TimeoutError) as e:
        kept = part.exists() and part.stat().st_size > 0
        if part.exists() and not kept:
            part.unlink()
        reason = getattr(e, "reason", None) or e
        hint = f"; {part} is kept and the next run resumes it" if kept else ""
        raise DataError(f"download of {url} failed ({reason}); the network is the likely cause{hint}") from None
    if md5 is not None:
        got = _file_md5(part)
        if got != md5:
            part.unlink()
            raise DataError(f"download of {url} is corrupt (md5 {got}, expected {md5}); run again to re-download")
    os.replace(part, dest)
    return dest


def _file_md5(path: Path) -> str:
    h = hashlib.md5()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 22):
            h.update(chunk)
    return h.hexdigest()


def _extract_into(archive: Path, root: Path, member: str) -> Path:
    """Extract `archive` and move its top-level `member` folder to `root/member`, atomically."""
    with tempfile.TemporaryDirectory(dir=root, prefix=".extract-") as tmp:
        try:
            if zipfile.is_zipfile(archive):
                with zipfile.ZipFile(archive) as zf:
                    bad = zf.testzip()  # reads every member and checks its CRC before anything is written
                    if bad is not None:
                        raise DataError(f"{archive} is corrupt (bad CRC in {bad}); delete it and run again")
                    zf.extractall(tmp)
            else:
                with tarfile.open(archive) as tf:
                    tf.extractall(tmp, filter="data")
        except (zipfile.BadZipFile, tarfile.TarError, EOFError) as e:
            raise DataError(f"{archive} is corrupt ({e}); delete it and run again") from None
        os.replace(Path(tmp) / member, root / member)
    return root / member


def _url(env: str, default: str) -> str:
    return os.environ.get(env, default)  # mirrors, and tests that simulate an unreachable network


def download_cifar10(root: Path) -> Path:
    from torchvision.datasets import CIFAR10

    root.mkdir(parents=True, exist_ok=True)
    url = _url("CNNCLF_CIFAR10_URL", CIFAR10.url)
    archive = download(url, root / CIFAR10.filename, md5=CIFAR10.tgz_md5, desc="CIFAR-10")
    out = _extract_into(archive, root, CIFAR10.base_folder)
    archive.unlink()
    return out


def download_catdog(root: Path) -> Path:
    root.mkdir(parents=True, exist_ok=True)
    url = _url("CNNCLF_CATDOG_URL", PETIMAGES_URL)
    archive = download(url, root / "kagglecatsanddogs_5340.zip", desc="PetImages")
    out = _extract_into(archive, root, "PetImages")
    archive.unlink()
    return out


# ---------------------------------------------------------------------------------------------
# Finding files in the supported layouts. A "source" is a list of (path, label, group), where
# group is "train" or "test" (a labelled test set the data came with); label None marks a file
# found where the data set lives but without a label (Kaggle's flat folder): skipped and counted.
# Folders beside the layout's own are listed as (folder, reason): not read, their files counted.

Source = list[tuple[Path, int | None, str]]
Unknown = list[tuple[Path, str]]

_SPLIT_DIRS = {"train": ("train", "training"), "test": ("test", "testing", "validation", "val", "valid")}


@dataclass
class _Found:
    layout: str  # "torchvision", "image-folder", "class-folders", "petimages", "kaggle-flat"
    where: Path | Source  # torchvision: the folder holding cifar-10-batches-py
    unknown: Unknown = field(default_factory=list)


def _subdirs(d: Path) -> dict[str, Path]:
    try:
        return {p.name.lower(): p for p in d.iterdir() if p.is_dir() and not p.name.startswith(".")}
    except OSError:
        return {}


def _files(d: Path) -> list[Path]:
    return sorted(p for p in d.rglob("*") if p.is_file() and CACHE_DIR not in p.parts)


def _class_hits(d: Path, classes: list[str]) -> dict[int, Path]:
    """Class folders in d, matched case-insensitively, singular or plural ('Cat', 'cats')."""
    sub = _subdirs(d)
    return {i: match for i, name in enumerate(classes) if (match := sub.get(name) or sub.get(name + "s")) is not None}


def _class_dirs(d: Path, classes: list[str]) -> dict[int, Path] | None:
    """Every class's folder in d, or None if any is missing."""
    found = _class_hits(d, classes)
    return found if len(found) == len(classes) else None


def _unknown_beside(d: Path, used: dict[int, Path] | list[Path], reason: str) -> Unknown:
    known = set(used.values() if isinstance(used, dict) else used)
    return [(p, reason) for _, p in sorted(_subdirs(d).items()) if p not in known]


def _other_task(d: Path, task: str) -> str | None:
    """The other task whose whole, larger class set d's sub-folders are: `cat/` and `dog/` inside a
    CIFAR-10 tree are not Cat/Dog data."""
    for other, classes in CLASSES.items():
        if other != task and len(classes) > len(CLASSES[task]) and _class_dirs(d, classes):
            return other
    return None


def _from_class_dirs(dirs: dict[int, Path], group: str) -> Source:
    return [(p, label, group) for label, d in dirs.items() for p in _files(d)]


def _partial_classes(d: Path, classes: list[str], hits: dict[int, Path]) -> DataError:
    found = ", ".join(sorted(p.name for p in _subdirs(d).values())[:12])
    missing = ", ".join(c for i, c in enumerate(classes) if i not in hits)
    return DataError(f"{d} holds the class folders {found} but none for {missing}; expected {', '.join(classes)}")


def _split_layout(root: Path, task: str) -> tuple[Source, Unknown] | None:
    """`root/{train,test|validation}/<class>/*`; the test folder is optional.

    A train or test folder that holds some of the class folders but not all (one misspelled or
    missing) is refused here: looking further down would take `test/` alone for the data set.
    """
    classes = CLASSES[task]
    sub = _subdirs(root)
    train_name = next((n for n in _SPLIT_DIRS["train"] if n in sub), None)
    if train_name is None or _other_task(sub[train_name], task):
        return None
    hits = _class_hits(sub[train_name], classes)
    if len(hits) < len(classes):
        if hits:
            raise _partial_classes(sub[train_name], classes, hits)
        return None
    src = _from_class_dirs(hits, "train")
    unknown = _unknown_beside(sub[train_name], hits, "unknown class folder")
    used = [sub[train_name]]
    for n in _SPLIT_DIRS["test"]:
        if n not in sub:
            continue
        test_hits = _class_hits(sub[n], classes)
        if len(test_hits) == len(classes):
            src += _from_class_dirs(test_hits, "test")
            unknown += _unknown_beside(sub[n], test_hits, "unknown class folder")
            used.append(sub[n])
            break
        if test_hits:
            raise _partial_classes(sub[n], classes, test_hits)
    return src, unknown + _unknown_beside(root, used, "unknown folder")


def _kaggle_flat(d: Path) -> tuple[Source, Unknown] | None:
    """Kaggle's `train/cat.123.jpg`: the label is the file name's prefix."""
    src: Source = []
    try:
        entries = sorted(p for p in d.iterdir() if p.is_file())
    except OSError:
        return None
    for p in entries:
        prefix = p.name.split(".", 1)[0].lower()
        src.append((p, CATDOG_CLASSES.index(prefix) if prefix in CATDOG_CLASSES else None, "train"))
    labels = {label for _, label, _ in src}
    return (src, _unknown_beside(d, [], "unknown folder")) if {0, 1} <= labels else None


def _candidates(root: Path) -> list[Path]:
    """root, then its sub-folders, then theirs: users point --data-dir at a parent folder."""
    level1 = sorted(_subdirs(root).values())
    level2 = [d for p in level1 for d in sorted(_subdirs(p).values())]
    return [root, *level1, *level2]


def _find(task: str, root: Path) -> _Found | None:
    """The first layout of `task` under root (itself, then two levels down).

    A split layout with a class folder misspelled or missing is not looked into further (its
    `test/` alone must not pass for the data set); if no other layout is found, its DataError is raised.
    """
    classes = CLASSES[task]
    refused: list[tuple[Path, DataError]] = []
    for d in _candidates(root)[:64]:
        if any(d.is_relative_to(r) for r, _ in refused):
            continue
        if task == "cifar10" and (d / "cifar-10-batches-py" / "data_batch_1").exists():
            return _Found("torchvision", d)
        try:
            split = _split_layout(d, task)
        except DataError as e:
            refused.append((d, e))
            continue
        if task == "cifar10":
            if split is not None and any(g == "test" for _, _, g in split[0]):
                return _Found("image-folder", *split)
            continue
        if split is not None:
            return _Found("class-folders", *split)
        if (dirs := _class_dirs(d, classes)) is not None and not _other_task(d, task):
            layout = "petimages" if d.name.lower() == "petimages" else "class-folders"
            return _Found(layout, _from_class_dirs(dirs, "train"), _unknown_beside(d, dirs, "unknown class folder"))
        for flat in (d / "train", d):
            if (found := _kaggle_flat(flat)) is not None:
                return _Found("kaggle-flat", *found)
    if refused:
        raise refused[0][1]
    return None


def find_cifar10(root: Path) -> tuple[str, Path | Source] | None:
    found = _find("cifar10", root)
    return None if found is None else (found.layout, found.where)


def find_catdog(root: Path) -> tuple[str, Source] | None:
    found = _find("catdog", root)
    return None if found is None else (found.layout, found.where)  # type: ignore[return-value]


def _foreign_entries(root: Path, task: str) -> list[Path]:
    """What root holds besides hidden and system files, this task's unfinished download, and the
    other task's download (one `data` folder serves both tasks by default)."""
    try:
        entries = sorted(root.iterdir())
    except FileNotFoundError:
        return []
    except OSError as e:
        raise DataError(f"{root} cannot be read ({e.strerror})") from None
    own_archive = _DOWNLOADS[task][1]  # its extracted folder is not ignored: a damaged one must be seen
    ignored = {own_archive, own_archive + ".part"}
    for other, (folder, archive) in _DOWNLOADS.items():
        if other != task:
            ignored |= {folder, archive, archive + ".part"}
    ignored = {n.lower() for n in ignored}
    return [
        p
        for p in entries
        if not p.name.startswith(".") and p.name.lower() not in SYSTEM_FILES and p.name.lower() not in ignored
    ]


def _count_images(paths: list[Path], limit: int = 20_000) -> tuple[int, Path | None, bool]:
    """(image files, the first one, whether the count stopped at `limit` files looked at) below paths."""
    n, first, seen = 0, None, 0
    for top in paths:
        walk = [(str(top.parent), [], [top.name])] if top.is_file() else os.walk(top)
        for dirpath, dirnames, filenames in walk:
            dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
            for name in sorted(filenames):
                seen += 1
                if Path(name).suffix.lower() in IMAGE_FORMATS:
                    n += 1
                    first = first or Path(dirpath) / name
                if seen >= limit:
                    return n, first, True
    return n, first, False


def _mismatch(root: Path, task: str, images: tuple[int, Path | None, bool], how: str) -> DataError:
    """The error for a folder that holds images in no layout of `task`: what is there, what was expected."""
    classes = CLASSES[task]
    best: tuple[Path, dict[int, Path]] | None = None
    for d in _candidates(root)[:64]:
        hits = _class_hits(d, classes)
        if hits and (best is None or len(hits) > len(best[1])):
            best = (d, hits)
    n, first, more = images
    if best is not None:
        d, hits = best
        names = sorted(p.name for p in _subdirs(d).values())
        where = str(d) if d == root else f"{d.relative_to(root)}/"
        found = f"{where} holds the folders {', '.join(names[:12])}{', ...' if len(names) > 12 else ''}"
        missing = [c for i, c in enumerate(classes) if i not in hits]
        if other := _other_task(d, task):
            found += f": {other}'s classes, not {task}'s"
        elif missing:
            found += f" (none for {', '.join(missing)})"
        else:
            found += " but no test folder beside it has them all"
    else:
        found = f"{n}{'+' if more else ''} image files such as {first.relative_to(root) if first else '?'}"
    return DataError(
        f"{root} holds images but no {task} layout: {found}; expected {how} ({', '.join(classes)}). "
        f"Rename the folders, or point --data-dir at an empty folder to download {task}"
    )


def _locate(task: str, root: Path, download_missing: bool, hint: str = ", or run without --no-download") -> _Found:
    """Find the task's data under root, downloading it only into an empty or missing folder."""
    found = _find(task, root)
    if found is not None:
        return found
    how = (
        "torchvision's cifar-10-batches-py or a {train,test}/<class>/ image tree"
        if task == "cifar10"
        else "Kaggle's dogs-vs-cats train/{cat,dog}.N.jpg, Cat/Dog class folders or PetImages"
    )
    foreign = _foreign_entries(root, task)
    images = _count_images(foreign)
    if images[0]:
        raise _mismatch(root, task, images, how)
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
    found = _find(task, root)
    if found is None:
        raise DataError(f"downloaded {task} data into {root} but could not find it there")
    return found


def _base(found: _Found, root: Path) -> Path:
    """The folder the file names in caches and manifests are relative to."""
    if found.layout == "torchvision":
        return found.where  # type: ignore[return-value]
    if not found.where:
        raise DataError(f"the {found.layout} layout under {root} holds no files")
    base = Path(os.path.commonpath([str(p) for p, _, _ in found.where]))
    return base if base.is_dir() else base.parent


# ---------------------------------------------------------------------------------------------
# Decoding, once, with a cache beside the data.


def decode_image(path: Path | str, size: int, formats: tuple[str, ...] | None = None) -> np.ndarray:
    """An image file as uint8 (size, size, 3) RGB; raises on anything PIL cannot fully decode.

    `formats`: the PIL formats the content must be (FormatMismatch otherwise). An image that would
    decode to more than MAX_IMAGE_PIXELS pixels raises ImageTooLarge before any pixel is decoded.
    Truncated files raise unless the caller set `PIL.ImageFile.LOAD_TRUNCATED_IMAGES`;
    `strict_decoding()` unsets it.
    """
    from PIL import Image

    with Image.open(path) as im:
        if formats is not None and im.format not in formats:
            raise FormatMismatch(im.format or "unknown", Path(path).suffix.lower())
        im.draft("RGB", (size, size))  # JPEG: let libjpeg decode big photos at 1/2, 1/4 or 1/8 scale
        w, h = im.size  # from the header, after draft: the pixels the decode below would allocate
        if w * h > MAX_IMAGE_PIXELS:
            raise ImageTooLarge(f"{w}x{h} pixels, over the limit of {MAX_IMAGE_PIXELS:,}")
        im = im.convert("RGB")  # grey, palette, CMYK, alpha -> RGB; forces the full decode
        if im.size != (size, size):
            im = im.resize((size, size), Image.Resampling.BILINEAR, reducing_gap=2.0)
        return np.array(im, dtype=np.uint8)  # a writable copy, so torch.from_numpy is safe


@contextlib.contextmanager
def strict_decoding() -> Iterator[None]:
    """Refuse truncated images even if something in this process set PIL's process-wide
    LOAD_TRUNCATED_IMAGES: a half-decoded photo is grey below the cut, a silently wrong example."""
    from PIL import ImageFile

    before = ImageFile.LOAD_TRUNCATED_IMAGES
    ImageFile.LOAD_TRUNCATED_IMAGES = False
    try:
        yield
    finally:
        ImageFile.LOAD_TRUNCATED_IMAGES = before


def skip_reason(path: Path, label: int | None = 0) -> str | None:
    """Why a file is skipped before it is opened (its name, extension, label or size); None: decode it."""
    name = path.name.lower()
    if name in SYSTEM_FILES or name.startswith("._"):  # `._x.jpg`: macOS resource forks beside x.jpg
        return "system file"
    suffix = path.suffix.lower()
    if suffix not in IMAGE_FORMATS:
        return f"not an image file ({suffix or 'no extension'})"
    if label is None:
        return "no cat/dog label in the file name"
    try:
        if path.stat().st_size == 0:
            return "zero-byte file"
    except OSError:
        return "unreadable file"
    return None


def _error_reason(path: Path, e: Exception) -> str:
    """A decode failure as a short reason, the same for every file that fails the same way."""
    from PIL import Image, UnidentifiedImageError

    if isinstance(e, (Image.DecompressionBombError, ImageTooLarge)):
        return "image too large"
    if isinstance(e, UnidentifiedImageError):
        try:
            with open(path, "rb") as f:
                head = f.read(16)
        except OSError:
            return "unreadable file"
        # An image's signature but nothing PIL can identify: cut off inside its header.
        if head.startswith(_MAGIC) or (head[:4] == b"RIFF" and head[8:12] == b"WEBP"):
            return "truncated image"
        return "not an image"
    if isinstance(e, OSError) and "truncated" in str(e).lower():
        return "truncated image"
    if isinstance(e, OSError) and e.errno is not None:  # permissions, I/O errors: not the file's bytes
        return "unreadable file"
    return "corrupt image"


def _decode_or_reason(path: Path, size: int, label: int | None = 0) -> np.ndarray | tuple[str, str]:
    """The decoded image, or (reason, detail) for a file that is skipped."""
    reason = skip_reason(path, label)
    if reason is not None:
        return reason, ""
    try:
        return decode_image(path, size, formats=IMAGE_FORMATS[path.suffix.lower()])
    except FormatMismatch as e:
        return str(e), ""  # the reason says it all
    except Exception as e:
        return _error_reason(path, e), f"{type(e).__name__}: {e}".splitlines()[0][:200]


def _source_stamp(source: Source, base: Path) -> bytes:
    """Every file's name, label, group, size and mtime: what a decode cache is keyed by. Names go in
    as the file system's bytes (os.fsencode), so a name that is not UTF-8 keys like any other."""
    lines = []
    for path, label, group in source:
        try:
            st = path.stat()
            stamp = f"{st.st_size}\t{st.st_mtime_ns}"
        except OSError:  # gone since it was listed: the decode reports it and writes no cache
            stamp = "missing"
        lines.append(os.fsencode(path.relative_to(base)) + f"\t{label}\t{group}\t{stamp}\n".encode())
    return b"".join(lines)


def _printable(name: str) -> str:
    """A file name as valid Unicode for manifests, JSON and logs. On Linux a name is bytes that need not
    be UTF-8, and Python lists such a name with lone surrogates ('cat.\\udcff1.jpg'), which no UTF-8
    encoder accepts; its bad bytes are written as `\\xff` instead. Other names are returned unchanged."""
    try:
        name.encode()
    except UnicodeEncodeError:
        try:
            return name.encode(errors="surrogateescape").decode(errors="backslashreplace")
        except UnicodeEncodeError:  # a lone surrogate that is no escaped byte (Windows' UTF-16 names)
            return name.encode(errors="backslashreplace").decode()
    return name


def _rel(path: Path | str, base: Path) -> str:
    """path relative to base, printable: how caches and manifests name a file."""
    return _printable(os.path.relpath(path, base))


def _key(stamp: bytes, size: int) -> str:
    return hashlib.sha256(f"v{_CACHE_VERSION} {size}\n".encode() + stamp).hexdigest()[:16]


def _cache_key(source: Source, base: Path, size: int) -> str:
    return _key(_source_stamp(source, base), size)


def _source_keys(found: _Found, base: Path) -> Callable[[int], str]:
    """size -> the key of the current file list at that size (the torchvision files never change:
    they are md5-checked)."""
    if found.layout == "torchvision":
        return lambda size: _digest([f"torchvision v{_CACHE_VERSION} {size}"])
    stamp = _source_stamp(found.where, base)  # type: ignore[arg-type]
    return lambda size: _key(stamp, size)


def _fallback_cache_dir(base: Path) -> Path | None:
    """Where a data folder that cannot hold `.cnnclf-cache` keeps its cache: one folder per data folder
    under $XDG_CACHE_HOME/cnnclf (or ~/.cache/cnnclf), so pruning one never touches another's."""
    xdg = os.environ.get("XDG_CACHE_HOME", "")
    if xdg and os.path.isabs(xdg):  # the XDG spec: empty or relative means unset
        top = Path(xdg)
    else:
        try:
            top = Path.home() / ".cache"
        except RuntimeError:  # no HOME and no password entry
            return None
        if not top.is_absolute():
            return None
    resolved = base.resolve()
    return top / "cnnclf" / f"{resolved.name or 'root'}-{hashlib.sha256(os.fsencode(resolved)).hexdigest()[:12]}"


def _cache_dirs(base: Path) -> list[Path]:
    """The cache folders of this data folder that exist: the first holds what this run reads first."""
    dirs = [base / CACHE_DIR, _fallback_cache_dir(base)]
    return [d for d in dirs if d is not None and d.is_dir()]


def _cache_dir(base: Path) -> Path | None:
    """The folder this run writes caches and manifests to, or None if no place is writable (a
    read-only data folder and a read-only home): then the run decodes without a cache."""
    for d in (base / CACHE_DIR, _fallback_cache_dir(base)):
        if d is None:
            continue
        try:
            d.mkdir(parents=d.name != CACHE_DIR, exist_ok=True)
        except OSError:
            continue
        if d.is_dir() and os.access(d, os.W_OK):
            _remove_stale_temp_files(d)
            return d
    return None


def _pid_alive(pid: int) -> bool:
    if pid <= 0:  # 0 and negatives name process groups, not a writer
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's live process
        return True
    except (OverflowError, OSError):
        return False
    return True


def _remove_stale_temp_files(d: Path) -> list[Path]:
    """Remove `*.tmp<pid>` files in d that a killed write left; returns what was removed."""
    removed = []
    now = time.time()
    try:
        entries = list(d.iterdir())
    except OSError:
        return removed
    for p in entries:
        m = _TEMP_RE.search(p.name)
        if m is None:
            continue
        try:
            if not p.is_file():
                continue
            idle = now - p.stat().st_mtime  # seconds since the last write
            if idle > STALE_TEMP_S or (idle > _TEMP_QUIET_S and not _pid_alive(int(m.group(1)))):
                p.unlink()
                removed.append(p)
        except OSError:
            continue
    return removed


def _write_atomic(path: Path, write: Callable[[Path], object]) -> str | None:
    """write(tmp) then rename to path, so no reader sees half a file; the error as text, or None."""
    tmp = path.with_name(path.name + f".tmp{os.getpid()}")
    try:
        write(tmp)
        os.replace(tmp, path)
    except (OSError, RuntimeError) as e:  # torch.save reports a full disk as RuntimeError
        with contextlib.suppress(OSError):
            tmp.unlink(missing_ok=True)
        return f"{path.parent}: {getattr(e, 'strerror', None) or str(e).splitlines()[0][:200]}"
    return None


def _cache_checksum(raw: dict) -> str:
    """sha256 of a decode cache's pixels, labels, groups, file names and skipped files: a cache edited or
    damaged after it was written is decoded again, not trusted. About 0.2 s for Kaggle's 25,000 images at
    64 px (300 MB; 0.25 s to torch.load them); anyone who can write the cache can also recompute this."""
    h = hashlib.sha256()
    for k in ("x", "y", "test"):
        t = raw[k]
        h.update(f"{k} {tuple(t.shape)} {t.dtype}\n".encode())
        h.update(t.contiguous().numpy().data)
    h.update(json.dumps([raw["files"], [list(s) for s in raw["skipped"]]]).encode())
    return h.hexdigest()


def _checksum_matches(raw: dict) -> bool:
    """Pops the stored checksum from a loaded cache and checks it against the content."""
    stored = raw.pop("checksum", None)
    try:
        return isinstance(stored, str) and stored == _cache_checksum(raw)
    except Exception:  # content that cannot be hashed (names that are not text, tensors needing grad)
        return False


def _valid_cache(raw: object, size: int) -> bool:
    """A cache file from this version of the decoder, internally consistent (else it is decoded again)."""
    if not isinstance(raw, dict) or not {"x", "y", "test", "files", "skipped"} <= raw.keys():
        return False
    if not all(isinstance(raw[k], torch.Tensor) for k in ("x", "y", "test")):
        return False
    if not isinstance(raw["files"], list) or not isinstance(raw["skipped"], list):
        return False
    n = len(raw["files"])
    return (
        (raw["x"].dtype, raw["y"].dtype, raw["test"].dtype) == (torch.uint8, torch.int64, torch.bool)
        and tuple(raw["x"].shape[1:]) == (3, size, size)
        and len(raw["x"]) == len(raw["y"]) == len(raw["test"]) == n
        and all(isinstance(s, (list, tuple)) and len(s) == 3 for s in raw["skipped"])
    )


def decode_source(
    source: Source, base: Path, size: int, task: str, progress: bool = True, key: str | None = None
) -> dict:
    """Decode every file once (cached); returns x, y, test (bool per image), files, and skipped
    as (file, reason, detail) triples. The cache holds the skipped files too, so a cached load
    reports the same skips as the decode that wrote it. Also returns `cache_error`: why no cache
    was written (no writable cache folder, a failed write), or None. `key`: the file list's cache key
    at this size, if the caller has it already (it stats every file)."""
    name = f"{task}-{size}px-{key or _cache_key(source, base, size)}.pt"
    for d in _cache_dirs(base):
        if not (d / name).exists():
            continue
        try:
            raw = torch.load(d / name, weights_only=True)
        except Exception:
            raw = None
        if _valid_cache(raw, size):
            if _checksum_matches(raw):
                return raw | {"cache_error": None}
            print(
                f"cnnclf: note: {_printable(str(d / name))} does not match its checksum (changed after it was "
                "written); decoding the images again",
                file=sys.stderr,
            )
        with contextlib.suppress(OSError):
            (d / name).unlink()
    from tqdm.auto import tqdm

    x = np.empty((len(source), size, size, 3), dtype=np.uint8)
    ok = np.zeros(len(source), dtype=bool)
    skipped: list[tuple[str, str, str]] = []
    # PIL releases the GIL while decoding and resizing, so threads use every core.
    with strict_decoding(), ThreadPoolExecutor(max_workers=os.cpu_count() or 1) as pool:
        results = pool.map(lambda item: _decode_or_reason(item[0], size, item[1]), source, chunksize=64)
        # disable=None: no bar when stderr is not a terminal (logs, and one-line errors after a decode)
        bar = tqdm(results, total=len(source), desc=f"decoding {task}", disable=None if progress else True)
        for i, r in enumerate(bar):
            if isinstance(r, tuple):
                skipped.append((_rel(source[i][0], base), *r))
            else:
                x[i] = r
                ok[i] = True
    keep = np.flatnonzero(ok)
    out = {
        "x": torch.from_numpy(x[keep]).permute(0, 3, 1, 2).contiguous(),  # (N, 3, S, S)
        "y": torch.tensor([source[i][1] for i in keep], dtype=torch.int64),
        "test": torch.tensor([source[i][2] == "test" for i in keep], dtype=torch.bool),
        "files": [_rel(source[i][0], base) for i in keep],
        "skipped": skipped,
    }
    error = None
    if not any(reason in _TRANSIENT_REASONS for _, reason, _ in skipped):
        d = _cache_dir(base)
        stored = out | {"checksum": _cache_checksum(out)}
        error = "no writable cache folder" if d is None else _write_atomic(d / name, lambda t: torch.save(stored, t))
    return out | {"cache_error": error}


def _load_torchvision_cifar10(d: Path) -> dict:
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


# ---------------------------------------------------------------------------------------------
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


def _digest(files: list[str]) -> str:
    return hashlib.sha256("\n".join(files).encode(errors="surrogateescape")).hexdigest()[:16]


def _unknown_files(unknown: Unknown, base: Path) -> tuple[list[tuple[str, str, str]], list[dict]]:
    """The files in the folders beside the layout's own, as skipped (file, reason, detail) triples,
    and one summary per folder (empty folders included)."""
    skipped, folders = [], []
    for folder, reason in unknown:
        files = _files(folder)
        skipped += [(_rel(p, base), reason, "") for p in files]
        folders.append({"folder": _rel(folder, base), "reason": reason, "files": len(files)})
    return skipped, folders


def load_task(
    task: str,
    data_dir: str | Path = "data",
    *,
    image_size: int | None = None,
    val_fraction: float = 0.1,
    test_fraction: float = 0.1,
    subset: int | None = None,
    eval_subset: int | None = None,
    seed: int = 0,
    download_missing: bool = True,
    progress: bool = True,
) -> TaskData:
    """Find (or download) a task's data, decode it once (cached) and split it, seeded.

    val: `val_fraction` of the labelled training images, stratified. test: the data
    set's own labelled test set, or else (Kaggle Cat/Dog, PetImages) a stratified
    `test_fraction` of all images, carved out before the validation split.
    `subset` keeps that many training images; val and test stay whole unless
    `eval_subset` caps them too (smoke tests).

    A folder holding images in no layout of the task raises DataError; a download goes only into
    an empty or missing folder. Without a writable cache folder the run goes on uncached, says so in
    one line on stderr, and the manifest's `cache_dir` and `manifest_path` are None.
    """
    if task not in CLASSES:
        raise DataError(f"unknown task {task!r}; expected one of {', '.join(CLASSES)}")
    root = Path(data_dir).expanduser()
    size = image_size or (32 if task == "cifar10" else 128)
    existing = next(p for p in (root, *root.parents) if p.exists() or p == p.parent)
    if existing.exists() and not existing.is_dir():
        raise DataError(f"{existing} is a file, not a data folder")
    found = _locate(task, root, download_missing)
    layout = found.layout
    base = _base(found, root)
    source_key = _source_keys(found, base)(size)
    cache_dir = _cache_dir(base)  # also removes what killed writes left, before this run adds to the disk
    if layout == "torchvision":
        raw = _load_torchvision_cifar10(base)
        if size != 32:
            raw["x"] = F.interpolate(raw["x"].float(), size=size, mode="bilinear").round().clamp(0, 255).byte()
    else:
        raw = decode_source(found.where, base, size, task, progress=progress, key=source_key)  # type: ignore[arg-type]
    unknown_skipped, unknown_folders = _unknown_files(found.unknown, base)
    skipped = list(raw["skipped"]) + unknown_skipped
    if len(raw["y"]) == 0:
        raise DataError(f"no readable {task} images under {root} ({len(skipped)} files skipped)")

    x, y, files = raw["x"], raw["y"], raw["files"]
    is_test = raw["test"]
    if bool(is_test.any()):
        pool_idx = torch.nonzero(~is_test).flatten()
        test_idx = torch.nonzero(is_test).flatten()
        test_source = "labelled test set"
    else:
        keep, test = stratified_split(y, test_fraction, seed=10_000 + seed)
        pool_idx, test_idx = keep, test
        test_source = f"seeded stratified {test_fraction:.0%} of the labelled images"
    keep, val = stratified_split(y[pool_idx], val_fraction, seed=20_000 + seed)
    train_idx, val_idx = pool_idx[keep], pool_idx[val]
    if subset is not None:
        train_idx = train_idx[stratified_subset(y[train_idx], subset, seed=30_000 + seed)]
    if eval_subset is not None:
        val_idx = val_idx[stratified_subset(y[val_idx], eval_subset, seed=40_000 + seed)]
        test_idx = test_idx[stratified_subset(y[test_idx], eval_subset, seed=50_000 + seed)]
    if len(train_idx) == 0 or len(val_idx) == 0 or len(test_idx) == 0:
        raise DataError(f"too few readable {task} images under {root} to split into train/val/test")

    split_files = {
        k: [files[i] for i in idx.tolist()] for k, idx in (("train", train_idx), ("val", val_idx), ("test", test_idx))
    }
    manifest = {
        "task": task,
        "root": _printable(str(root.resolve())),
        "base": _printable(str(base.resolve())),
        "layout": layout,
        "image_size": size,
        "source_key": source_key,  # prune_caches keeps the manifests of the current file list
        "cache_dir": _printable(str(cache_dir)) if cache_dir is not None else None,
        "files_read": len(files),
        "files_skipped": len(skipped),
        "skipped_by_reason": dict(sorted(Counter(r for _, r, _ in skipped).items())),
        "skipped": [{"file": f, "reason": r, "detail": d} for f, r, d in skipped],
        "unknown_folders": unknown_folders,
        "seed": seed,
        "test_source": test_source,
        "splits": {
            k: {
                "n": len(v),
                "per_class": torch.bincount(y[idx], minlength=len(CLASSES[task])).tolist(),
                "sha256": _digest(v),
            }
            for (k, v), idx in zip(split_files.items(), (train_idx, val_idx, test_idx), strict=True)
        },
    }
    if cache_dir is None:
        path, error = None, "no writable cache folder"
    else:
        path, error = _write_manifest(cache_dir, manifest, split_files)
    manifest["manifest_path"] = _printable(str(path)) if path is not None else None
    if raw["cache_error"] or error:
        tried = ", ".join(str(d) for d in (base / CACHE_DIR, _fallback_cache_dir(base)) if d is not None)
        lost = ["the next run decodes the images again"] if raw["cache_error"] else []
        lost += ["no manifest file is written"] if path is None else []
        why = raw["cache_error"] or error
        print(f"cnnclf: note: running without a cache ({why}; tried {tried}): {' and '.join(lost)}", file=sys.stderr)
    data = TaskData(
        task=task,
        classes=list(CLASSES[task]),
        train_x=x[train_idx],
        train_y=y[train_idx],
        val_x=x[val_idx],
        val_y=y[val_idx],
        test_x=x[test_idx],
        test_y=y[test_idx],
        manifest=manifest,
    )
    manifest["digest"] = data_digest(data)
    return data


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


def _write_manifest(d: Path, manifest: dict, split_files: dict[str, list[str]]) -> tuple[Path | None, str | None]:
    """The manifest with every split's file list, named by its content so reruns reuse it; (path, error)."""
    full = {**manifest, "split_files": split_files}
    key = _digest([json.dumps(full, sort_keys=True)])
    path = d / f"manifest-{manifest['task']}-{manifest['image_size']}px-{key}.json"
    if path.exists():
        return path, None
    error = _write_atomic(path, lambda tmp: tmp.write_text(json.dumps(full, indent=1)))
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
    if task not in CLASSES:
        raise DataError(f"unknown task {task!r}; expected one of {', '.join(CLASSES)}")
    root = Path(data_dir).expanduser()
    found = _locate(task, root, download_missing=False, hint="")
    base = _base(found, root)
    current = _source_keys(found, base)
    names = re.compile(rf"(manifest-)?{re.escape(task)}-(\d+)px-([0-9a-f]+)\.(pt|json)")
    removed: list[Path] = []
    for d in _cache_dirs(base):
        removed += _remove_stale_temp_files(d)
        for p in sorted(d.iterdir()):
            m = names.fullmatch(p.name)
            if m is None or bool(m[1]) != (m[4] == "json") or not p.is_file():
                continue
            size = int(m[2])
            if image_size is not None and size != image_size:
                keep = False
            elif m[1]:
                try:
                    keep = json.loads(p.read_text()).get("source_key") == current(size)
                except (OSError, ValueError, AttributeError):
                    keep = False
            else:
                keep = m[3] == current(size)
            if not keep:
                try:
                    p.unlink()
                except OSError as e:
                    raise DataError(f"cannot remove {p} ({e.strerror})") from None
                removed.append(p)
    return sorted(removed)


# ---------------------------------------------------------------------------------------------
# On-device batches: uint8 in, normalized float out, augmentation batched on the device.


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
