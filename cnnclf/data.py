"""Find, download and decode the data sets, split them, and feed batches on the device.

Files are decoded once into uint8 tensors (N, 3, S, S) and cached beside the data,
keyed by the file list and the resolution. A training run moves those tensors to
its device once; shuffling, augmentation and normalization then run there, a whole
batch at a time, with no per-image Python work inside an epoch.

Layouts read:
- CIFAR-10: torchvision's `cifar-10-batches-py` (downloaded when missing), or an
  image-folder tree `{train,test}/<class>/*` in any format PIL reads.
- Cat/Dog: Kaggle's flat `train/{cat,dog}.N.jpg`; class folders (`Cat/Dog`,
  `cats/dogs`, any case) alone or under `train/` with `test/` or `validation/`
  beside; Microsoft's `PetImages/{Cat,Dog}` (downloaded when missing).
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json
import math
import os
import tarfile
import tempfile
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

CIFAR10_CLASSES = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"]
CATDOG_CLASSES = ["cat", "dog"]
CLASSES = {"cifar10": CIFAR10_CLASSES, "catdog": CATDOG_CLASSES}

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)

PETIMAGES_URL = (
    "https://download.microsoft.com/download/3/E/1/3E1C3F21-ECDB-4869-8368-6DEBA77B919F/kagglecatsanddogs_5340.zip"
)
CACHE_DIR = ".cnnclf-cache"
_CACHE_VERSION = 2  # bump when decoding or skipping changes, so stale caches are not reused

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


class DataError(Exception):
    """Data is missing, unreadable or could not be downloaded; the message is one line for the user."""


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

Source = list[tuple[Path, int | None, str]]

_SPLIT_DIRS = {"train": ("train", "training"), "test": ("test", "testing", "validation", "val", "valid")}


def _subdirs(d: Path) -> dict[str, Path]:
    try:
        return {p.name.lower(): p for p in d.iterdir() if p.is_dir() and not p.name.startswith(".")}
    except OSError:
        return {}


def _files(d: Path) -> list[Path]:
    return sorted(p for p in d.rglob("*") if p.is_file() and CACHE_DIR not in p.parts)


def _class_dirs(d: Path, classes: list[str]) -> dict[int, Path] | None:
    """Class folders in d, matched case-insensitively, singular or plural ('Cat', 'cats')."""
    sub = _subdirs(d)
    found = {}
    for i, name in enumerate(classes):
        match = sub.get(name) or sub.get(name + "s")
        if match is None:
            return None
        found[i] = match
    return found


def _from_class_dirs(dirs: dict[int, Path], group: str) -> Source:
    return [(p, label, group) for label, d in dirs.items() for p in _files(d)]


def _split_layout(root: Path, classes: list[str]) -> Source | None:
    """`root/{train,test|validation}/<class>/*`; the test folder is optional."""
    sub = _subdirs(root)
    train = next((sub[n] for n in _SPLIT_DIRS["train"] if n in sub), None)
    train_dirs = _class_dirs(train, classes) if train else None
    if not train_dirs:
        return None
    src = _from_class_dirs(train_dirs, "train")
    for n in _SPLIT_DIRS["test"]:
        test_dirs = _class_dirs(sub[n], classes) if n in sub else None
        if test_dirs:
            src += _from_class_dirs(test_dirs, "test")
            break
    return src


def _kaggle_flat(d: Path) -> Source | None:
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
    return src if {0, 1} <= labels else None


def _candidates(root: Path) -> list[Path]:
    """root, then its sub-folders, then theirs: users point --data-dir at a parent folder."""
    level1 = sorted(_subdirs(root).values())
    level2 = [d for p in level1 for d in sorted(_subdirs(p).values())]
    return [root, *level1, *level2]


def find_cifar10(root: Path) -> tuple[str, Path | Source] | None:
    for d in _candidates(root)[:64]:
        if (d / "cifar-10-batches-py" / "data_batch_1").exists():
            return "torchvision", d
        if (src := _split_layout(d, CIFAR10_CLASSES)) is not None and any(g == "test" for _, _, g in src):
            return "image-folder", src
    return None


def find_catdog(root: Path) -> tuple[str, Source] | None:
    for d in _candidates(root)[:64]:
        if (src := _split_layout(d, CATDOG_CLASSES)) is not None:
            return "class-folders", src
        if (dirs := _class_dirs(d, CATDOG_CLASSES)) is not None:
            return ("petimages" if d.name.lower() == "petimages" else "class-folders"), _from_class_dirs(dirs, "train")
        for flat in (d / "train", d):
            if (src := _kaggle_flat(flat)) is not None:
                return "kaggle-flat", src
    return None


# ---------------------------------------------------------------------------------------------
# Decoding, once, with a cache beside the data.


class FormatMismatch(ValueError):
    """The file's content is not the format its extension names."""

    def __init__(self, content: str, suffix: str) -> None:
        super().__init__(f"{content.lower()} content named {suffix}")


def decode_image(path: Path | str, size: int, formats: tuple[str, ...] | None = None) -> np.ndarray:
    """An image file as uint8 (size, size, 3) RGB; raises on anything PIL cannot fully decode.

    `formats`: the PIL formats the content must be (FormatMismatch otherwise). Truncated files
    raise unless the caller set `PIL.ImageFile.LOAD_TRUNCATED_IMAGES`; `strict_decoding()` unsets it.
    """
    from PIL import Image

    with Image.open(path) as im:
        if formats is not None and im.format not in formats:
            raise FormatMismatch(im.format or "unknown", Path(path).suffix.lower())
        im.draft("RGB", (size, size))  # JPEG: let libjpeg decode big photos at 1/2, 1/4 or 1/8 scale
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

    if isinstance(e, Image.DecompressionBombError):
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


def _cache_key(source: Source, base: Path, size: int) -> str:
    h = hashlib.sha256(f"v{_CACHE_VERSION} {size}\n".encode())
    for path, label, group in source:
        try:
            st = path.stat()
            stamp = f"{st.st_size}\t{st.st_mtime_ns}"
        except OSError:  # gone since it was listed: the decode reports it and writes no cache
            stamp = "missing"
        h.update(f"{path.relative_to(base)}\t{label}\t{group}\t{stamp}\n".encode())
    return h.hexdigest()[:16]


def _cache_dir(base: Path) -> Path:
    d = base / CACHE_DIR
    try:
        d.mkdir(exist_ok=True)
        if os.access(d, os.W_OK):
            return d
    except OSError:
        pass
    d = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "cnnclf"  # read-only data folder
    d.mkdir(parents=True, exist_ok=True)
    return d


def _valid_cache(raw: object, size: int) -> bool:
    """A cache file from this version of the decoder, internally consistent (else it is decoded again)."""
    if not isinstance(raw, dict) or not {"x", "y", "test", "files", "skipped"} <= raw.keys():
        return False
    if not all(isinstance(raw[k], torch.Tensor) for k in ("x", "y", "test")):
        return False
    n = len(raw["files"])
    return (
        tuple(raw["x"].shape[1:]) == (3, size, size)
        and len(raw["x"]) == len(raw["y"]) == len(raw["test"]) == n
        and all(isinstance(s, (list, tuple)) and len(s) == 3 for s in raw["skipped"])
    )


def decode_source(source: Source, base: Path, size: int, task: str, progress: bool = True) -> dict:
    """Decode every file once (cached); returns x, y, test (bool per image), files, and skipped
    as (file, reason, detail) triples. The cache holds the skipped files too, so a cached load
    reports the same skips as the decode that wrote it."""
    key = _cache_key(source, base, size)
    cache = _cache_dir(base) / f"{task}-{size}px-{key}.pt"
    if cache.exists():
        try:
            raw = torch.load(cache, weights_only=True)
        except Exception:
            raw = None
        if _valid_cache(raw, size):
            return raw
        cache.unlink(missing_ok=True)
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
                skipped.append((str(source[i][0].relative_to(base)), *r))
            else:
                x[i] = r
                ok[i] = True
    keep = np.flatnonzero(ok)
    out = {
        "x": torch.from_numpy(x[keep]).permute(0, 3, 1, 2).contiguous(),  # (N, 3, S, S)
        "y": torch.tensor([source[i][1] for i in keep], dtype=torch.int64),
        "test": torch.tensor([source[i][2] == "test" for i in keep], dtype=torch.bool),
        "files": [str(source[i][0].relative_to(base)) for i in keep],
        "skipped": skipped,
    }
    if not any(reason in _TRANSIENT_REASONS for _, reason, _ in skipped):
        tmp = cache.with_name(cache.name + f".tmp{os.getpid()}")
        torch.save(out, tmp)
        os.replace(tmp, cache)  # atomic: concurrent runs never read a half-written cache
    return out


def _load_torchvision_cifar10(d: Path) -> dict:
    from torchvision.datasets import CIFAR10

    class _CIFAR10(CIFAR10):
        # torchvision checks each batch file's md5 against the official ones; the archive's md5
        # is checked at download instead, and a damaged pickle fails to load below.
        def _check_integrity(self) -> bool:
            return True

        def _load_meta(self) -> None:
            self.classes = list(CIFAR10_CLASSES)
            self.class_to_idx = {c: i for i, c in enumerate(self.classes)}

    try:
        parts = [_CIFAR10(str(d), train=train, download=False) for train in (True, False)]
    except Exception as e:
        raise DataError(
            f"{d / CIFAR10.base_folder} is damaged ({type(e).__name__}: {e}); delete it to re-download"
        ) from None
    x = np.concatenate([p.data for p in parts])  # (N, 32, 32, 3) uint8
    return {
        "x": torch.from_numpy(x).permute(0, 3, 1, 2).contiguous(),
        "y": torch.tensor(parts[0].targets + parts[1].targets, dtype=torch.int64),
        "test": torch.tensor([False] * len(parts[0].targets) + [True] * len(parts[1].targets)),
        "files": [f"train[{i}]" for i in range(len(parts[0].targets))]
        + [f"test[{i}]" for i in range(len(parts[1].targets))],
        "skipped": [],  # pickled arrays: nothing to skip file by file
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
    return hashlib.sha256("\n".join(files).encode()).hexdigest()[:16]


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
    """
    if task not in CLASSES:
        raise DataError(f"unknown task {task!r}; expected one of {', '.join(CLASSES)}")
    root = Path(data_dir).expanduser()
    size = image_size or (32 if task == "cifar10" else 128)
    existing = next(p for p in (root, *root.parents) if p.exists() or p == p.parent)
    if existing.exists() and not existing.is_dir():
        raise DataError(f"{existing} is a file, not a data folder")
    find = find_cifar10 if task == "cifar10" else find_catdog
    found = find(root)
    if found is None:
        how = (
            "torchvision's cifar-10-python.tar.gz or a {train,test}/<class>/ image tree"
            if task == "cifar10"
            else "Kaggle's dogs-vs-cats train/{cat,dog}.N.jpg, Cat/Dog class folders or PetImages"
        )
        if not download_missing:
            raise DataError(f"no {task} data under {root}; put {how} there, or run without --no-download")
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
        found = find(root)
        if found is None:
            raise DataError(f"downloaded {task} data into {root} but could not find it there")
    layout, where = found
    if layout == "torchvision":
        base = where
        raw = _load_torchvision_cifar10(where)
        if size != 32:
            raw["x"] = F.interpolate(raw["x"].float(), size=size, mode="bilinear").round().clamp(0, 255).byte()
    else:
        base = Path(os.path.commonpath([str(p) for p, _, _ in where]))
        base = base if base.is_dir() else base.parent
        raw = decode_source(where, base, size, task, progress=progress)
    if len(raw["y"]) == 0:
        raise DataError(f"no readable {task} images under {root} ({len(raw['skipped'])} files skipped)")

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
        "root": str(root.resolve()),
        "base": str(base.resolve()),
        "layout": layout,
        "image_size": size,
        "files_read": len(files),
        "files_skipped": len(raw["skipped"]),
        "skipped_by_reason": dict(sorted(Counter(r for _, r, _ in raw["skipped"]).items())),
        "skipped": [{"file": f, "reason": r, "detail": d} for f, r, d in raw["skipped"]],
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
    manifest["manifest_path"] = str(_write_manifest(base, manifest, split_files))
    return TaskData(
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


def _write_manifest(base: Path, manifest: dict, split_files: dict[str, list[str]]) -> Path:
    """The manifest with every split's file list, named by its content so reruns reuse it."""
    full = {**manifest, "split_files": split_files}
    key = _digest([json.dumps(full, sort_keys=True)])
    path = _cache_dir(base) / f"manifest-{manifest['task']}-{manifest['image_size']}px-{key}.json"
    if not path.exists():
        tmp = path.with_name(path.name + f".tmp{os.getpid()}")
        tmp.write_text(json.dumps(full, indent=1))
        os.replace(tmp, path)
    return path


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
