"""The import contracts in pyproject.toml ([tool.importlinter]) hold.

`cnnclf` imports no Ray, Optuna, MLflow, sweeps or reports; `reports` pulls in no torch or Ray, directly or
through what it imports; `sweeps/` is layered from the scripts down to `sweeps.spec`, so no import cycle can
come back. CI enforces this through this test. Run by hand: `.venv/bin/lint-imports`.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


def test_import_contracts_hold():
    lint_imports = Path(sys.executable).parent / "lint-imports"  # the `test` extra's console script
    assert lint_imports.exists(), f"{lint_imports} is missing: pip install -e '.[test]'"
    proc = subprocess.run(
        [str(lint_imports), "--no-cache"],  # no .import_linter_cache/ left in the checkout
        cwd=ROOT,  # reads ROOT/pyproject.toml and analyses this checkout's packages
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 0, f"lint-imports exited {proc.returncode}:\n{proc.stdout}\n{proc.stderr}"


def test_the_sweep_never_imports_the_models_code_file_so_importing_it_has_no_side_effect():
    """sweeps/model.py hands MLflow the model as it is imported (MLflow's models from code): only MLflow runs
    it. The sweep's own modules, the task scripts and the user's `load_images` leave it alone."""
    code = (
        "import sys, sweeps.cifar10, sweeps.catdog, sweeps.logged_model; "
        "assert 'sweeps.model' not in sys.modules, 'imported'; "
        "assert 'reports.report' not in sys.modules, 'the report is loaded on its first call'"
    )
    proc = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]


@pytest.mark.parametrize(
    ("argv", "loaded"),
    [
        (["--num-samples", "0"], ()),  # a flag argparse refuses: nothing heavy at all
        (["--fix", "lr=nan"], ()),
        (["--data-dir", "{tmp}/nowhere", "--no-download"], ("torch",)),  # every check ran; the data is missing
    ],
    ids=["argparse", "fix", "data"],
)
def test_a_sweep_flag_mistake_is_answered_before_ray_or_mlflow_load(tmp_path, argv, loaded):
    """A sweep script checks every flag, its files and its data before it imports Ray, Tune and MLflow (seconds
    of imports; scipy too, which only the statistics at the end need): a mistake is answered at once. torch only
    where a check builds the model."""
    argv = [a.format(tmp=tmp_path) for a in argv]
    code = (
        "import sys; from sweeps.cli import main; from sweeps.cifar10 import SPEC\n"
        f"rc = main(SPEC, {argv!r})\n"
        "print(rc, *sorted(m for m in ('ray', 'mlflow', 'scipy', 'torch', 'sweeps.driver') if m in sys.modules))"
    )
    proc = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert proc.stdout.split() == ["2", *loaded], proc.stderr[-2000:]
    assert len(proc.stderr.strip().splitlines()) == 1 and list(tmp_path.iterdir()) == []


def test_training_loads_no_download_decode_or_cache_code():
    """`from cnnclf.data import Normalizer` (cnnclf/train.py) loads cnnclf.data.batches and splits alone: the
    package re-exports lazily. urllib, tarfile and zipfile are not asserted absent: torch imports them itself;
    the contract "training reaches no network or archive code" covers what our own code imports."""
    code = (
        "import sys, cnnclf.train, cnnclf.data\n"
        "assert cnnclf.data.Normalizer is cnnclf.data.batches.Normalizer\n"
        "print(' '.join(sorted(m for m in sys.modules if m.startswith('cnnclf.data'))))"
    )
    proc = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.split() == ["cnnclf.data", "cnnclf.data.batches", "cnnclf.data.splits"]


def test_every_public_name_of_cnnclf_data_resolves():
    import cnnclf.data

    missing = [name for name in cnnclf.data.__all__ if getattr(cnnclf.data, name, None) is None]
    assert not missing
    assert cnnclf.data.load_task.__module__ == "cnnclf.data.task"
