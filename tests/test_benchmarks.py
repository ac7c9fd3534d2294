"""benchmarks/gpu.py: its --quick path on the CPU (the code the device runs), and the sweep facts it assumes;
benchmarks/cpu_sweeps.py: its memory sampling and its verdict."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from benchmarks.gpu import ASHA, CATDOG_TRIAL, CIFAR10_TRIAL, CONFIRM, SWEEPS, asha_expected_epochs
from cnnclf.config import PRESETS
from tests.conftest import write_catdog_flat, write_cifar_folders
from tests.test_gpu import run_without_heavy


def test_asha_expected_epochs():
    # rungs 1, 3, 9: 2/3 stop after 1 epoch, 2/9 after 3, 2/27 after 9, 1/27 train all max_t
    assert asha_expected_epochs(10) == pytest.approx(2 / 3 + 2 / 9 * 3 + 2 / 27 * 9 + 10 / 27)
    assert asha_expected_epochs(15) == pytest.approx(2 / 3 + 2 / 9 * 3 + 2 / 27 * 9 + 15 / 27)
    assert asha_expected_epochs(1) == 1.0 and asha_expected_epochs(3) == pytest.approx(2 / 3 + 3 / 3)


def test_projection_assumes_what_the_sweeps_do():
    """benchmarks/gpu.py cannot import sweeps/ on the device (Ray); its copies must agree with them."""
    from sweeps.catdog import SPEC as CATDOG
    from sweeps.cifar10 import SPEC as CIFAR10
    from sweeps.cli import build_parser, settings

    assert CIFAR10.base == CIFAR10_TRIAL and CATDOG.base == CATDOG_TRIAL
    for spec in (CIFAR10, CATDOG):
        sweep = SWEEPS[spec.task]
        assert sweep["max_t"] == spec.default_max_epochs and PRESETS[sweep["baseline"]] == spec.baseline
        args = build_parser(spec).parse_args([])
        s = settings(spec, args)[0]  # the confirmation's defaults scale with --num-samples: 40 is gpu.py's
        assert (s.confirm, s.confirm_top) == (CONFIRM["confirm"], CONFIRM["confirm_top"])
        assert args.grace_period == ASHA["grace_period"] and s.num_samples == 40


@pytest.mark.slow
def test_quick_benchmark_runs_on_the_cpu_without_ray_optuna_or_mlflow(tmp_path: Path):
    data = tmp_path / "data"
    write_cifar_folders(data / "cifar10-jpg", n_train=30, n_test=8)
    write_catdog_flat(data / "catdog", n=150, size=(48, 40))
    out = tmp_path / "gpu.json"
    r = run_without_heavy(
        "benchmarks.gpu", "--device", "cpu", "--quick", "--data-dir", str(data), "--json", str(out), timeout=900
    )
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    got = json.loads(out.read_text())
    rows = {(t["row"], t["mode"]) for t in got["throughput"]}
    assert {("tutorial b4", "eager"), ("catdog-strong", "eager"), ("tutorial b128", "default")} <= rows
    compiled = next(t for t in got["throughput"] if t["mode"] == "default")
    assert compiled["compile_s"] > 0 and compiled["img_s"] > 0
    assert [p["processes"] for p in got["packing"]] == [1, 2] and all(p["ok"] == p["processes"] for p in got["packing"])
    assert [a["preset"] for a in got["accuracy"]] == ["cifar10-strong", "catdog-strong"]
    assert got["projection"] and all(p["label"] == "PROJECTION, not a measurement" for p in got["projection"])
    assert got["skipped"] == []
    for title in ("throughput:", "packing:", "time to accuracy", "PROJECTION (not measured)"):
        assert title in r.stdout, title

    # A rerun of some sections keeps the others' results.
    args = ("--device", "cpu", "--quick", "--data-dir", str(data), "--json", str(out))
    r = run_without_heavy("benchmarks.gpu", *args, "--sections", "projection", "--merge", "--budget-s", "0")
    assert r.returncode == 0, r.stderr[-3000:]
    again = json.loads(out.read_text())
    assert again["throughput"] == got["throughput"] and again["packing"] == got["packing"]
    assert again["projection"] == got["projection"]  # the same inputs: the same projection


def test_cpu_sweeps_measures_the_process_tree_and_judges_against_the_targets():
    import subprocess
    import sys

    from benchmarks.cpu_sweeps import lines, pss_bytes, tree

    child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(30)"])
    try:
        found = tree(os.getpid())
        assert os.getpid() in found and child.pid in found  # a child (Ray's services, its workers) counts
        assert pss_bytes(os.getpid()) > 10 * 2**20 and pss_bytes(child.pid) > 0
    finally:
        child.kill()
        child.wait()
    out = {"task": "catdog", "exit": 0, "wall_min": 55.0, "first_beaten_on_val_min": {}, "outcomes": {}}
    out |= {"peak_tree_gb": 3.0, "peak_used_gb": 3.2}
    rec = {"trial": "t1", "selected_by": "confirmation", "config": {}}
    good = out | {"recommended": rec | {"test": {"mean": 0.91, "ci95": [0.89, 0.93], "text": "91%"}}}
    assert lines(good)[-1] == "  targets met"
    wide = out | {"recommended": rec | {"test": {"mean": 0.91, "ci95": [0.87, 0.95], "text": "91%"}}}
    assert lines(wide)[-1] == "  targets missed"  # its interval reaches below 88%
    assert lines(good | {"wall_min": 61.0})[-1] == "  targets missed"
