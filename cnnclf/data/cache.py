"""The decode cache: files decoded once into uint8 tensors, stored beside the data and keyed by the file list.

A cache is `<task>-<S>px-<key>.pt` in `<data>/.cnnclf-cache/` (or, where the data folder is read-only, a
per-folder fallback under `$XDG_CACHE_HOME/cnnclf/`); its key covers every file's name, label, group,
size and mtime, so any change to the data decodes it again. A cache is checked (types, shapes, a sha256
of its content) before it is used, and written atomically (cnnclf.files.atomic_write).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import re
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch

from cnnclf.data.decode import TRANSIENT_REASONS, decode_files
from cnnclf.data.errors import CACHE_DIR, DataError, Source, printable
from cnnclf.files import TEMP_RE, atomic_write

_CACHE_VERSION = 4  # bump when decoding, skipping or the cache format changes, so stale caches are not reused

# Temporary files (`<name>.tmp<pid>`) of a killed write are removed by a later run once nothing
# can still be writing them: their process is gone and they were not touched for a minute (a
# writer on another host that shares the folder over NFS has a pid this host cannot see, but
# keeps touching its file), or whatever the pid, they were not touched for this long.
STALE_TEMP_S = 6 * 3600
_TEMP_QUIET_S = 60


def name_digest(names: list[str]) -> str:
    """16 hex digits of sha256 over a list of names (file lists, manifests)."""
    return hashlib.sha256("\n".join(names).encode(errors="surrogateescape")).hexdigest()[:16]


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


def _key(stamp: bytes, size: int) -> str:
    return hashlib.sha256(f"v{_CACHE_VERSION} {size}\n".encode() + stamp).hexdigest()[:16]


def _cache_key(source: Source, base: Path, size: int) -> str:
    return _key(_source_stamp(source, base), size)


def source_keys(source: Source | None, base: Path) -> Callable[[int], str]:
    """size -> the key of the current file list at that size. source None: torchvision's batches, which
    never change (they are md5-checked)."""
    if source is None:
        return lambda size: name_digest([f"torchvision v{_CACHE_VERSION} {size}"])
    stamp = _source_stamp(source, base)
    return lambda size: _key(stamp, size)


def fallback_cache_dir(base: Path) -> Path | None:
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


def cache_dirs(base: Path) -> list[Path]:
    """The cache folders of this data folder that exist: the first holds what this run reads first."""
    dirs = [base / CACHE_DIR, fallback_cache_dir(base)]
    return [d for d in dirs if d is not None and d.is_dir()]


def cache_dir(base: Path) -> Path | None:
    """The folder this run writes caches and manifests to, or None if no place is writable (a
    read-only data folder and a read-only home): then the run decodes without a cache."""
    for d in (base / CACHE_DIR, fallback_cache_dir(base)):
        if d is None:
            continue
        try:
            d.mkdir(parents=d.name != CACHE_DIR, exist_ok=True)
        except OSError:
            continue
        if d.is_dir() and os.access(d, os.W_OK):
            remove_stale_temp_files(d)
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


def remove_stale_temp_files(d: Path) -> list[Path]:
    """Remove `*.tmp<pid>` files in d that a killed write left; returns what was removed."""
    removed = []
    now = time.time()
    try:
        entries = list(d.iterdir())
    except OSError:
        return removed
    for p in entries:
        m = TEMP_RE.search(p.name)
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


def write_or_error(path: Path, write: Callable[[Path], object]) -> str | None:
    """write(tmp), then rename tmp to path (cnnclf.files.atomic_write); a failed write as one line, or None."""
    try:
        with atomic_write(path) as tmp:
            write(tmp)
    except (OSError, RuntimeError) as e:  # torch.save reports a full disk as RuntimeError
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


def _read_cache(path: Path, size: int) -> dict | None:
    """The cache at path if it is whole and unchanged; one that is not is removed (and decoded again)."""
    try:
        raw = torch.load(path, weights_only=True)
    except Exception:
        raw = None
    if _valid_cache(raw, size):
        if _checksum_matches(raw):
            return raw
        print(
            f"cnnclf: note: {printable(str(path))} does not match its checksum (changed after it was "
            "written); decoding the images again",
            file=sys.stderr,
        )
    with contextlib.suppress(OSError):
        path.unlink()
    return None


def decode_source(
    source: Source, base: Path, size: int, task: str, progress: bool = True, key: str | None = None
) -> dict:
    """Decode every file once (cached); returns x, y, test (bool per image), files, and skipped
    as (file, reason, detail) triples. The cache holds the skipped files too, so a cached load
    reports the same skips as the decode that wrote it. Also returns `cache_error`: why no cache
    was written (no writable cache folder, a failed write), or None. `key`: the file list's cache key
    at this size, if the caller has it already (it stats every file)."""
    name = f"{task}-{size}px-{key or _cache_key(source, base, size)}.pt"
    for d in cache_dirs(base):
        if (d / name).exists() and (raw := _read_cache(d / name, size)) is not None:
            return raw | {"cache_error": None}
    out = decode_files(source, base, size, task, progress)
    error = None
    if not any(reason in TRANSIENT_REASONS for _, reason, _ in out["skipped"]):
        d = cache_dir(base)
        stored = out | {"checksum": _cache_checksum(out)}
        error = "no writable cache folder" if d is None else write_or_error(d / name, lambda t: torch.save(stored, t))
    return out | {"cache_error": error}


def prune_dir(d: Path, task: str, current: Callable[[int], str], image_size: int | None = None) -> list[Path]:
    """Remove from cache folder d the stale temp files, and the caches and manifests of `task` whose file
    list is not `current(size)`'s (and, `image_size` given, those at any other size); returns them."""
    names = re.compile(rf"(manifest-)?{re.escape(task)}-(\d+)px-([0-9a-f]+)\.(pt|json)")
    removed = remove_stale_temp_files(d)
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
    return removed
