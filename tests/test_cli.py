"""The CLI as a user runs it: real subprocesses, exit codes, one-line errors, --json output."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
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


# --- --save and --resume: a killed run loses at most one epoch ---------------------------------


def _train(root: Path, *args) -> list[str]:
    return ["train", "--task", "cifar10", "--data-dir", root, "--no-download", *SMALL, "--lr", "0.005", *args]


def test_save_is_written_every_epoch_and_a_killed_run_resumes_to_the_same_result(trained, tmp_path):
    import signal

    from cnnclf.train import load_checkpoint

    root, _, _, _ = trained
    full = cli(*_train(root, "--epochs", "6", "--batch-size", "8", "--json"))
    assert full.returncode == 0, full.stderr
    ckpt = tmp_path / "cut.pt"
    p = subprocess.Popen(
        [sys.executable, "-m", "cnnclf", *map(str, _train(root, "--epochs", "6", "--batch-size", "8", "--save", ckpt))],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    deadline = time.monotonic() + 240
    while not ckpt.exists() and p.poll() is None and time.monotonic() < deadline:
        time.sleep(0.05)
    p.send_signal(signal.SIGKILL)  # as a kill or a lost machine would: no handler runs
    p.wait()
    cut = load_checkpoint(ckpt)["epoch"]
    assert 1 <= cut < 6  # the first epoch's checkpoint was there before the run ended
    r = cli(*_train(root, "--epochs", "6", "--batch-size", "8", "--resume", ckpt, "--save", ckpt, "--json"))
    assert r.returncode == 0, r.stderr
    resumed, uninterrupted = json.loads(r.stdout.splitlines()[-1]), json.loads(full.stdout.splitlines()[-1])
    assert resumed["epochs"] == 6 and load_checkpoint(ckpt)["epoch"] == 6
    for k in ("val/acc", "test/acc", "test/acc/cat", "train/loss"):
        assert resumed[k] == pytest.approx(uninterrupted[k], rel=1e-5, abs=1e-6), k


def test_resume_with_more_epochs_trains_on(trained, tmp_path):
    root, ckpt, first, _ = trained
    more = tmp_path / "more.pt"
    r = cli(*_train(root, "--epochs", "4", "--resume", ckpt, "--save", more, "--json"))
    assert r.returncode == 0, r.stderr
    out = json.loads(r.stdout.splitlines()[-1])
    assert out["epochs"] == 4 and out["config"]["epochs"] == 4
    assert out["seconds"] > json.loads(first.stdout.splitlines()[-1])["seconds"]  # the first 3 epochs' time counts
    fewer = cli(*_train(root, "--epochs", "2", "--resume", ckpt))
    assert fewer.returncode == 2 and "beyond --epochs 2" in fewer.stderr
    other = cli(*_train(root, "--epochs", "3", "--resume", ckpt, "--width", "16"))
    assert other.returncode == 2 and "width" in other.stderr.strip().splitlines()[-1]


def test_resume_of_a_finished_checkpoint_says_so_and_still_writes_save_and_json(trained, tmp_path):
    root, ckpt, first, _ = trained
    copy = tmp_path / "copy.pt"
    r = cli(*_train(root, "--epochs", "3", "--resume", ckpt, "--save", copy, "--json"))
    assert r.returncode == 0, r.stderr
    assert f"{ckpt}: already trained 3 epochs; nothing left to train" in r.stderr.splitlines()
    out, before = json.loads(r.stdout.splitlines()[-1]), json.loads(first.stdout.splitlines()[-1])
    assert out["epochs"] == 3 and out["test/acc"] == before["test/acc"] and out["val/acc"] == before["val/acc"]
    assert out["throughput/train_img_s"] == before["throughput/train_img_s"]
    assert copy.read_bytes() and copy.stat().st_size > 0


def test_prepare_prune_removes_the_caches_of_files_that_changed(tmp_path):
    from tests.conftest import write_cifar_folders

    root = write_cifar_folders(tmp_path / "cifar", 3, 1)
    assert cli("prepare", "--task", "cifar10", "--data-dir", root, "--no-download").returncode == 0
    (root / "train" / "dog" / "0.png").unlink()  # the file list changes: the first cache matches nothing now
    assert cli("prepare", "--task", "cifar10", "--data-dir", root, "--no-download").returncode == 0
    caches = sorted((root / ".cnnclf-cache").glob("cifar10-32px-*.pt"))
    assert len(caches) == 2
    r = cli("prepare", "--task", "cifar10", "--data-dir", root, "--prune")
    assert r.returncode == 0, r.stderr
    gone = [Path(line) for line in r.stdout.splitlines()]
    assert len([p for p in gone if p.suffix == ".pt"]) == 1 and "removed 2 stale cache files" in r.stderr
    assert len(list((root / ".cnnclf-cache").glob("cifar10-32px-*.pt"))) == 1 and not any(p.exists() for p in gone)
    missing = cli("prepare", "--task", "catdog", "--data-dir", tmp_path / "none", "--prune")
    assert missing.returncode == 2 and str(tmp_path / "none") in missing.stderr
