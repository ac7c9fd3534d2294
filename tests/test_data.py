from __future__ import annotations

import io
import json
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image, ImageFile

import cnnclf.data.decode as decode_mod
import cnnclf.data.downloads as downloads_mod
from cnnclf.data import (
    CIFAR10_CLASSES,
    DataError,
    Normalizer,
    channel_stats,
    decode_image,
    load_task,
    make_augment,
    random_crop,
    random_flip,
    random_resized_crop,
    stratified_split,
    train_batches,
)
from tests.conftest import (
    add_bad_files,
    add_corrupt_files,
    add_odd_images,
    class_image,
    tar_gz,
    write_cifar_batches,
    write_image,
    write_petimages,
    zip_dir,
)
from tests.test_data_safety import trust_cifar_batches


def _load(task, root, **kw):
    return load_task(task, root, progress=False, **kw)


# --- CIFAR-10 ----------------------------------------------------------------------------------


def test_cifar_image_folder_tree_with_corrupt_files(cifar_tree: Path):
    d = _load("cifar10", cifar_tree, val_fraction=0.25)
    assert d.classes == CIFAR10_CLASSES
    assert d.train_x.dtype == torch.uint8 and d.train_x.shape[1:] == (3, 32, 32)
    # 12 train images per class: 3 to val (25%), 9 to train; the 4 per class in test/ stay test.
    assert len(d.train_y) == 90 and len(d.val_y) == 30 and len(d.test_y) == 40
    assert torch.bincount(d.val_y).tolist() == [3] * 10
    assert torch.bincount(d.test_y).tolist() == [4] * 10
    m = d.manifest
    assert m["layout"] == "image-folder" and m["files_skipped"] == 4
    skipped = {Path(s["file"]).name for s in m["skipped"]}
    assert skipped == {"empty.jpg", "truncated.jpg", "notes.jpg", "Thumbs.db"}
    assert all(s["reason"] for s in m["skipped"])
    full = json.loads(Path(m["manifest_path"]).read_text())
    assert len(full["split_files"]["val"]) == 30 and full["files_skipped"] == 4


def test_cifar_found_from_parent_folder(cifar_tree: Path):
    d = _load("cifar10", cifar_tree.parent)
    assert len(d.test_y) == 40


def test_cifar_torchvision_layout(tmp_path: Path, monkeypatch):
    # Synthetic pickles: their md5s stand in for the official ones, which the loader checks before unpickling.
    trust_cifar_batches(monkeypatch, write_cifar_batches(tmp_path, n_train=100, n_test=20))
    d = _load("cifar10", tmp_path)
    assert d.manifest["layout"] == "torchvision"
    assert len(d.train_y) + len(d.val_y) == 100 and len(d.test_y) == 20
    assert d.train_x.shape[1:] == (3, 32, 32)


def test_splits_reproducible_and_seeded(cifar_tree: Path):
    a, b = _load("cifar10", cifar_tree), _load("cifar10", cifar_tree)
    c = _load("cifar10", cifar_tree, seed=1)
    assert torch.equal(a.val_x, b.val_x) and a.manifest["splits"] == b.manifest["splits"]
    assert a.manifest["splits"]["val"]["sha256"] != c.manifest["splits"]["val"]["sha256"]
    assert a.manifest["splits"]["test"] == c.manifest["splits"]["test"]  # the labelled test set never moves


def test_subset_is_stratified_and_leaves_val_test_whole(cifar_tree: Path):
    full = _load("cifar10", cifar_tree)
    d = _load("cifar10", cifar_tree, subset=40)
    assert len(d.train_y) == 40 and torch.bincount(d.train_y).tolist() == [4] * 10
    assert len(d.val_y) == len(full.val_y) and len(d.test_y) == len(full.test_y)


def test_stratified_split_keeps_class_shares():
    y = torch.tensor([0] * 50 + [1] * 30 + [2] * 20)
    keep, split = stratified_split(y, 0.1, seed=3)
    assert torch.bincount(y[split]).tolist() == [5, 3, 2]
    assert len(set(keep.tolist()) & set(split.tolist())) == 0 and len(keep) + len(split) == 100


def test_decode_cache_is_reused_and_keyed_by_file_list(cifar_tree: Path, monkeypatch):
    first = _load("cifar10", cifar_tree)
    caches = list((cifar_tree / ".cnnclf-cache").glob("cifar10-32px-*.pt"))
    assert len(caches) == 1

    def no_decoding(*a, **k):
        raise AssertionError("decoded again despite the cache")

    monkeypatch.setattr(decode_mod, "decode_image", no_decoding)
    again = _load("cifar10", cifar_tree)
    assert torch.equal(first.train_x, again.train_x)
    monkeypatch.undo()
    write_image(
        cifar_tree / "train" / "dog" / "extra.png",
        class_image(5, 10, (32, 32), __import__("numpy").random.default_rng(0)),
    )
    grown = _load("cifar10", cifar_tree)
    assert len(grown.train_y) + len(grown.val_y) == len(first.train_y) + len(first.val_y) + 1
    assert len(list((cifar_tree / ".cnnclf-cache").glob("cifar10-32px-*.pt"))) == 2


def test_missing_data_without_download_names_the_folder(tmp_path: Path):
    with pytest.raises(DataError, match=str(tmp_path / "nothing")):
        _load("cifar10", tmp_path / "nothing", download_missing=False)
    with pytest.raises(DataError, match="no catdog data"):
        _load("catdog", tmp_path, download_missing=False)


# --- Cat/Dog ------------------------------------------------------------------------------------


def test_catdog_kaggle_flat(kaggle_flat: Path):
    d = _load("catdog", kaggle_flat, image_size=64)
    assert d.manifest["layout"] == "kaggle-flat"
    assert d.train_x.shape[1:] == (3, 64, 64)
    n = len(d.train_y) + len(d.val_y) + len(d.test_y)
    assert n == 60  # 30 + 30 readable; test1/ (unlabelled) ignored
    assert torch.bincount(d.test_y).tolist() == [3, 3]  # seeded 10% per class, no labelled test set
    assert d.manifest["files_skipped"] == 4  # Thumbs.db has no cat/dog prefix, and is counted as a system file
    assert d.manifest["skipped_by_reason"]["system file"] == 1
    assert "seeded" in d.manifest["test_source"]


@pytest.mark.parametrize("names", [("Cat", "Dog"), ("cats", "dogs"), ("CATS", "Dogs")])
def test_catdog_class_folders_alone(tmp_path: Path, names):
    import numpy as np

    rng = np.random.default_rng(0)
    for label, name in enumerate(names):
        for i in range(10):
            write_image(tmp_path / "pets" / name / f"{i}.jpg", class_image(label, 2, (70, 50), rng))
    d = _load("catdog", tmp_path, image_size=32)
    assert d.manifest["layout"] == "class-folders"
    assert len(d.train_y) + len(d.val_y) + len(d.test_y) == 20


def test_catdog_train_and_validation_folders(tmp_path: Path):
    import numpy as np

    rng = np.random.default_rng(0)
    for split, n in (("train", 20), ("validation", 6)):
        for label, name in enumerate(("cats", "dogs")):
            for i in range(n):
                write_image(tmp_path / split / name / f"{name}.{i}.jpg", class_image(label, 2, (64, 64), rng))
    d = _load("catdog", tmp_path, image_size=32)
    assert len(d.test_y) == 12 and d.manifest["test_source"] == "labelled test set"
    assert len(d.train_y) + len(d.val_y) == 40


def test_catdog_petimages_with_broken_files(tmp_path: Path):
    write_petimages(tmp_path, n=20)
    d = _load("catdog", tmp_path, image_size=48)
    assert d.manifest["layout"] == "petimages"
    assert len(d.train_y) + len(d.val_y) + len(d.test_y) == 38  # greyscale kept; PNG-as-.jpg (one per class) not
    assert d.manifest["files_skipped"] == 6
    assert d.manifest["skipped_by_reason"]["png content named .jpg"] == 2
    assert d.train_x.shape[1:] == (3, 48, 48)


# --- downloads (a local HTTP server; never the network) ----------------------------------------


def test_cifar_download_checks_md5_and_extracts(http_dir, tmp_path: Path, monkeypatch):
    from torchvision.datasets import CIFAR10

    served, url = http_dir
    src = tmp_path / "src"
    trust_cifar_batches(monkeypatch, write_cifar_batches(src))
    archive = tar_gz(src / "cifar-10-batches-py", served / "c.tar.gz")
    monkeypatch.setenv("CNNCLF_CIFAR10_URL", f"{url}/c.tar.gz")
    monkeypatch.setattr(CIFAR10, "tgz_md5", downloads_mod._file_md5(archive))
    dest = tmp_path / "data"
    d = _load("cifar10", dest)
    assert len(d.test_y) == 20
    assert sorted(p.name for p in dest.iterdir()) == [".cnnclf-cache", "cifar-10-batches-py"]  # archive removed

    monkeypatch.setattr(CIFAR10, "tgz_md5", "0" * 32)  # a corrupt download is refused, nothing kept
    dest2 = tmp_path / "data2"
    with pytest.raises(DataError, match="corrupt"):
        _load("cifar10", dest2)
    assert not dest2.exists()  # not even the folder the download created


def test_failed_download_leaves_nothing(tmp_path: Path, monkeypatch):
    monkeypatch.setenv("CNNCLF_CATDOG_URL", "http://127.0.0.1:9/kagglecatsanddogs_5340.zip")
    with pytest.raises(DataError, match="network is the likely cause"):
        _load("catdog", tmp_path / "d" / "deeper")
    assert list(tmp_path.iterdir()) == []  # the folders the download would have filled are gone again


def test_petimages_download_and_corrupt_zip(http_dir, tmp_path: Path, monkeypatch):
    served, url = http_dir
    pets = write_petimages(tmp_path / "src", n=10)
    archive = zip_dir(pets, served / "pets.zip")
    monkeypatch.setenv("CNNCLF_CATDOG_URL", f"{url}/pets.zip")
    d = _load("catdog", tmp_path / "ok", image_size=32)
    assert d.manifest["layout"] == "petimages" and len(d.train_y) + len(d.val_y) + len(d.test_y) == 18

    raw = bytearray(archive.read_bytes())
    raw[200:260] = b"\xff" * 60  # damage the first member's data: its CRC no longer matches
    (served / "bad.zip").write_bytes(bytes(raw))
    monkeypatch.setenv("CNNCLF_CATDOG_URL", f"{url}/bad.zip")
    with pytest.raises(DataError, match="corrupt"):
        _load("catdog", tmp_path / "bad", image_size=32)
    assert not (tmp_path / "bad" / "PetImages").exists()  # never half-extracted
    assert not [p for p in (tmp_path / "bad").iterdir() if p.name.startswith(".extract")]


# --- on-device batches ------------------------------------------------------------------------


def test_normalizer_matches_formula():
    x = torch.randint(0, 256, (4, 3, 8, 8), dtype=torch.uint8)
    mean, std = (0.4, 0.5, 0.6), (0.2, 0.25, 0.3)
    out = Normalizer(mean, std, torch.device("cpu"))(x)
    want = (x.float() / 255 - torch.tensor(mean).view(1, 3, 1, 1)) / torch.tensor(std).view(1, 3, 1, 1)
    torch.testing.assert_close(out, want)


def test_channel_stats():
    x = torch.zeros(10, 3, 4, 4, dtype=torch.uint8)
    x[:, 0] = 255
    x[:5, 1] = 255
    mean, std = channel_stats(x, chunk=3)
    assert mean == pytest.approx((1.0, 0.5, 0.0)) and std == pytest.approx((0.0, 0.5, 0.0), abs=1e-5)


def test_random_crop_is_a_shifted_window():
    g = torch.Generator().manual_seed(0)
    x = torch.arange(2 * 1 * 8 * 8, dtype=torch.float32).view(2, 1, 8, 8)
    out = random_crop(x, pad=2, g=g)
    assert out.shape == x.shape
    padded = torch.nn.functional.pad(x, (2, 2, 2, 2), mode="reflect")
    for b in range(2):
        assert any(torch.equal(out[b, 0], padded[b, 0, dy : dy + 8, dx : dx + 8]) for dy in range(5) for dx in range(5))


def test_random_flip_flips_about_half():
    g = torch.Generator().manual_seed(0)
    x = torch.arange(4, dtype=torch.float32).view(1, 1, 1, 4).repeat(1000, 1, 1, 1)
    out = random_flip(x, g)
    flipped = (out[:, 0, 0, 0] == 3).sum().item()
    assert 400 < flipped < 600 and ((out[:, 0, 0, 0] == 0) | (out[:, 0, 0, 0] == 3)).all()


def test_random_resized_crop_shape_and_range():
    g = torch.Generator().manual_seed(0)
    x = torch.rand(16, 3, 32, 32)
    out = random_resized_crop(x, g)
    assert out.shape == x.shape and torch.isfinite(out).all()
    assert out.min() >= -1e-5 and out.max() <= 1 + 1e-5  # bilinear stays within the input's range
    assert not torch.allclose(out, x)


def test_train_batches_cover_epoch_once():
    x = torch.arange(10, dtype=torch.uint8).view(10, 1, 1, 1).expand(10, 3, 4, 4).contiguous()
    y = torch.arange(10)
    g = torch.Generator().manual_seed(0)
    norm = Normalizer((0, 0, 0), (1 / 255, 1 / 255, 1 / 255), torch.device("cpu"))  # identity
    seen = []
    for xb, yb in train_batches(x, y, 3, norm, make_augment("none"), g):
        assert torch.equal(xb[:, 0, 0, 0].long(), yb)  # images stay paired with their labels
        seen += yb.tolist()
    assert sorted(seen) == list(range(10))


def test_corrupt_file_helper_covers_kinds(tmp_path: Path):
    names = add_corrupt_files(tmp_path)
    for n in names:
        reason, _detail = decode_mod._decode_or_reason(tmp_path / n, 16)
        assert reason


# --- broken files in every layout ---------------------------------------------------------------
#
# Each layout gets every kind of broken file (conftest.add_bad_files: zero-byte, truncated JPEG,
# PNG/GIF/WEBP bytes named .jpg, text named .jpg, notes.txt, Thumbs.db, .DS_Store) in two of its
# folders, and readable oddities (greyscale and CMYK JPEG, RGBA PNG) that must be kept.


def _layout(name: str, root: Path) -> tuple[str, dict[Path, str], list[Path]]:
    """Writes a small data set in layout `name`; returns its task, {broken file: reason}, readable files."""
    rng = np.random.default_rng(0)
    bad: dict[Path, str] = {}
    good: list[Path] = []

    def images(folder: Path, label: int, n_classes: int, n: int, prefix: str = "") -> None:
        for i in range(n):
            path = folder / f"{prefix}{i}.jpg"
            write_image(path, class_image(label, n_classes, (int(rng.integers(30, 60)), 40), rng))
            good.append(path)

    if name == "cifar10-image-folder":
        for split, n in (("train", 5), ("test", 2)):
            for c, cls in enumerate(CIFAR10_CLASSES):
                images(root / split / cls, c, 10, n)
        bad |= add_bad_files(root / "train" / "cat")
        bad |= add_bad_files(root / "test" / "dog")
        good += add_odd_images(root / "train" / "cat", 3, 10)
        return "cifar10", bad, good
    if name == "catdog-kaggle-flat":
        flat = root / "train"
        for label, cls in enumerate(("cat", "dog")):
            images(flat, label, 2, 8, prefix=f"{cls}.")
        bad |= add_bad_files(flat, prefix="cat.")
        good += add_odd_images(flat, 1, 2, prefix="dog.")
        write_image(flat / "1.jpg", class_image(0, 2, (40, 40), rng))  # a readable photo without a label
        bad[flat / "1.jpg"] = "no cat/dog label in the file name"
        return "catdog", bad, good
    folders = {
        "catdog-class-folders": (root / "Cat", root / "Dog"),
        "catdog-split-folders": (root / "train" / "cats", root / "train" / "dogs"),
        "catdog-petimages": (root / "PetImages" / "Cat", root / "PetImages" / "Dog"),
    }[name]
    for label, folder in enumerate(folders):
        images(folder, label, 2, 8)
        bad |= add_bad_files(folder)
    good += add_odd_images(folders[0], 0, 2)
    if name == "catdog-split-folders":  # a labelled test set beside train/, with broken files of its own
        for label, cls in enumerate(("cats", "dogs")):
            images(root / "validation" / cls, label, 2, 3)
        bad |= add_bad_files(root / "validation" / "dogs")
    return "catdog", bad, good


LAYOUTS = [
    "cifar10-image-folder",
    "catdog-kaggle-flat",
    "catdog-class-folders",
    "catdog-split-folders",
    "catdog-petimages",
]


@pytest.mark.parametrize("layout", LAYOUTS)
def test_broken_files_are_skipped_counted_and_named(layout: str, tmp_path: Path, monkeypatch):
    task, bad, good = _layout(layout, tmp_path / "data")
    d = _load(task, tmp_path / "data", image_size=32)
    m = d.manifest
    base = Path(m["base"])
    assert m["layout"] == layout.split("-", 1)[1].replace("split-folders", "class-folders")

    want = {str(p.relative_to(base)): reason for p, reason in bad.items()}
    assert {s["file"]: s["reason"] for s in m["skipped"]} == want
    assert m["files_skipped"] == len(bad) and m["skipped_by_reason"] == dict(sorted(Counter(want.values()).items()))
    assert all(s["detail"] for s in m["skipped"] if s["reason"] in ("truncated image", "not an image"))
    assert m["files_read"] == len(good)

    # Exactly the readable images, each where the manifest says, with the pixels it decodes to.
    full = json.loads(Path(m["manifest_path"]).read_text())
    assert full["skipped_by_reason"] == m["skipped_by_reason"] and full["files_skipped"] == len(bad)
    listed = [f for files in full["split_files"].values() for f in files]
    assert sorted(listed) == sorted(str(p.relative_to(base)) for p in good)
    for split, x in (("train", d.train_x), ("val", d.val_x), ("test", d.test_x)):
        assert len(x) == len(full["split_files"][split])
        for row, f in zip(x, full["split_files"][split], strict=True):
            assert torch.equal(row, torch.from_numpy(decode_image(base / f, 32)).permute(2, 0, 1)), f

    # A cached load decodes nothing and still reports every skipped file.
    def no_decoding(*a, **k):
        raise AssertionError("decoded again despite the cache")

    monkeypatch.setattr(decode_mod, "decode_image", no_decoding)
    again = _load(task, tmp_path / "data", image_size=32)
    for key in ("files_read", "files_skipped", "skipped_by_reason", "skipped", "splits"):
        assert again.manifest[key] == m[key], key
    assert torch.equal(again.train_x, d.train_x)


def test_repaired_file_is_decoded_again(tmp_path: Path):
    """A broken file is part of the cache key by size and mtime: once repaired, the next load reads it."""
    task, bad, good = _layout("catdog-class-folders", tmp_path / "data")
    first = _load(task, tmp_path / "data", image_size=32)
    truncated = next(p for p, r in bad.items() if r == "truncated image")
    write_image(truncated, class_image(0, 2, (40, 30), np.random.default_rng(1)))
    second = _load(task, tmp_path / "data", image_size=32)
    assert second.manifest["files_skipped"] == first.manifest["files_skipped"] - 1
    assert second.manifest["files_read"] == len(good) + 1
    truncated_left = sum(r == "truncated image" for r in bad.values()) - 1
    assert second.manifest["skipped_by_reason"]["truncated image"] == truncated_left
    assert len(list((tmp_path / "data" / ".cnnclf-cache").glob("catdog-32px-*.pt"))) == 2


def test_unreadable_file_is_not_cached(tmp_path: Path, monkeypatch):
    """A file skipped for a reason outside its bytes (permissions, I/O) must not stay skipped via the cache."""
    task, _, good = _layout("catdog-class-folders", tmp_path / "data")
    real = decode_mod.decode_image

    def flaky(path, size, formats=None):
        if Path(path) == good[0]:
            raise PermissionError(13, "Permission denied", str(path))
        return real(path, size, formats)

    monkeypatch.setattr(decode_mod, "decode_image", flaky)
    d = _load(task, tmp_path / "data", image_size=32)
    assert d.manifest["skipped_by_reason"]["unreadable file"] == 1
    assert not list((tmp_path / "data" / ".cnnclf-cache").glob("catdog-32px-*.pt"))
    monkeypatch.undo()
    assert _load(task, tmp_path / "data", image_size=32).manifest["files_read"] == len(good)


def test_truncated_jpeg_is_refused_even_if_pil_was_told_to_load_it(tmp_path: Path, monkeypatch):
    buf = io.BytesIO()
    Image.fromarray(class_image(0, 2, (96, 64), np.random.default_rng(0))).save(buf, format="JPEG")
    half = tmp_path / "half.jpg"
    half.write_bytes(buf.getvalue()[: len(buf.getvalue()) // 2])  # headers whole, pixel data cut
    with pytest.raises(OSError, match="image file is truncated"):
        decode_image(half, 32)
    # Some library in the process may have set PIL's global switch; the data loader still refuses.
    monkeypatch.setattr(ImageFile, "LOAD_TRUNCATED_IMAGES", True)
    task, bad, _ = _layout("catdog-petimages", tmp_path / "data")
    d = _load(task, tmp_path / "data", image_size=32)
    assert d.manifest["skipped_by_reason"]["truncated image"] == sum(r == "truncated image" for r in bad.values())
    assert ImageFile.LOAD_TRUNCATED_IMAGES is True  # restored afterwards


def test_data_dir_that_is_a_file(tmp_path: Path):
    f = tmp_path / "notes.txt"
    f.write_text("not a folder\n")
    for where in (f, f / "below"):
        with pytest.raises(DataError, match="is a file, not a data folder"):
            _load("cifar10", where)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["notes.txt"]
