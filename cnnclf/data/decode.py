"""Decoding image files into uint8 RGB arrays, or a short reason each file is skipped.

Every reason is the same for every file that fails the same way, so the manifest can count them.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import torch

from cnnclf.data.errors import IMAGE_FORMATS, MAX_IMAGE_PIXELS, SYSTEM_FILES, FormatMismatch, ImageTooLarge, Source, rel

# Skip reasons that depend on the machine rather than the file's bytes (permissions, I/O errors):
# a decode with any of these is not cached, so fixing the cause is seen by the next run.
TRANSIENT_REASONS = frozenset({"unreadable file"})
_MAGIC = (b"\xff\xd8\xff", b"\x89PNG\r\n\x1a\n", b"GIF87a", b"GIF89a")  # JPEG, PNG, GIF signatures


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


def decode_files(source: Source, base: Path, size: int, task: str, progress: bool = True) -> dict:
    """Decode every file of `source`, on every core; returns x uint8 (N, 3, S, S), y, test (bool per
    image), files (names relative to base) for the N images decoded, and skipped as (file, reason,
    detail) triples for the rest."""
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
                skipped.append((rel(source[i][0], base), *r))
            else:
                x[i] = r
                ok[i] = True
    keep = np.flatnonzero(ok)
    return {
        "x": torch.from_numpy(x[keep]).permute(0, 3, 1, 2).contiguous(),  # (N, 3, S, S)
        "y": torch.tensor([source[i][1] for i in keep], dtype=torch.int64),
        "test": torch.tensor([source[i][2] == "test" for i in keep], dtype=torch.bool),
        "files": [rel(source[i][0], base) for i in keep],
        "skipped": skipped,
    }
