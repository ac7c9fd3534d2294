"""Downloads: into a `.part` file (resumed with an HTTP Range request), checked, then renamed;
archives are extracted into a temporary folder and renamed into place, so a failure never
leaves a half-written data set where the loader would find it.

The only module of cnnclf that reaches the network (urllib) or opens archives (tarfile, zipfile).
"""

from __future__ import annotations

import hashlib
import os
import tarfile
import tempfile
import urllib.error
import urllib.request
import zipfile
from pathlib import Path

from cnnclf.data.errors import DOWNLOADS, PETIMAGES_URL, DataError


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
    folder, name = DOWNLOADS["catdog"]
    root.mkdir(parents=True, exist_ok=True)
    url = _url("CNNCLF_CATDOG_URL", PETIMAGES_URL)
    archive = download(url, root / name, desc=folder)
    out = _extract_into(archive, root, folder)
    archive.unlink()
    return out
