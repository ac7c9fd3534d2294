"""The CLI as a user runs it: real subprocesses, exit codes, one-line errors, --json output."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

SMALL = ["--model", "cnn", "--depth", "2", "--width", "8", "--batch-size", "32", "--normalize", "dataset"]


def cli(*args, env=None, cwd=None) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "cnnclf", *map(str, args)],
        capture_output=True,
        text=True,
        timeout=300,
        env={**os.environ, **(env or {})},
        cwd=cwd,
    )


@pytest.fixture(scope="module")
def trained(tmp_path_factory):

    from tests.conftest import add_bad_files, add_odd_images, write_cifar_folders

    root = tmp_path_factory.mktemp("cli") / "cifar"
    write_cifar_folders(root, 20, 5)
    bad = add_bad_files(root / "train" / "dog")  # every kind of broken file: training goes on without them
    add_odd_images(root / "train" / "dog", 5, 10)  # greyscale, CMYK, RGBA: kept
    ckpt = root.parent / "model.pt"
    r = cli(
        "train",
        "--task",
        "cifar10",
        "--data-dir",
        root,
        *SMALL,
        "--epochs",
        "3",
        "--lr",
        "0.005",
        "--no-download",
        "--save",
        ckpt,
        "--json",
    )
    return root, ckpt, r, bad


def test_train_json_last_line_and_save(trained):
    _root, ckpt, r, bad = trained
    assert r.returncode == 0, r.stderr
    out = json.loads(r.stdout.strip().splitlines()[-1])
    for key in ("val/acc", "test/acc", "test/acc/cat", "test/acc/truck", "throughput/train_img_s", "epochs", "seconds"):
        assert key in out, key
    assert out["epochs"] == 3 and out["status"] == "completed" and out["val/acc"] > 0.5
    assert out["config"]["depth"] == 2 and out["config"]["model"] == "cnn"
    assert ckpt.is_file()
    # The skipped files, counted by reason, in the JSON and in the data summary on stderr.
    data = out["data"]
    assert data["files_skipped"] == len(bad) == 11 and data["files_read"] == 250 + 4
    assert data["skipped_by_reason"] == {
        "gif content named .jpg": 1,
        "jpeg content named .png": 1,
        "not an image": 1,
        "not an image file (.txt)": 1,
        "png content named .jpg": 1,
        "system file": 2,
        "truncated image": 2,
        "webp content named .jpg": 1,
        "zero-byte file": 1,
    }
    manifest = json.loads(Path(data["manifest"]).read_text())
    assert len(manifest["skipped"]) == 11 and {s["file"] for s in manifest["skipped"]} >= {"train/dog/Thumbs.db"}
    assert "11 files skipped: 1 gif content named .jpg," in r.stderr and "2 truncated image" in r.stderr
    assert "epochs" in r.stderr  # the progress bar


def test_predict_prints_class_and_probability(trained):
    root, ckpt, _, _ = trained
    imgs = [root / "test" / "ship" / "0.png", root / "test" / "frog" / "1.png"]
    r = cli("predict", "--checkpoint", ckpt, *imgs, "--json")
    assert r.returncode == 0, r.stderr
    rows = json.loads(r.stdout)
    assert [row["image"] for row in rows] == [str(p) for p in imgs]
    assert all(0 < row["probability"] <= 1 for row in rows)
    assert [row["class"] for row in rows] == ["ship", "frog"]
    plain = cli("predict", "--checkpoint", ckpt, imgs[0])
    assert plain.returncode == 0 and plain.stdout.strip().split("\t")[1] == "ship"


def test_flags_override_the_preset(trained):
    root, _, _, _ = trained
    r = cli(
        "train",
        "--task",
        "cifar10",
        "--preset",
        "cifar10-seed-sgd",
        "--epochs",
        "1",
        "--batch-size",
        "16",
        "--data-dir",
        root,
        "--json",
    )
    assert r.returncode == 0, r.stderr
    cfg = json.loads(r.stdout.strip().splitlines()[-1])["config"]
    assert cfg["model"] == "tutorial" and cfg["optimizer"] == "sgd" and cfg["epochs"] == 1 and cfg["batch_size"] == 16


def test_diverged_run_exits_1_with_a_reason(trained):
    root, _, _, _ = trained
    r = cli(
        "train",
        "--task",
        "cifar10",
        "--model",
        "tutorial",
        "--optimizer",
        "sgd",
        "--lr",
        "50",
        "--epochs",
        "3",
        "--batch-size",
        "8",
        "--data-dir",
        root,
        "--json",
    )
    assert r.returncode == 1
    assert json.loads(r.stdout.strip().splitlines()[-1])["status"] == "diverged"
    assert "diverged at epoch 1" in r.stderr.strip().splitlines()[-1]


@pytest.mark.parametrize(
    ("args", "needle"),
    [
        (["train", "--task", "cifar10", "--lr", "abc"], "--lr"),
        (["train", "--task", "cifar10", "--lr", "-1"], "--lr"),
        (["train", "--task", "mnist"], "--task"),
        (["train", "--task", "cifar10", "--kernel-size", "4"], "--kernel-size"),
        (["train", "--task", "cifar10", "--depth", "99"], "--depth"),
        (["train", "--task", "cifar10", "--momentum", "1.5"], "--momentum"),
        (["train", "--task", "cifar10", "--preset", "catdog-seed"], "--preset"),
        (["train", "--task", "cifar10", "--preset", "nope"], "--preset"),
        (["train", "--task", "cifar10", "--optimizer", "sgd", "--amsgrad"], "--amsgrad"),
        (["train", "--task", "cifar10", "--bogus"], "--bogus"),
        (["predict", "--checkpoint", "/nonexistent.pt", "x.jpg"], "--checkpoint"),
        (["frobnicate"], "frobnicate"),
    ],
)
def test_bad_arguments_exit_2_with_one_line(args, needle, tmp_path):
    r = cli(*args, cwd=tmp_path)
    assert r.returncode == 2
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and needle in lines[0], r.stderr
    assert list(tmp_path.iterdir()) == []  # nothing written


def test_missing_data_with_no_download(tmp_path):
    r = cli("train", "--task", "catdog", "--data-dir", tmp_path / "none", "--no-download")
    assert r.returncode == 2
    (line,) = r.stderr.strip().splitlines()
    assert str(tmp_path / "none") in line and "--no-download" in line


def test_failed_download_blames_network_and_leaves_nothing(tmp_path):
    r = cli(
        "train",
        "--task",
        "cifar10",
        "--data-dir",
        tmp_path / "d",
        env={"CNNCLF_CIFAR10_URL": "http://127.0.0.1:9/cifar-10-python.tar.gz"},
    )
    assert r.returncode == 2
    assert "network is the likely cause" in r.stderr.strip().splitlines()[-1]
    assert list(tmp_path.iterdir()) == []  # not even the folder the download would have filled


def test_predict_unreadable_image_and_checkpoint(trained, tmp_path):
    _, ckpt, _, _ = trained
    bad = tmp_path / "bad.jpg"
    bad.write_bytes(b"not a jpeg")
    r = cli("predict", "--checkpoint", ckpt, bad)
    assert r.returncode == 2 and str(bad) in r.stderr and len(r.stderr.strip().splitlines()) == 1
    r = cli("predict", "--checkpoint", bad, bad)
    assert r.returncode == 2 and "not a cnnclf checkpoint" in r.stderr


def test_cuda_requested_without_cuda(trained):
    root, _, _, _ = trained
    r = cli("train", "--task", "cifar10", "--data-dir", root, "--device", "cuda", env={"CUDA_VISIBLE_DEVICES": ""})
    assert r.returncode == 2 and "--device" in r.stderr
