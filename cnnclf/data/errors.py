"""What every part of cnnclf.data shares: its errors, its constants, and how a file is named in messages."""

from __future__ import annotations

import os
from pathlib import Path

PETIMAGES_URL = (
    "https://download.microsoft.com/download/3/E/1/3E1C3F21-ECDB-4869-8368-6DEBA77B919F/kagglecatsanddogs_5340.zip"
)
CACHE_DIR = ".cnnclf-cache"

# What each task's download puts into the data folder: the extracted folder, and the archive
# (with its resumable `.part`) while the download is unfinished.
DOWNLOADS = {
    "cifar10": ("cifar-10-batches-py", "cifar-10-python.tar.gz"),
    "catdog": ("PetImages", "kagglecatsanddogs_5340.zip"),
}

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

# A "source" is a list of (path, label, group), where group is "train" or "test" (a labelled test set
# the data came with); label None marks a file found where the data set lives but without a label
# (Kaggle's flat folder): skipped and counted. Folders beside the layout's own are listed as
# (folder, reason): not read, their files counted.
Source = list[tuple[Path, int | None, str]]
Unknown = list[tuple[Path, str]]


class DataError(Exception):
    """Data is missing, unreadable or could not be downloaded; the message is one line for the user."""


class FormatMismatch(ValueError):
    """The file's content is not the format its extension names."""

    def __init__(self, content: str, suffix: str) -> None:
        super().__init__(f"{content.lower()} content named {suffix}")


class ImageTooLarge(ValueError):
    """The image's header declares more than MAX_IMAGE_PIXELS pixels to decode."""


def printable(name: str) -> str:
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


def rel(path: Path | str, base: Path) -> str:
    """path relative to base, printable: how caches and manifests name a file."""
    return printable(os.path.relpath(path, base))
