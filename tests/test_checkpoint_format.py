"""A checkpoint's format is checked on load: a newer or unknown one is refused in one line (CheckpointError;
exit 2 through the CLI; a sweep trial trains without it), and format 1 (with Python's unused `random` state), or
one from before the format was recorded, still loads and resumes to the uninterrupted run's result."""

from __future__ import annotations

import json
import random
import subprocess
import sys

import pytest

from cnnclf.checkpoint import CHECKPOINT_FORMAT, CheckpointError, load_checkpoint, load_model, save_checkpoint
from cnnclf.train import train
from tests.test_train import small_cfg, synthetic

CFG = small_cfg(epochs=2, schedule="cosine", augment="crop-flip")


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """(the data, an uninterrupted 2-epoch run's result, the checkpoint of its first epoch)."""
    data = synthetic(n_train=96, n_eval=32)
    ckpt = tmp_path_factory.mktemp("ckpt") / "epoch1.pt"
    full = train(CFG, data, lambda e, m, save: save(ckpt) if e == 1 else None, device="cpu")
    return data, full, ckpt


def rewritten(ckpt, path, **changes) -> dict:
    state = {**load_checkpoint(ckpt), **changes}
    state = {k: v for k, v in state.items() if v is not None}
    save_checkpoint(state, path)
    return state


def test_a_checkpoint_records_its_format_and_no_python_random_state(runs):
    state = load_checkpoint(runs[2])
    assert state["format"] == CHECKPOINT_FORMAT == 2 and set(state["rng"]) == {"torch"}


@pytest.mark.parametrize("fmt", [3, 99, 0, "2", 2.0, True, [1, 2]])
def test_an_unknown_or_newer_format_is_refused_in_one_line(runs, tmp_path, fmt):
    data, _, ckpt = runs
    path = tmp_path / "other.pt"
    state = rewritten(ckpt, path, format=fmt)
    newer = type(fmt) is int and fmt > CHECKPOINT_FORMAT
    why = f"format {fmt}, newer than this cnnclf reads" if newer else "is not a cnnclf checkpoint"
    for load in (load_checkpoint, load_model, lambda p: train(CFG, data, device="cpu", resume=p)):
        with pytest.raises(CheckpointError, match=why) as e:
            load(path)
        assert str(path) in str(e.value) and "\n" not in str(e.value)
    with pytest.raises(CheckpointError, match="format"):  # a state handed over as a dict is checked too
        train(CFG, data, device="cpu", resume=state)


def test_train_resume_of_a_newer_format_exits_2_with_one_line(runs, tmp_path):
    path = tmp_path / "newer.pt"
    rewritten(runs[2], path, format=CHECKPOINT_FORMAT + 1)
    args = ["train", "--task", "cifar10", "--data-dir", tmp_path / "none", "--no-download", "--resume", path]
    r = subprocess.run(
        [sys.executable, "-m", "cnnclf", *map(str, args)],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert r.returncode == 2, r.stderr
    (line,) = r.stderr.strip().splitlines()
    assert line.startswith("cnnclf: error: argument --resume: ") and str(path) in line
    assert f"format {CHECKPOINT_FORMAT + 1}" in line


@pytest.mark.parametrize("old", ["format 1", "no format"])
def test_an_older_checkpoint_still_resumes_to_the_same_result(runs, tmp_path, old):
    data, full, ckpt = runs
    version, internal, gauss = random.getstate()  # as format 1 stored it: lists, for weights_only
    state = load_checkpoint(ckpt)
    rng = {**state["rng"], "python": [version, list(internal), gauss]}
    path = tmp_path / "old.pt"
    rewritten(ckpt, path, rng=rng, format=1 if old == "format 1" else None)
    assert ("format" in load_checkpoint(path)) == (old == "format 1")
    resumed = train(CFG, data, device="cpu", resume=path)
    assert resumed["epochs"] == 2
    for k in ("train/loss", "val/loss", "val/acc", "test/acc"):
        assert resumed[k] == pytest.approx(full[k], rel=1e-5, abs=1e-6), k


def test_a_sweep_trial_trains_without_a_checkpoint_of_a_newer_format(runs, tmp_path, capsys):
    from sweeps.trainable import CHECKPOINT_FILE, METRICS_FILE, read_checkpoint

    folder = tmp_path / "checkpoint_000001"
    folder.mkdir()
    rewritten(runs[2], folder / CHECKPOINT_FILE, format=CHECKPOINT_FORMAT + 1)
    (folder / METRICS_FILE).write_text(json.dumps({"epoch": 1, "val/acc": 0.5}))
    assert read_checkpoint(folder) is None
    assert "ignoring checkpoint" in capsys.readouterr().err
