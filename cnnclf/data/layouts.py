"""Finding a task's files in the layouts it may come in.

- CIFAR-10: torchvision's `cifar-10-batches-py`, or an image-folder tree `{train,test}/<class>/*`.
- Cat/Dog: Kaggle's flat `train/{cat,dog}.N.jpg`; class folders (`Cat/Dog`, `cats/dogs`, any case)
  alone or under `train/` with `test/` or `validation/` beside; Microsoft's `PetImages/{Cat,Dog}`.

The layout is looked for in the data folder, then two levels down. Folders beside a layout's own
(`unknown/` beside `cat/` and `dog/`) are not read; their files are counted as skipped, with the reason.
A folder that holds images in none of these layouts gets a DataError naming what it holds.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path

from cnnclf.config import CATDOG_CLASSES, CLASSES
from cnnclf.data.errors import CACHE_DIR, DOWNLOADS, IMAGE_FORMATS, SYSTEM_FILES, DataError, Source, Unknown, rel

_SPLIT_DIRS = {"train": ("train", "training"), "test": ("test", "testing", "validation", "val", "valid")}


@dataclass
class Found:
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


def find(task: str, root: Path) -> Found | None:
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
            return Found("torchvision", d)
        try:
            split = _split_layout(d, task)
        except DataError as e:
            refused.append((d, e))
            continue
        if task == "cifar10":
            if split is not None and any(g == "test" for _, _, g in split[0]):
                return Found("image-folder", *split)
            continue
        if split is not None:
            return Found("class-folders", *split)
        if (dirs := _class_dirs(d, classes)) is not None and not _other_task(d, task):
            layout = "petimages" if d.name.lower() == "petimages" else "class-folders"
            return Found(layout, _from_class_dirs(dirs, "train"), _unknown_beside(d, dirs, "unknown class folder"))
        for flat in (d / "train", d):
            if (found := _kaggle_flat(flat)) is not None:
                return Found("kaggle-flat", *found)
    if refused:
        raise refused[0][1]
    return None


def find_cifar10(root: Path) -> tuple[str, Path | Source] | None:
    found = find("cifar10", root)
    return None if found is None else (found.layout, found.where)


def find_catdog(root: Path) -> tuple[str, Source] | None:
    found = find("catdog", root)
    return None if found is None else (found.layout, found.where)  # type: ignore[return-value]


def foreign_entries(root: Path, task: str) -> list[Path]:
    """What root holds besides hidden and system files, this task's unfinished download, and the
    other task's download (one `data` folder serves both tasks by default)."""
    try:
        entries = sorted(root.iterdir())
    except FileNotFoundError:
        return []
    except OSError as e:
        raise DataError(f"{root} cannot be read ({e.strerror})") from None
    own_archive = DOWNLOADS[task][1]  # its extracted folder is not ignored: a damaged one must be seen
    ignored = {own_archive, own_archive + ".part"}
    for other, (folder, archive) in DOWNLOADS.items():
        if other != task:
            ignored |= {folder, archive, archive + ".part"}
    ignored = {n.lower() for n in ignored}
    return [
        p
        for p in entries
        if not p.name.startswith(".") and p.name.lower() not in SYSTEM_FILES and p.name.lower() not in ignored
    ]


def count_images(paths: list[Path], limit: int = 20_000) -> tuple[int, Path | None, bool]:
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


def mismatch(root: Path, task: str, images: tuple[int, Path | None, bool], how: str) -> DataError:
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


def base_folder(found: Found, root: Path) -> Path:
    """The folder the file names in caches and manifests are relative to."""
    if found.layout == "torchvision":
        return found.where  # type: ignore[return-value]
    if not found.where:
        raise DataError(f"the {found.layout} layout under {root} holds no files")
    base = Path(os.path.commonpath([str(p) for p, _, _ in found.where]))
    return base if base.is_dir() else base.parent


def unknown_files(unknown: Unknown, base: Path) -> tuple[list[tuple[str, str, str]], list[dict]]:
    """The files in the folders beside the layout's own, as skipped (file, reason, detail) triples,
    and one summary per folder (empty folders included)."""
    skipped, folders = [], []
    for folder, reason in unknown:
        files = _files(folder)
        skipped += [(rel(p, base), reason, "") for p in files]
        folders.append({"folder": rel(folder, base), "reason": reason, "files": len(files)})
    return skipped, folders
