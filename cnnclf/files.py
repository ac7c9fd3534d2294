"""Writing files so that a reader never sees half of one: the one `atomic_write` of the project."""

from __future__ import annotations

import contextlib
import os
import re
from collections.abc import Iterator
from pathlib import Path

# The temporary file of a write in progress: `<name>.tmp<pid>` beside the target. A run that finds one
# whose process is gone knows a killed write left it (cnnclf/data/cache.py removes those).
TEMP_RE = re.compile(r"\.tmp(\d+)$")


def temp_path(path: str | os.PathLike[str]) -> Path:
    """Where `atomic_write(path)` writes before the rename: the same folder, so the rename stays on one file system."""
    path = Path(path)
    return path.with_name(f"{path.name}.tmp{os.getpid()}")


@contextlib.contextmanager
def atomic_write(path: str | os.PathLike[str], durable: bool = True) -> Iterator[Path]:
    """Yield a temporary path beside `path`; once the block has written it, it replaces `path` in one step.

        with atomic_write(cache) as tmp:
            torch.save(obj, tmp)  # or tmp.write_text(...), or open(tmp, "wb") ...

    Guarantees:
    - a reader of `path` sees the old file or the whole new one, never a part (os.replace within one
      folder is atomic);
    - the new file's bytes are on the disk (fsync) before the rename, and the rename is made durable by a
      best-effort fsync of the folder, so a power loss cannot leave `path` empty or truncated;
    - if the block or the rename raises, the temporary file is removed and the exception propagates
      unchanged (the caller decides how to report a full disk); `path` is left as it was;
    - a leftover temporary file of the same name (this pid, an earlier crash) is removed first, without
      following it if it is a link.

    `durable=False` skips both fsyncs, for a file that may be lost or go back to an older version on a power
    loss without harm (the journal's applied-op mark: replaying ops is idempotent); still all or nothing.

    The temporary file is `<name>.tmp<pid>` (TEMP_RE): two processes never share one, two threads of one
    process writing the same path must not overlap. The block creates the file itself (any way it likes);
    a block that creates nothing makes the fsync raise FileNotFoundError.
    """
    path = Path(path)
    tmp = temp_path(path)
    with contextlib.suppress(FileNotFoundError):
        tmp.unlink()
    try:
        yield tmp
        if durable:
            _fsync(tmp, os.O_RDWR)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            tmp.unlink()
        raise
    if not durable:
        return
    with contextlib.suppress(OSError):  # not every file system can fsync a folder (some network mounts)
        _fsync(path.parent, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))


def _fsync(path: Path, flags: int) -> None:
    fd = os.open(path, flags)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
