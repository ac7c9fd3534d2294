"""Data that must not run code, replace the user's data, exhaust memory or crash on a read-only machine
(issue 10, items 2, 5, 10 and 11)."""

from __future__ import annotations

import io
import json
import os
import pickle
import shutil
import struct
import subprocess
import sys
import time
import zlib
from pathlib import Path

import numpy as np
import pytest
from PIL import Image, ImageFile

import cnnclf.data as data_mod
import cnnclf.data.decode as decode_mod
import cnnclf.data.downloads as downloads_mod
from cnnclf.data import CIFAR10_CLASSES, DataError, load_task
from tests.conftest import (
    class_image,
    write_catdog_flat,
    write_cifar_batches,
    write_cifar_folders,
    write_image,
    write_petimages,
    zip_dir,
)

UNREACHABLE = "http://127.0.0.1:9/x"  # the discard port: nothing listens, the download fails at once


def _load(task, root, **kw):
    return load_task(task, root, progress=False, **kw)


def _tree(root: Path) -> list[str]:
    return sorted(str(p.relative_to(root)) for p in root.rglob("*"))


def trust_cifar_batches(monkeypatch, folder: Path, meta: bool = True) -> None:
    """Make the synthetic pickles in `folder` (conftest.write_cifar_batches) pass for CIFAR-10's official
    files: their md5s stand in for the real ones in torchvision's CIFAR10 class."""
    from torchvision.datasets import CIFAR10

    def md5(name: str) -> str:
        return downloads_mod._file_md5(folder / name)

    monkeypatch.setattr(CIFAR10, "train_list", [[n, md5(n)] for n, _ in CIFAR10.train_list])
    monkeypatch.setattr(CIFAR10, "test_list", [[n, md5(n)] for n, _ in CIFAR10.test_list])
    if meta:
        monkeypatch.setattr(CIFAR10, "meta", {**CIFAR10.meta, "md5": md5(CIFAR10.meta["filename"])})


class _Payload:
    """Unpickling this writes a marker file: proof that a loader ran code from a data file."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (Path.write_text, (self.marker, "code from a data file ran\n"))


# --- item 2: a planted cifar-10-batches-py runs no code --------------------------------------------


def test_planted_cifar_batch_is_refused_before_unpickling(tmp_path: Path):
    folder = write_cifar_batches(tmp_path / "data")
    marker = tmp_path / "marker"
    (folder / "data_batch_1").write_bytes(pickle.dumps(_Payload(marker)))
    with pytest.raises(DataError) as e:
        _load("cifar10", tmp_path / "data")
    assert not marker.exists(), "the planted pickle ran"
    assert "data_batch_1 does not match CIFAR-10's official md5" in str(e.value) and "\n" not in str(e.value)


def test_planted_cifar_meta_is_refused_before_unpickling(tmp_path: Path, monkeypatch):
    """The batches pass for official ones; batches.meta is a pickle too and is checked before it loads."""
    folder = write_cifar_batches(tmp_path / "data")
    marker = tmp_path / "marker"
    (folder / "batches.meta").write_bytes(pickle.dumps({"label_names": CIFAR10_CLASSES, "x": _Payload(marker)}))
    trust_cifar_batches(monkeypatch, folder, meta=False)
    with pytest.raises(DataError, match=r"batches\.meta does not match CIFAR-10's official md5"):
        _load("cifar10", tmp_path / "data")  # today's code never loads batches.meta, and took the batches as they were
    assert not marker.exists()


# --- item 5: a folder that holds images in no layout is refused, never replaced by a download -------


@pytest.mark.parametrize("layout", ["class folders", "train and test"])
def test_misspelled_catdog_class_is_refused_not_replaced_by_download(tmp_path: Path, http_dir, monkeypatch, layout):
    served, url = http_dir
    zip_dir(write_petimages(tmp_path / "src", n=6), served / "pets.zip")
    monkeypatch.setenv("CNNCLF_CATDOG_URL", f"{url}/pets.zip")  # a download here would succeed
    rng = np.random.default_rng(0)
    pets = tmp_path / "pets"
    folders = {
        "class folders": {"": ("cat", "dgos")},
        "train and test": {"train/": ("cat", "dgos"), "test/": ("cat", "dog")},
    }
    for prefix, names in folders[layout].items():  # train and test: test/ alone must not pass for the data set
        for label, name in enumerate(names):
            for i in range(6):
                write_image(pets / f"{prefix}{name}" / f"{i}.jpg", class_image(label, 2, (40, 40), rng))
    before = _tree(pets)
    for download_missing in (True, False):
        with pytest.raises(DataError) as e:
            _load("catdog", pets, download_missing=download_missing)
        msg = str(e.value)
        assert "cat, dgos" in msg and "none for dog" in msg and "\n" not in msg  # found, and what is missing
    assert _tree(pets) == before  # no PetImages, no archive, no .part: the user's folder is untouched


def test_cifar_tree_is_not_taken_for_catdog(tmp_path: Path, monkeypatch):
    """A CIFAR-10 tree has cat/ and dog/ folders, 32x32: it is not Cat/Dog data, nor an empty folder."""
    monkeypatch.setenv("CNNCLF_CATDOG_URL", UNREACHABLE)
    write_cifar_folders(tmp_path / "data" / "cifar10-jpg", n_train=2, n_test=1)
    with pytest.raises(DataError, match=r"holds images but no catdog layout: .*cifar10's classes, not catdog's"):
        _load("catdog", tmp_path / "data")


@pytest.mark.parametrize("where", ["train and test", "test only"])
def test_cifar_tree_missing_a_class_is_refused(tmp_path: Path, monkeypatch, where: str):
    monkeypatch.setenv("CNNCLF_CIFAR10_URL", UNREACHABLE)
    root = write_cifar_folders(tmp_path / "cifar", n_train=2, n_test=1)
    for split in ("train", "test") if where == "train and test" else ("test",):
        shutil.rmtree(root / split / "truck")
    before = _tree(root)
    with pytest.raises(DataError, match=r"none for truck") as e:
        _load("cifar10", root)
    assert "network" not in str(e.value)  # refused, not a download attempt
    assert _tree(root) == before


def test_download_goes_only_into_an_empty_or_new_folder(tmp_path: Path, monkeypatch):
    monkeypatch.setenv("CNNCLF_CIFAR10_URL", UNREACHABLE)
    monkeypatch.setenv("CNNCLF_CATDOG_URL", UNREACHABLE)
    notes = tmp_path / "notes"
    notes.mkdir()
    (notes / "README.txt").write_text("my notes\n")
    with pytest.raises(DataError, match=r"not empty \(README\.txt\).*empty or new folder"):
        _load("cifar10", notes)
    assert _tree(notes) == ["README.txt"]
    # What a download may go beside: hidden and system files, and the other task's own download.
    ok = tmp_path / "ok"
    (ok / "PetImages" / "Cat").mkdir(parents=True)
    write_image(ok / "PetImages" / "Cat" / "1.jpg", class_image(0, 2, (40, 40), np.random.default_rng(0)))
    (ok / ".DS_Store").write_bytes(b"\x00")
    with pytest.raises(DataError, match="network is the likely cause"):  # the download was tried
        _load("cifar10", ok)
    with pytest.raises(DataError, match="network is the likely cause"):
        _load("catdog", tmp_path / "new")


def test_unknown_folders_are_counted_in_the_manifest(tmp_path: Path):
    rng = np.random.default_rng(0)
    pets = tmp_path / "pets"
    for label, name in enumerate(("Cat", "Dog")):
        for i in range(6):
            write_image(pets / name / f"{i}.jpg", class_image(label, 2, (40, 40), rng))
    for i in range(3):
        write_image(pets / "unicorn" / f"{i}.jpg", class_image(0, 2, (40, 40), rng))
    m = _load("catdog", pets, image_size=32).manifest
    assert m["files_read"] == 12 and m["files_skipped"] == 3
    assert m["skipped_by_reason"] == {"unknown class folder": 3}
    assert sorted(s["file"] for s in m["skipped"]) == [f"unicorn/{i}.jpg" for i in range(3)]
    assert m["unknown_folders"] == [{"folder": "unicorn", "reason": "unknown class folder", "files": 3}]
    assert json.loads(Path(m["manifest_path"]).read_text())["skipped_by_reason"] == m["skipped_by_reason"]

    # A CIFAR-10 tree with an extra class folder in train/ and an unknown folder beside train/ and test/.
    root = write_cifar_folders(tmp_path / "cifar", n_train=3, n_test=1)
    write_image(root / "train" / "unicorn" / "0.png", class_image(0, 10, (32, 32), rng))
    write_image(root / "extra" / "misc" / "0.png", class_image(0, 10, (32, 32), rng))
    m = _load("cifar10", root).manifest
    assert m["files_read"] == 40
    assert m["skipped_by_reason"] == {"unknown class folder": 1, "unknown folder": 1}
    assert {s["file"]: s["reason"] for s in m["skipped"]} == {
        "train/unicorn/0.png": "unknown class folder",
        "extra/misc/0.png": "unknown folder",
    }


# --- item 10: cache location, stale temp files, pruning ----------------------------------------------


@pytest.fixture
def unwritable(tmp_path: Path):
    """make(path): no cache can be made at or under path. chmod alone binds every user but root (tests
    may run as root), so the cache folder's own name is also taken by a file, which stops root too."""
    made: list[Path] = []

    def make(path: Path, blocked: str | None) -> Path:
        path.mkdir(parents=True, exist_ok=True)
        if blocked:
            (path / blocked).write_text("not a folder\n")
        path.chmod(0o555)
        made.append(path)
        return path

    yield make
    for p in made:
        p.chmod(0o755)


def test_no_writable_cache_location_trains_without_cache(tmp_path: Path, monkeypatch, capsys, unwritable):
    data = write_cifar_folders(tmp_path / "data", n_train=3, n_test=1)
    unwritable(data, ".cnnclf-cache")  # a read-only data folder
    home = unwritable(tmp_path / "home", ".cache")  # a read-only home
    monkeypatch.setenv("HOME", str(home))
    monkeypatch.setenv("XDG_CACHE_HOME", str(unwritable(tmp_path / "xdg", "cnnclf")))
    monkeypatch.chdir(unwritable(tmp_path / "cwd", None))
    capsys.readouterr()
    d = _load("cifar10", data)
    assert len(d.train_y) + len(d.val_y) + len(d.test_y) == 40
    assert d.manifest["cache_dir"] is None and d.manifest["manifest_path"] is None
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "without a cache" in err[0] and "no writable cache folder" in err[0]


def test_a_failed_cache_write_is_not_fatal(tmp_path: Path, monkeypatch, capsys):
    """A full disk while the decode cache is written: the run goes on uncached and says so."""
    root = write_cifar_folders(tmp_path / "data", n_train=3, n_test=1)

    def full_disk(obj, f, *a, **k):
        Path(f).write_bytes(b"\x00" * 10)  # what a write cut short leaves
        raise RuntimeError("[enforce fail at inline_container.cc:672] . PytorchStreamWriter failed writing file")

    monkeypatch.setattr("torch.save", full_disk)
    capsys.readouterr()
    m = _load("cifar10", root).manifest
    assert m["files_read"] == 40 and m["manifest_path"] is not None
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "without a cache" in err[0] and "PytorchStreamWriter" in err[0]
    assert sorted(p.name.split("-")[0] for p in (root / ".cnnclf-cache").iterdir()) == ["manifest"]  # no .tmp left


def test_empty_xdg_cache_home_is_treated_as_unset(tmp_path: Path, monkeypatch, unwritable):
    data = write_cifar_folders(tmp_path / "data", n_train=3, n_test=1)
    unwritable(data, ".cnnclf-cache")
    home = tmp_path / "home"
    home.mkdir()
    cwd = tmp_path / "cwd"
    cwd.mkdir()
    monkeypatch.setenv("HOME", str(home))
    monkeypatch.setenv("XDG_CACHE_HOME", "")
    monkeypatch.chdir(cwd)
    m = _load("cifar10", data).manifest
    assert list(cwd.iterdir()) == []  # not ./cnnclf in the working directory
    assert Path(m["cache_dir"]).is_relative_to(home / ".cache" / "cnnclf")
    assert len(list(Path(m["cache_dir"]).glob("cifar10-32px-*.pt"))) == 1


def test_stale_temp_files_are_removed_on_the_next_run(tmp_path: Path):
    root = write_cifar_folders(tmp_path / "data", n_train=3, n_test=1)
    _load("cifar10", root)
    cache = root / ".cnnclf-cache"
    child = subprocess.Popen([sys.executable, "-c", "pass"])
    child.wait()  # its pid names no live process now
    now = time.time()

    def temp(name: str, pid: int, idle_s: float) -> Path:
        p = cache / f"{name}.tmp{pid}"
        p.write_bytes(b"\x00" * 100)
        os.utime(p, (now - idle_s, now - idle_s))
        return p

    dead = temp("cifar10-32px-0123456789abcdef.pt", child.pid, 120)
    dead_manifest = temp("manifest-cifar10-32px-0123456789abcdef.json", child.pid, 120)
    old = temp("cifar10-32px-fedcba9876543210.pt", os.getpid(), 7 * 3600)  # a live pid, but untouched for hours
    writing = temp("cifar10-32px-1111111111111111.pt", os.getpid(), 0)  # this process, writing now
    just_now = temp("cifar10-32px-2222222222222222.pt", child.pid, 5)  # maybe another host's writer
    _load("cifar10", root)
    assert not dead.exists() and not dead_manifest.exists() and not old.exists()
    assert writing.exists() and just_now.exists()


def test_prune_caches_removes_what_no_file_list_matches(tmp_path: Path, monkeypatch):
    root = write_cifar_folders(tmp_path / "data", n_train=3, n_test=1)
    first = _load("cifar10", root).manifest
    cache = root / ".cnnclf-cache"
    write_image(root / "train" / "dog" / "extra.png", class_image(5, 10, (32, 32), np.random.default_rng(0)))
    current = _load("cifar10", root).manifest
    at16 = _load("cifar10", root, image_size=16).manifest
    other_task = cache / "catdog-128px-0123456789abcdef.pt"
    other_task.write_bytes(b"kept: another task's")
    unrelated = cache / "notes.txt"
    unrelated.write_text("kept: not a cache file\n")
    assert len(list(cache.glob("cifar10-*.pt"))) == 3 and len(list(cache.glob("manifest-cifar10-*.json"))) == 3

    removed = data_mod.prune_caches("cifar10", root)
    old_cache = [p for p in removed if p.suffix == ".pt"]
    assert len(removed) == 2 and len(old_cache) == 1 and Path(first["manifest_path"]) in removed
    assert all(not p.exists() for p in removed)
    assert Path(current["manifest_path"]).exists() and Path(at16["manifest_path"]).exists()
    assert other_task.exists() and unrelated.exists()
    assert data_mod.prune_caches("cifar10", root) == []  # nothing left to prune

    # The kept cache is the one the current file list loads, without decoding.
    def no_decoding(*a, **k):
        raise AssertionError("decoded again: prune removed the current cache")

    monkeypatch.setattr(decode_mod, "decode_image", no_decoding)
    assert _load("cifar10", root).manifest["splits"] == current["splits"]
    monkeypatch.undo()

    # image_size: the caches at other resolutions go too.
    removed = data_mod.prune_caches("cifar10", root, image_size=32)
    assert sorted(p.name.split("-")[-2] if p.suffix == ".json" else p.name.split("-")[1] for p in removed) == [
        "16px",
        "16px",
    ]
    assert sorted(p.name for p in cache.glob("cifar10-*.pt")) == sorted(p.name for p in cache.glob("cifar10-32px-*.pt"))
    with pytest.raises(DataError, match="no catdog data"):
        data_mod.prune_caches("catdog", tmp_path / "nothing")


def test_prune_caches_on_a_kaggle_folder_keeps_only_current(tmp_path: Path):
    root = write_catdog_flat(tmp_path / "dogs-vs-cats", n=6, size=(40, 40))
    _load("catdog", root, image_size=32)
    (root / "train" / "cat.0.jpg").unlink()  # the file list changed: the first cache matches nothing now
    _load("catdog", root, image_size=32)
    cache = root / "train" / ".cnnclf-cache"
    assert len(list(cache.glob("catdog-32px-*.pt"))) == 2
    removed = data_mod.prune_caches("catdog", root)
    assert len([p for p in removed if p.suffix == ".pt"]) == 1
    assert len(list(cache.glob("catdog-32px-*.pt"))) == 1 and len(list(cache.glob("manifest-*.json"))) == 1


# --- item 11: images that would decode to too many pixels ------------------------------------------


def _png_bomb(path: Path, width: int, height: int) -> Path:
    """A valid 1-bit greyscale PNG of width x height pixels, a few KB on disk (all rows zero)."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    z = zlib.compressobj(9)
    row = b"\x00" * (1 + (width + 7) // 8)  # filter byte + packed bits
    idat = b"".join(z.compress(row) for _ in range(height)) + z.flush()
    ihdr = struct.pack(">IIBBBBB", width, height, 1, 0, 0, 0, 0)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", idat) + chunk(b"IEND", b""))
    return path


@pytest.fixture
def no_pixel_decoding(monkeypatch):
    """Fail any decode of pixel data, so a test shows the refusal came from the header alone."""

    def load(self):
        raise AssertionError(f"decoded {self.size[0]}x{self.size[1]} pixels")

    monkeypatch.setattr(ImageFile.ImageFile, "load", load)


def test_decode_image_refuses_a_pixel_bomb_from_its_header(tmp_path: Path, no_pixel_decoding):
    bomb = _png_bomb(tmp_path / "bomb.png", 7000, 7000)  # 49 Mpx: below PIL's own limit (89 Mpx), above ours
    assert bomb.stat().st_size < 100_000
    with Image.open(bomb) as im:
        assert im.size == (7000, 7000)
    with pytest.raises(data_mod.ImageTooLarge, match="7000x7000"):  # predict's decode refuses it too
        data_mod.decode_image(bomb, 32)
    assert data_mod.MAX_IMAGE_PIXELS == 40_000_000


def test_pixel_bomb_is_skipped_and_large_jpeg_still_drafted(tmp_path: Path):
    rng = np.random.default_rng(0)
    pets = tmp_path / "pets"
    for label, name in enumerate(("Cat", "Dog")):
        for i in range(5):
            write_image(pets / name / f"{i}.jpg", class_image(label, 2, (40, 40), rng))
    _png_bomb(pets / "Cat" / "bomb.png", 7000, 7000)
    # 41 Mpx as a JPEG: libjpeg decodes it at 1/8 scale (800x800), so it is kept.
    big = io.BytesIO()
    Image.fromarray(np.full((6400, 6400), 128, dtype=np.uint8)).save(big, format="JPEG", quality=50)
    (pets / "Dog" / "big.jpg").write_bytes(big.getvalue())
    m = _load("catdog", pets, image_size=32).manifest
    assert m["skipped_by_reason"] == {"image too large": 1}
    assert m["skipped"][0]["file"] == "Cat/bomb.png" and "7000x7000" in m["skipped"][0]["detail"]
    assert m["files_read"] == 11
