"""Small synthetic data sets written in the real on-disk layouts, with corrupt files mixed in."""

from __future__ import annotations

import functools
import http.server
import io
import os
import pickle
import tarfile
import threading
import zipfile
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from cnnclf.data import CIFAR10_CLASSES

pytest_plugins = ["pytester"]  # tests/test_tiers.py runs the collection hook below on a suite of its own

# The fixtures that start Ray (a sweep, a cluster), an MLflow server or a browser. A test that uses one, directly
# or through another fixture, is marked slow here, so `pytest -m "not slow"` never starts them and no test can
# forget its mark (tests/test_tiers.py checks the hook). Tests that start Ray without such a fixture (a sweep
# script in a subprocess) carry the mark themselves.
SLOW_FIXTURES = frozenset({"smoke_sweep", "budget_sweep", "mlflow_server", "chromium", "two_nodes"})


# Fixtures that make something costly that several tests read (a sweep; trained checkpoints, stores and reports
# made once per module). pytest-xdist makes a session or module fixture once per worker that runs a test using it,
# so every test using one goes to one worker (an xdist group; `--dist loadgroup` in pyproject.toml's addopts):
# the session fixtures' by the fixture's name, the module fixtures' by the test's module. A test using none is
# scheduled on its own, wherever a worker is free.
SHARED_SESSION_FIXTURES = ("smoke_sweep", "budget_sweep")
SHARED_MODULE_FIXTURES = frozenset({"trained", "store", "old_store", "runs", "reports", "inputs"})


def shared_group(fixturenames) -> str | None:
    """The xdist group of a test that uses these fixtures (directly or through others), None if it shares none."""
    names = set(fixturenames)
    session = [f for f in SHARED_SESSION_FIXTURES if f in names]
    return session[0] if session else "module" if SHARED_MODULE_FIXTURES & names else None


@pytest.hookimpl(tryfirst=True)  # before pytest's own hook deselects by -m
def pytest_collection_modifyitems(config, items):
    for item in items:
        names = getattr(item, "fixturenames", ())
        if SLOW_FIXTURES.intersection(names):
            item.add_marker(pytest.mark.slow)
        group = shared_group(names)
        if group is not None:
            item.add_marker(pytest.mark.xdist_group(item.path.stem if group == "module" else group))
    if os.environ.get("PYTEST_XDIST_WORKER"):  # every worker collects alike, so the order is the same on each
        # The slow tests first (a stable sort keeps each part's order): xdist hands out the work in this order,
        # so the long ones do not start last while the other workers idle.
        items.sort(key=lambda item: item.get_closest_marker("slow") is None)
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(scope="session")
def mlflow_server():
    """Starts real `mlflow server`s (tests/mlflow_server.py): `mlflow_server(store_uri, ...)` is an MlflowServer,
    not yet started; any still running at the end of the session are stopped. Using it marks a test slow."""
    from tests.mlflow_server import MlflowServer

    made: list[MlflowServer] = []

    def make(backend_store_uri: str, **kwargs) -> MlflowServer:
        made.append(MlflowServer(backend_store_uri, **kwargs))
        return made[-1]

    yield make
    for server in made:
        server.stop(kill=True)


@pytest.fixture(scope="session")
def chromium():
    """Launches Debian's headless Chromium through Playwright (tests/browser.py): `with chromium() as browser:`.
    A launcher, not a browser: Playwright's event loop must not outlive the block (it breaks asyncio.run in
    the tests that follow). Using it marks a test slow."""
    from tests.browser import launch

    return launch


@pytest.fixture
def http_dir(tmp_path: Path):
    """A local HTTP server for download tests (never the network)."""
    served = tmp_path / "served"
    served.mkdir()
    handler = functools.partial(http.server.SimpleHTTPRequestHandler, directory=str(served))
    handler.log_message = lambda *a: None
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield served, f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()


def class_image(label: int, n_classes: int, size: tuple[int, int], rng: np.random.Generator) -> np.ndarray:
    """A noisy image whose mean colour and stripe direction give away its class: learnable fast."""
    w, h = size
    hue = np.array([np.cos(2 * np.pi * label / n_classes), np.sin(2 * np.pi * label / n_classes), (label % 2) - 0.5])
    img = 128 + 90 * hue[None, None, :] + rng.normal(0, 25, (h, w, 3))
    if label % 2:
        img[::4, :, :] += 40
    else:
        img[:, ::4, :] += 40
    return np.clip(img, 0, 255).astype(np.uint8)


def write_image(path: Path, arr: np.ndarray, fmt: str | None = None) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(arr).save(path, format=fmt or ("JPEG" if path.suffix.lower() in (".jpg", ".jpeg") else None))


def write_cifar_folders(root: Path, n_train: int = 16, n_test: int = 4, rng: np.random.Generator | None = None) -> Path:
    """`root/{train,test}/<class>/<i>.png`: CIFAR-10's folder layout, 32x32 images a model can tell apart."""
    rng = np.random.default_rng(0) if rng is None else rng
    for split, n in (("train", n_train), ("test", n_test)):
        for c, name in enumerate(CIFAR10_CLASSES):
            for i in range(n):
                write_image(root / split / name / f"{i}.png", class_image(c, 10, (32, 32), rng))
    return root


def write_catdog_flat(
    root: Path, n: int = 40, size: tuple[int, int] = (80, 60), rng: np.random.Generator | None = None
) -> Path:
    """Kaggle's flat `root/train/{cat,dog}.<i>.jpg` layout: the label is the file name's prefix."""
    rng = np.random.default_rng(0) if rng is None else rng
    for label, name in enumerate(("cat", "dog")):
        for i in range(n):
            write_image(root / "train" / f"{name}.{i}.jpg", class_image(label, 2, size, rng))
    return root


def add_corrupt_files(folder: Path, prefix: str = "") -> list[str]:
    """Zero-byte, truncated JPEG, text file and Thumbs.db; returns their names."""
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(1)
    good = io.BytesIO()
    Image.fromarray(class_image(0, 2, (40, 30), rng)).save(good, format="JPEG")
    files = {
        f"{prefix}empty.jpg": b"",
        f"{prefix}truncated.jpg": good.getvalue()[: len(good.getvalue()) // 2],
        f"{prefix}notes.jpg": b"this is not an image\n",
        "Thumbs.db": b"\xd0\xcf\x11\xe0" + b"\x00" * 100,
    }
    for name, content in files.items():
        (folder / name).write_bytes(content)
    return sorted(files)


def _encoded(arr: np.ndarray, fmt: str, mode: str | None = None) -> bytes:
    buf = io.BytesIO()
    (Image.fromarray(arr).convert(mode) if mode else Image.fromarray(arr)).save(buf, format=fmt)
    return buf.getvalue()


def add_bad_files(folder: Path, prefix: str = "") -> dict[Path, str]:
    """Every kind of broken file a real image folder holds, as real bytes; returns {path: expected skip reason}.

    `prefix` goes before the image-like names (Kaggle's flat layout labels files by it, `cat.`);
    the system files and notes.txt keep their usual names.
    """
    folder.mkdir(parents=True, exist_ok=True)
    arr = class_image(0, 2, (96, 64), np.random.default_rng(1))  # big enough that half the JPEG is pixel data
    jpeg = _encoded(arr, "JPEG")
    files = {
        f"{prefix}empty.jpg": (b"", "zero-byte file"),
        f"{prefix}truncated.jpg": (jpeg[: len(jpeg) // 2], "truncated image"),  # cut inside the scan data
        f"{prefix}cut-in-header.jpg": (jpeg[:20], "truncated image"),  # JPEG signature, nothing PIL can open
        f"{prefix}png.jpg": (_encoded(arr, "PNG"), "png content named .jpg"),
        f"{prefix}gif.jpg": (_encoded(arr, "GIF"), "gif content named .jpg"),
        f"{prefix}webp.jpg": (_encoded(arr, "WEBP"), "webp content named .jpg"),
        f"{prefix}jpeg.png": (jpeg, "jpeg content named .png"),
        f"{prefix}text.jpg": (b"this is not an image\n", "not an image"),
        "notes.txt": (b"downloaded from kaggle\n", "not an image file (.txt)"),
        "Thumbs.db": (b"\xd0\xcf\x11\xe0\xa1\xb1\x1a\xe1" + b"\x00" * 100, "system file"),  # an OLE file
        ".DS_Store": (b"\x00\x00\x00\x01Bud1" + b"\x00" * 100, "system file"),
    }
    for name, (content, _) in files.items():
        (folder / name).write_bytes(content)
    return {folder / name: reason for name, (_, reason) in files.items()}


def add_odd_images(folder: Path, label: int, n_classes: int, prefix: str = "") -> list[Path]:
    """Readable images that are not plain RGB JPEGs: greyscale and CMYK JPEG, RGB and RGBA PNG (all kept)."""
    folder.mkdir(parents=True, exist_ok=True)
    arr = class_image(label, n_classes, (36, 44), np.random.default_rng(2))
    files = {
        f"{prefix}grey.jpg": _encoded(arr, "JPEG", "L"),
        f"{prefix}cmyk.jpg": _encoded(arr, "JPEG", "CMYK"),
        f"{prefix}plain.png": _encoded(arr, "PNG"),
        f"{prefix}alpha.png": _encoded(arr, "PNG", "RGBA"),
    }
    for name, content in files.items():
        (folder / name).write_bytes(content)
    return [folder / name for name in files]


@pytest.fixture
def cifar_tree(tmp_path: Path) -> Path:
    """`root/{train,test}/<class>/*` with 12 train and 4 test images per class, PNG and JPEG."""
    root = tmp_path / "cifar10-jpg"
    rng = np.random.default_rng(0)
    for split, n in (("train", 12), ("test", 4)):
        for c, name in enumerate(CIFAR10_CLASSES):
            for i in range(n):
                ext = ".png" if i % 3 == 0 else ".jpg"
                write_image(root / split / name / f"{i:04d}{ext}", class_image(c, 10, (32, 32), rng))
    add_corrupt_files(root / "train" / "cat")
    return root


def write_cifar_batches(root: Path, n_train: int = 100, n_test: int = 20) -> Path:
    """torchvision's `cifar-10-batches-py` pickles with synthetic pixels."""
    d = root / "cifar-10-batches-py"
    d.mkdir(parents=True)
    rng = np.random.default_rng(0)

    def batch(n: int) -> dict:
        labels = [i % 10 for i in range(n)]
        data = np.stack([class_image(c, 10, (32, 32), rng).transpose(2, 0, 1).reshape(-1) for c in labels])
        return {"data": data, "labels": labels}

    for i in range(1, 6):
        with open(d / f"data_batch_{i}", "wb") as f:
            pickle.dump(batch(n_train // 5), f)
    with open(d / "test_batch", "wb") as f:
        pickle.dump(batch(n_test), f)
    with open(d / "batches.meta", "wb") as f:
        pickle.dump({"label_names": CIFAR10_CLASSES}, f)
    return d


@pytest.fixture
def kaggle_flat(tmp_path: Path) -> Path:
    """Kaggle's `dogs-vs-cats/train/{cat,dog}.N.jpg`, photos of assorted sizes, plus corrupt files."""
    root = tmp_path / "dogs-vs-cats"
    rng = np.random.default_rng(0)
    for label, name in enumerate(("cat", "dog")):
        for i in range(30):
            size = (int(rng.integers(40, 90)), int(rng.integers(40, 90)))
            write_image(root / "train" / f"{name}.{i}.jpg", class_image(label, 2, size, rng))
    add_corrupt_files(root / "train", prefix="cat.")
    (root / "test1").mkdir()
    write_image(root / "test1" / "1.jpg", class_image(0, 2, (50, 50), rng))  # Kaggle's unlabelled test set
    return root


def write_petimages(root: Path, n: int = 20) -> Path:
    """Microsoft's `PetImages/{Cat,Dog}/N.jpg`, with the kinds of broken files the real archive has."""
    rng = np.random.default_rng(0)
    for label, name in enumerate(("Cat", "Dog")):
        for i in range(n):
            size = (int(rng.integers(60, 160)), int(rng.integers(60, 160)))
            arr = class_image(label, 2, size, rng)
            if i == 1:  # a greyscale photo (kept) and (below) a PNG named .jpg (skipped: content/name mismatch)
                (root / "PetImages" / name).mkdir(parents=True, exist_ok=True)
                Image.fromarray(arr).convert("L").save(root / "PetImages" / name / f"{i}.jpg", format="JPEG")
            elif i == 2:
                write_image(root / "PetImages" / name / f"{i}.jpg", arr, fmt="PNG")
            else:
                write_image(root / "PetImages" / name / f"{i}.jpg", arr)
    add_corrupt_files(root / "PetImages" / "Dog")
    return root / "PetImages"


def tar_gz(src_dir: Path, archive: Path) -> Path:
    with tarfile.open(archive, "w:gz") as tf:
        tf.add(src_dir, arcname=src_dir.name)
    return archive


def zip_dir(src_dir: Path, archive: Path) -> Path:
    with zipfile.ZipFile(archive, "w") as zf:
        for p in sorted(src_dir.rglob("*")):
            zf.write(p, p.relative_to(src_dir.parent))
    return archive


REGISTERED_MODEL = "cnnclf-smoke"  # --register-model of the shared smoke sweep


@pytest.fixture(scope="session")
def smoke_sweep(tmp_path_factory):
    """One real smoke sweep (Ray Tune, Optuna, MLflow on the default SQLite store, ./mlflow.db in its
    working directory) with --register-model, shared by the tests of what it leaves in MLflow
    (tests/test_tracking.py, tests/test_logged_model.py, tests/test_mlflow_ui.py): one sweep, not three."""
    import os
    import subprocess
    import sys
    from types import SimpleNamespace

    tmp = tmp_path_factory.mktemp("smoke_sweep")
    data = write_cifar_folders(tmp / "cifar", 16, 4)
    root = Path(__file__).resolve().parents[1]
    # --num-samples and --subset beside --smoke-test: flags given are kept (tests/test_answer.py)
    args = ["--smoke-test", "--num-samples", "3", "--subset", "120", "--data-dir", data, "--no-download"]
    args += ["--name", "smoke", "--out", tmp / "out"]
    args += ["--storage-path", tmp / "ray_results", "--register-model", REGISTERED_MODEL]
    r = subprocess.run(
        [sys.executable, str(root / "sweeps" / "cifar10.py"), *map(str, args)],
        capture_output=True,
        text=True,
        timeout=420,
        cwd=tmp,
        env={**os.environ, "PYTHONUNBUFFERED": "1"},
    )
    assert r.returncode == 0, r.stderr[-3000:]
    return SimpleNamespace(tmp=tmp, data=data, result=r, uri=f"sqlite:///{tmp / 'mlflow.db'}", name="smoke")


@pytest.fixture(scope="session")
def budget_sweep(tmp_path_factory):
    """One real time-budget sweep whose first measured search trial is slowed down (a `probe` fault: 3 s
    more than its steps took) past a 0.02-minute limit, so the cost guard stops it as too_slow; shared by
    tests/test_time_budget.py (what the guard leaves) and tests/test_sweep_knowledge.py (a later sweep
    warm-started from it; then extending it, which those asserts allow for)."""
    import json
    import os
    import subprocess
    import sys
    from types import SimpleNamespace

    tmp = tmp_path_factory.mktemp("budget_sweep")
    data = write_cifar_folders(tmp / "cifar", 16, 4)
    root = Path(__file__).resolve().parents[1]
    flags = ["--data-dir", data, "--no-download", "--seed", "1", "--max-epochs", "1", "--confirm", "0"]
    flags += ["--max-concurrent", "1", "--fix", "width=8", "--fix", "depth=2", "--max-trial-minutes", "0.02"]
    flags += ["--tracking-uri", f"sqlite:///{tmp / 'mlflow.db'}", "--storage-path", tmp / "ray", "--out", tmp / "out"]
    fault = [{"kind": "sleep", "at": "probe", "seconds": 3, "match": {"role": "trial"}, "once": str(tmp / "slowed")}]
    r = subprocess.run(
        [sys.executable, str(root / "sweeps" / "cifar10.py"), *map(str, flags), "--num-samples", "3", "--name", "t"],
        capture_output=True,
        text=True,
        timeout=420,
        cwd=tmp,
        env={**os.environ, "PYTHONUNBUFFERED": "1", "CNNCLF_FAULTS": json.dumps(fault)},
    )
    assert r.returncode == 0, r.stderr[-3000:]
    return SimpleNamespace(tmp=tmp, data=data, result=r, flags=[str(f) for f in flags], name="t")
