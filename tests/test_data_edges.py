"""Data edge cases: file names that are not UTF-8, and a decode cache edited after it was written."""

from __future__ import annotations

import io
import json
import os
import subprocess
import sys
import zipfile
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import cnnclf.data as data_mod
import cnnclf.data.decode as decode_mod
from cnnclf.data import load_task
from tests.conftest import class_image, write_catdog_flat, write_image

REPO = Path(__file__).resolve().parents[1]
BAD_NAME = b"cat.\xff1.jpg"  # Latin-1 bytes, not UTF-8: Python lists it as 'cat.\udcff1.jpg'
SHOWN = "cat.\\xff1.jpg"  # how manifests name it


def _load(root: Path, **kw) -> data_mod.TaskData:
    return load_task("catdog", root, image_size=32, progress=False, **kw)


def _jpeg(label: int, seed: int = 7) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(class_image(label, 2, (40, 30), np.random.default_rng(seed))).save(buf, format="JPEG")
    return buf.getvalue()


def _write_class_folders(root: Path, n: int = 20) -> Path:
    rng = np.random.default_rng(0)
    for label, name in enumerate(("Cat", "Dog")):
        for i in range(n):
            write_image(root / name / f"{i}.jpg", class_image(label, 2, (40, 30), rng))
    return root


def _with_bad_name(layout: str, root: Path) -> tuple[Path, int]:
    """A Cat/Dog data set in `layout` holding one cat JPEG whose name is not UTF-8; (root, good images)."""
    if layout == "kaggle-flat":
        write_catdog_flat(root, n=20, size=(40, 30))
        folder = root / "train"
    else:
        _write_class_folders(root)
        folder = root / "Cat"
        unknown = os.path.join(os.fsencode(root), b"unic\xf6rn")  # a folder beside the classes: counted, not read
        os.mkdir(unknown)
        with open(os.path.join(unknown, b"x.jpg"), "wb") as f:
            f.write(_jpeg(0))
    with open(os.path.join(os.fsencode(folder), BAD_NAME), "wb") as f:
        f.write(_jpeg(0))
    return root, 41


def _strict_json(path: str | Path) -> dict:
    """The file parsed as strict UTF-8 JSON with no lone surrogates (which other languages' parsers refuse)."""
    text = Path(path).read_bytes().decode("utf-8")
    loaded = json.loads(text)
    json.dumps(loaded, ensure_ascii=False).encode("utf-8")  # raises on a surrogate escaped as \udcff
    return loaded


@pytest.mark.parametrize("layout", ["kaggle-flat", "class-folders"])
def test_a_file_name_that_is_not_utf8_is_read(tmp_path: Path, monkeypatch, layout: str):
    """One JPEG named in Latin-1 bytes used to fail every run with UnicodeEncodeError (the cache key
    encoded names as UTF-8). It is read like any other file, and named in the manifest with `\\xff`."""
    root, n = _with_bad_name(layout, tmp_path / "data")
    d = _load(root)
    m = d.manifest
    assert m["layout"] == layout and m["files_read"] == n
    listed = [f for split in _strict_json(m["manifest_path"])["split_files"].values() for f in split]
    assert len(listed) == n and sum(f.endswith(SHOWN) for f in listed) == 1
    assert json.dumps(m, ensure_ascii=False).encode("utf-8")  # no surrogate anywhere in the manifest
    if layout == "class-folders":
        assert m["skipped"] == [{"file": "unic\\xf6rn/x.jpg", "reason": "unknown class folder", "detail": ""}]
        assert m["unknown_folders"][0]["folder"] == "unic\\xf6rn"
    else:
        assert m["files_skipped"] == 0

    # The cache is keyed and reused: a second load decodes nothing and gives the same splits.
    def no_decoding(*a, **k):
        raise AssertionError("decoded again despite the cache")

    monkeypatch.setattr(decode_mod, "decode_image", no_decoding)
    again = _load(root)
    assert again.manifest["splits"] == m["splits"] and again.manifest["digest"] == m["digest"]


def test_prepare_reads_a_file_name_that_is_not_utf8(tmp_path: Path):
    """`python -m cnnclf prepare` as a user runs it: exit 0, valid JSON on stdout counting the file."""
    root, n = _with_bad_name("kaggle-flat", tmp_path / "data")
    r = subprocess.run(
        [sys.executable, "-m", "cnnclf", "prepare", "--task", "catdog", "--data-dir", str(root), "--image-size", "32"],
        capture_output=True,
        timeout=300,
        cwd=REPO,
        env={**os.environ, "XDG_CACHE_HOME": str(tmp_path / "xdg")},
    )
    assert r.returncode == 0, r.stderr.decode(errors="replace")[-2000:]
    m = json.loads(r.stdout.decode("utf-8"))
    assert m["files_read"] == n and m["files_skipped"] == 0
    full = _strict_json(m["manifest_path"])
    assert sum(f == SHOWN for split in full["split_files"].values() for f in split) == 1


def _rewrite_cache(root: Path, edit) -> Path:
    """Load the one decode cache under root as a reader would, edit it, and save it back in place in the
    format it had (torch's zip format, or the legacy one)."""
    (cache,) = (root / "train" / ".cnnclf-cache").glob("catdog-32px-*.pt")
    was_zip = zipfile.is_zipfile(cache)
    raw = torch.load(cache, weights_only=True)
    edit(raw)
    torch.save(raw, cache, _use_new_zipfile_serialization=was_zip)
    return cache


@pytest.mark.parametrize(
    "edit",
    [
        pytest.param(lambda raw: raw["y"].zero_(), id="every-label-0"),
        pytest.param(lambda raw: raw["x"][: len(raw["x"]) // 2].fill_(0), id="pixels-blanked"),
    ],
)
def test_a_cache_edited_after_it_was_written_is_decoded_again(tmp_path: Path, capsys, edit):
    """A well-formed decode cache whose labels (or pixels) were rewritten in place is not trusted: its
    checksum no longer matches, so the images are decoded again, with one stderr note."""
    root = write_catdog_flat(tmp_path / "data", n=20, size=(40, 30))
    first = _load(root)
    capsys.readouterr()
    cache = _rewrite_cache(root, edit)

    second = _load(root)
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "checksum" in err[0] and cache.name in err[0], err
    for split in ("train", "val", "test"):
        assert torch.equal(getattr(second, f"{split}_y"), getattr(first, f"{split}_y")), split
        assert torch.equal(getattr(second, f"{split}_x"), getattr(first, f"{split}_x")), split
    assert second.manifest["digest"] == first.manifest["digest"]

    # The decode rewrote the cache: the next load trusts it and says nothing.
    third = _load(root)
    assert capsys.readouterr().err == "" and third.manifest["digest"] == first.manifest["digest"]
