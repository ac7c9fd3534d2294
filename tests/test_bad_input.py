"""Bad flags and paths: every invalid value of every CLI exits 2 with one line on stderr naming the
flag or file, and writes nothing, neither to MLflow nor to the working directory (no mlflow.db,
ray_results, mlruns or data/).

Each case runs in an empty working directory that must still be empty afterwards. Most run
in-process (a CLI's `main(argv)`: no torch import per case); a representative subset runs as real
subprocesses, as a user types them. Sweep cases run `sweeps.cli.main` with `sweeps.driver.run_sweep` replaced
by a tripwire, so a value the sweep fails to refuse is caught before Ray starts, in milliseconds.
"""

from __future__ import annotations

import contextlib
import hashlib
import importlib
import os
import signal
import sqlite3
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from cnnclf.data import CIFAR10_CLASSES
from tests.conftest import add_bad_files, write_catdog_flat, write_cifar_folders

ROOT = Path(__file__).resolve().parents[1]
PREFIX = {"cnnclf": "cnnclf: error: ", "reports": "reports: error: ", "cifar10": "cifar10 sweep: error: "}
PREFIX["catdog"] = "catdog sweep: error: "
# Downloads go nowhere: a case that wrongly reaches one fails fast instead of fetching 160 MB.
NO_NETWORK = {
    "CNNCLF_CIFAR10_URL": "http://127.0.0.1:9/cifar-10-python.tar.gz",
    "CNNCLF_CATDOG_URL": "http://127.0.0.1:9/kagglecatsanddogs_5340.zip",
}


@pytest.fixture(scope="module")
def inputs(tmp_path_factory) -> dict[str, str]:
    """Valid and invalid things to point the CLIs at, all outside the cases' working directories."""
    root = tmp_path_factory.mktemp("inputs")
    rng = np.random.default_rng(0)
    data = write_cifar_folders(root / "cifar", 10, 2, rng)
    catdog = write_catdog_flat(root / "dogs-vs-cats", 10, (48, 48), rng)
    broken = root / "broken"  # the CIFAR-10 layout with nothing readable in it
    for split in ("train", "test"):
        for name in CIFAR10_CLASSES:
            (broken / split / name).mkdir(parents=True)
            (broken / split / name / "0.jpg").write_bytes(b"")
    bad = add_bad_files(root / "bad")
    text = root / "notes.txt"
    text.write_text("not a checkpoint, not an image, not a folder\n")
    with contextlib.closing(sqlite3.connect(root / "other.db")) as db:  # some other program's database
        db.execute("CREATE TABLE notes (text TEXT)")
        db.commit()
    ckpt = root / "model.pt"  # a real one: predict and --resume get past the checkpoint to the case's mistake
    from cnnclf.__main__ import main

    argv = ["train", "--task", "cifar10", "--data-dir", str(data), "--no-download", "--epochs", "1"]
    assert main([*argv, "--save", str(ckpt)]) == 0
    return {
        "DATA": str(data),
        "CD": str(catdog),
        "BROKEN": str(broken),
        "FILE": str(text),
        "OTHERDB": str(root / "other.db"),
        "EMPTY": "",
        "DIR": str(root),
        "MISSING": str(root / "missing"),
        "CKPT": str(ckpt),
        "TRUNCATED": str(next(p for p, r in bad.items() if r == "truncated image")),
    }


@pytest.fixture(scope="module")
def store(tmp_path_factory) -> Path:
    """An MLflow SQLite store holding one cifar10 sweep (a parent run tagged as sweeps/callbacks.py does)."""
    from mlflow.tracking import MlflowClient

    db = tmp_path_factory.mktemp("mlflow") / "mlflow.db"
    c = MlflowClient(f"sqlite:///{db}")
    exp = c.create_experiment("cifar10", artifact_location=(db.parent / "artifacts").as_uri())
    run = c.create_run(exp, run_name="cifar10-a", tags={"sweep": "cifar10-a", "role": "sweep", "status": "completed"})
    c.set_terminated(run.info.run_id)
    return db


TRAIN = "train --task cifar10 --data-dir {DATA} --no-download"
PREDICT = "predict --checkpoint {CKPT}"
CIFAR_SWEEP = "--data-dir {DATA} --no-download --smoke-test"
CATDOG_SWEEP = "--data-dir {CD} --no-download --smoke-test"

# (cli, arguments, what the one line must name). Arguments are split on spaces, then {NAMES} are
# filled in from the inputs ({EMPTY}: an empty argument).
CASES = [
    ("cnnclf", f"{TRAIN} --bogus", "--bogus"),
    ("cnnclf", "frobnicate", "frobnicate"),
    ("cnnclf", "", "command"),
    ("cnnclf", "train --data-dir {DATA}", "--task"),
    ("cnnclf", "train --task mnist", "--task"),
    ("cnnclf", f"{TRAIN} --epochs abc", "--epochs"),
    ("cnnclf", f"{TRAIN} --epochs 0", "--epochs"),
    ("cnnclf", f"{TRAIN} --epochs -3", "--epochs"),
    ("cnnclf", f"{TRAIN} --epochs 2.5", "--epochs"),
    ("cnnclf", f"{TRAIN} --batch-size 0", "--batch-size"),
    ("cnnclf", f"{TRAIN} --batch-size many", "--batch-size"),
    ("cnnclf", f"{TRAIN} --lr abc", "--lr"),
    ("cnnclf", f"{TRAIN} --lr 0", "--lr"),
    ("cnnclf", f"{TRAIN} --lr -0.1", "--lr"),
    ("cnnclf", f"{TRAIN} --lr nan", "--lr"),
    ("cnnclf", f"{TRAIN} --lr inf", "--lr"),
    ("cnnclf", f"{TRAIN} --lr -inf", "--lr"),
    ("cnnclf", f"{TRAIN} --lr 1e9", "--lr"),
    ("cnnclf", f"{TRAIN} --momentum nan", "--momentum"),
    ("cnnclf", f"{TRAIN} --momentum 1.5", "--momentum"),
    ("cnnclf", f"{TRAIN} --momentum -0.1", "--momentum"),
    ("cnnclf", f"{TRAIN} --weight-decay inf", "--weight-decay"),
    ("cnnclf", f"{TRAIN} --weight-decay -1", "--weight-decay"),
    ("cnnclf", f"{TRAIN} --warmup-epochs inf", "--warmup-epochs"),
    ("cnnclf", f"{TRAIN} --warmup-epochs nan", "--warmup-epochs"),
    ("cnnclf", f"{TRAIN} --label-smoothing 1", "--label-smoothing"),
    ("cnnclf", f"{TRAIN} --subset 0", "--subset"),
    ("cnnclf", f"{TRAIN} --subset 1", "--subset"),
    ("cnnclf", f"{TRAIN} --subset half", "--subset"),
    ("cnnclf", f"{TRAIN} --width 0", "--width"),
    ("cnnclf", f"{TRAIN} --width 100000", "--width"),
    ("cnnclf", f"{TRAIN} --depth 0", "--depth"),
    ("cnnclf", f"{TRAIN} --depth 11", "--depth"),
    ("cnnclf", f"{TRAIN} --kernel-size 4", "--kernel-size"),
    ("cnnclf", f"{TRAIN} --image-size 0", "--image-size"),
    ("cnnclf", f"{TRAIN} --image-size 4", "--image-size"),
    ("cnnclf", f"{TRAIN} --image-size 4096", "--image-size"),
    ("cnnclf", f"{TRAIN} --model tutorial --image-size 64", "--image-size"),
    ("cnnclf", f"{TRAIN} --seed one", "--seed"),
    ("cnnclf", f"{TRAIN} --seed -1", "--seed"),  # a traceback, exit 1, before seeds were checked
    ("cnnclf", f"{TRAIN} --seed {2**70}", "--seed"),
    ("cnnclf", f"{TRAIN} --split-seed -1", "--split-seed"),
    ("cnnclf", f"{TRAIN} --model resnet", "--model"),
    ("cnnclf", f"{TRAIN} --optimizer lbfgs", "--optimizer"),
    ("cnnclf", f"{TRAIN} --optimizer sgd --amsgrad", "--amsgrad"),
    ("cnnclf", f"{TRAIN} --schedule step", "--schedule"),
    ("cnnclf", f"{TRAIN} --augment mixup", "--augment"),
    ("cnnclf", f"{TRAIN} --normalize zca", "--normalize"),
    ("cnnclf", f"{TRAIN} --device tpu", "--device"),
    ("cnnclf", f"{TRAIN} --preset nope", "--preset"),
    ("cnnclf", f"{TRAIN} --preset catdog-seed", "--preset"),
    ("cnnclf", "train --task cifar10 --data-dir {MISSING} --no-download", "{MISSING}"),
    ("cnnclf", "train --task catdog --data-dir {MISSING} --no-download", "{MISSING}"),
    ("cnnclf", "train --task cifar10 --data-dir {FILE}", "{FILE}"),
    ("cnnclf", "train --task cifar10 --data-dir {FILE}/below", "{FILE}"),
    ("cnnclf", "train --task cifar10 --data-dir {BROKEN} --no-download", "{BROKEN}"),
    ("cnnclf", "train --task cifar10 --data-dir data", "network"),  # a download that fails leaves no data/
    ("cnnclf", "train --task cifar10 --data-dir {EMPTY}", "--data-dir"),
    ("cnnclf", f"{TRAIN} --resume {{MISSING}}.pt", "--resume"),
    ("cnnclf", f"{TRAIN} --resume {{FILE}}", "--resume"),
    ("cnnclf", f"{TRAIN} --resume {{DIR}}", "--resume"),
    ("cnnclf", f"{TRAIN} --resume {{CKPT}} --width 16", "--resume"),  # another config: only --epochs may grow
    ("cnnclf", f"{TRAIN} --save {{DIR}}", "--save"),
    ("cnnclf", f"{TRAIN} --save {{FILE}}/model.pt", "--save"),
    ("cnnclf", f"{TRAIN} --save {{EMPTY}}", "--save"),
    ("cnnclf", "predict --checkpoint {MISSING}.pt {FILE}", "--checkpoint"),
    ("cnnclf", "predict --checkpoint {FILE} {TRUNCATED}", "--checkpoint"),
    ("cnnclf", "predict --checkpoint {DIR} {TRUNCATED}", "--checkpoint"),
    ("cnnclf", f"{PREDICT} {{MISSING}}.jpg", "{MISSING}.jpg"),
    ("cnnclf", f"{PREDICT} {{FILE}}", "{FILE}"),
    ("cnnclf", f"{PREDICT} {{TRUNCATED}}", "{TRUNCATED}"),
    ("cnnclf", f"{PREDICT} {{DIR}}", "{DIR}"),
    ("cnnclf", PREDICT, "images"),
    ("cnnclf", f"{PREDICT} {{EMPTY}}", "images"),
    ("cnnclf", f"{PREDICT} {{TRUNCATED}} --device tpu", "--device"),
    ("cnnclf", "predict {TRUNCATED}", "--checkpoint"),
    ("cnnclf", "prepare --task mnist", "--task"),
    ("cnnclf", "prepare --task cifar10 --data-dir {DATA} --image-size 4", "--image-size"),
    ("cnnclf", "prepare --task cifar10 --data-dir {DATA} --image-size x", "--image-size"),
    ("cnnclf", "prepare --task catdog --data-dir {FILE}", "{FILE}"),
    ("cnnclf", "prepare --task catdog --data-dir {MISSING} --no-download", "{MISSING}"),
    ("reports", "--bogus", "--bogus"),
    ("reports", "", "--tracking-uri"),  # no mlflow.db here: not created by reading
    ("reports", "--tracking-uri http://127.0.0.1:9", "--tracking-uri"),
    ("reports", "--tracking-uri sqlite:///{MISSING}.db", "--tracking-uri"),
    ("reports", "--tracking-uri sqlite:///{FILE}", "--tracking-uri"),
    ("reports", "--tracking-uri sqlite:///{OTHERDB}", "--tracking-uri"),  # MLflow would add its tables to it
    ("reports", "--tracking-uri {EMPTY}", "--tracking-uri"),  # MLflow would create ./mlflow.db
    ("reports", "--tracking-uri foo://bar", "--tracking-uri"),
    ("reports", "--tracking-uri {MISSING}", "--tracking-uri"),
    ("reports", "--tracking-uri {DB} --experiment mnist", "mnist"),
    ("reports", "--tracking-uri {DB} --sweep nope", "nope"),
    ("reports", "--tracking-uri {DB} --experiment cifar10 --sweep nope", "nope"),
    ("reports", "--tracking-uri {DB} --out {FILE}", "--out"),
    ("reports", "--tracking-uri {DB} --out {FILE}/reports", "--out"),
    ("reports", "--tracking-uri {DB} --out {EMPTY}", "--out"),  # would write into the working directory
    ("reports", "--tracking-uri {DB} --experiment {EMPTY}", "--experiment"),
    ("cifar10", f"{CIFAR_SWEEP} --bogus", "--bogus"),
    ("cifar10", f"{CIFAR_SWEEP} --num-samples abc", "--num-samples"),
    ("cifar10", f"{CIFAR_SWEEP} --num-samples 0", "--num-samples"),
    ("cifar10", f"{CIFAR_SWEEP} --max-epochs 0", "--max-epochs"),
    ("cifar10", f"{CIFAR_SWEEP} --grace-period 0", "--grace-period"),
    ("cifar10", f"{CIFAR_SWEEP} --budget-by money", "--budget-by"),
    ("cifar10", f"{CIFAR_SWEEP} --max-trial-minutes 0", "--max-trial-minutes"),
    ("cifar10", f"{CIFAR_SWEEP} --max-trial-minutes nan", "--max-trial-minutes"),
    ("cifar10", f"{CIFAR_SWEEP} --budget-by epochs --max-trial-minutes 5", "--max-trial-minutes"),
    ("cifar10", f"{CIFAR_SWEEP} --warm-start nope", "--warm-start"),
    ("cifar10", f"{CIFAR_SWEEP} --warm-start ../x", "--warm-start"),
    ("cifar10", f"{CIFAR_SWEEP} --gpu-hour-price -1", "--gpu-hour-price"),
    ("cifar10", f"{CIFAR_SWEEP} --gpu-hour-price inf", "--gpu-hour-price"),
    ("cifar10", f"{CIFAR_SWEEP} --scheduler pbt", "--scheduler"),
    ("cifar10", f"{CIFAR_SWEEP} --subset 1", "--subset"),
    ("cifar10", f"{CIFAR_SWEEP} --seed x", "--seed"),
    ("cifar10", f"{CIFAR_SWEEP} --seed -1", "--seed"),
    ("cifar10", f"{CIFAR_SWEEP} --seed {2**70}", "--seed"),
    ("cifar10", f"{CIFAR_SWEEP} --cpus-per-trial 4096", "--cpus-per-trial"),  # no trial could start: a hang
    ("cifar10", f"{CIFAR_SWEEP} --cpus-per-trial 1e9", "--cpus-per-trial"),  # libgomp ran out of memory
    ("cifar10", f"{CIFAR_SWEEP} --mlflow-wait inf", "--mlflow-wait"),  # never ended with the server gone
    ("cifar10", f"{CIFAR_SWEEP} --name=-x", "--name"),  # the printed resume command then failed
    ("cifar10", f"{CIFAR_SWEEP} --fix lr=nan", "--fix"),
    ("cifar10", f"{CIFAR_SWEEP} --fix lr=inf", "--fix"),
    ("cifar10", f"{CIFAR_SWEEP} --fix lr=-1", "--fix"),
    ("cifar10", f"{CIFAR_SWEEP} --fix lr", "--fix"),
    ("cifar10", f"{CIFAR_SWEEP} --fix kernel_size=4", "--fix"),
    ("cifar10", f"{CIFAR_SWEEP} --fix depth=0", "--fix"),
    ("cifar10", f"{CIFAR_SWEEP} --fix optimizer=lbfgs", "--fix"),
    ("cifar10", f"{CIFAR_SWEEP} --fix bogus=1", "--fix"),
    ("cifar10", f"{CIFAR_SWEEP} --cpus-per-trial 0", "--cpus-per-trial"),
    ("cifar10", f"{CIFAR_SWEEP} --cpus-per-trial nan", "--cpus-per-trial"),
    ("cifar10", f"{CIFAR_SWEEP} --cpus-per-trial inf", "--cpus-per-trial"),
    ("cifar10", f"{CIFAR_SWEEP} --gpus-per-trial inf", "--gpus-per-trial"),
    ("cifar10", f"{CIFAR_SWEEP} --gpus-per-trial -1", "--gpus-per-trial"),
    ("cifar10", f"{CIFAR_SWEEP} --max-concurrent 0", "--max-concurrent"),
    ("cifar10", f"{CIFAR_SWEEP} --max-failures -1", "--max-failures"),
    ("cifar10", f"{CIFAR_SWEEP} --confirm -1", "--confirm"),
    ("cifar10", f"{CIFAR_SWEEP} --name a/b", "--name"),
    ("cifar10", f"{CIFAR_SWEEP} --name ..", "--name"),  # Tune's state would go into the working directory
    ("cifar10", f"{CIFAR_SWEEP} --name .hidden", "--name"),
    ("cifar10", f"{CIFAR_SWEEP} --name {'n' * 300}", "--name"),  # longer than a file name may be
    ("cifar10", f"{CIFAR_SWEEP} --fix epochs=5 --max-epochs 2", "--fix"),  # every trial cut before its test
    ("reports", "--tracking-uri {DB} --sweep ..", "not a valid name"),  # would write outside --out
    ("reports", "--tracking-uri {DB} --sweep .", "not a valid name"),
    ("cifar10", f"{CIFAR_SWEEP} --resume", "--resume"),
    ("cifar10", f"{CIFAR_SWEEP} --resume --name nope", "--resume"),
    ("cifar10", f"{CIFAR_SWEEP} --tracking-uri http://127.0.0.1:9", "--tracking-uri"),
    ("cifar10", f"{CIFAR_SWEEP} --tracking-uri sqlite:///{{MISSING}}/mlflow.db", "--tracking-uri"),
    ("cifar10", "--data-dir {MISSING} --no-download", "{MISSING}"),
    ("cifar10", "--data-dir {FILE}", "{FILE}"),
    ("cifar10", "--data-dir {BROKEN} --no-download", "{BROKEN}"),
    ("cifar10", "--data-dir data", "network"),
    ("cifar10", f"{CIFAR_SWEEP} --storage-path {{FILE}}", "--storage-path"),
    ("cifar10", f"{CIFAR_SWEEP} --out {{FILE}}", "--out"),
    ("catdog", f"{CATDOG_SWEEP} --bogus", "--bogus"),
    ("catdog", f"{CATDOG_SWEEP} --fix image_size=4", "--fix"),
    ("catdog", f"{CATDOG_SWEEP} --fix batch_size=0", "--fix"),
    ("catdog", "--data-dir {FILE} --no-download", "{FILE}"),
    ("catdog", "--data-dir {MISSING} --no-download", "{MISSING}"),
]

# Sweep values that only a closer look refuses (the tracking store's kind, the model's fit, the
# Ray address, a GPU count): each must fail before `run_sweep`, where Ray would start, the MLflow
# parent run be opened and ray_results written (the tripwire in _run_in_process says so).
SWEEP_CASES = [
    ("cifar10", f"{CIFAR_SWEEP} --fix warmup_epochs=inf", "--fix"),
    ("cifar10", f"{CIFAR_SWEEP} --tracking-uri foo://bar", "--tracking-uri"),
    # stores that cannot work passed the check, and the sweep failed after training
    ("cifar10", f"{CIFAR_SWEEP} --tracking-uri file:{{DIR}}/mlruns", "--tracking-uri"),  # test/acc/<class>
    ("cifar10", f"{CIFAR_SWEEP} --tracking-uri mlruns", "--tracking-uri"),  # no scheme: a file store
    ("cifar10", f"{CIFAR_SWEEP} --tracking-uri postgresql://u@127.0.0.1:9/db", "--tracking-uri"),  # no driver
    ("cifar10", f"{CIFAR_SWEEP} --tracking-uri sqlite:///{{FILE}}", "--tracking-uri"),
    ("cifar10", f"{CIFAR_SWEEP} --tracking-uri sqlite:///{{OTHERDB}}", "--tracking-uri"),
    ("cifar10", f"{CIFAR_SWEEP} --experiment {{EMPTY}}", "--experiment"),
    ("cifar10", f"{CIFAR_SWEEP} --name {{EMPTY}}", "--name"),  # silently replaced by the default name
    ("cifar10", f"{CIFAR_SWEEP} --address ray://127.0.0.1:9", "--address"),
    ("cifar10", f"{CIFAR_SWEEP} --address 127.0.0.1:1 --connect-timeout 2", "--address"),  # nothing listens
    ("cifar10", f"{CIFAR_SWEEP} --fix model=resnet", "--fix"),
    ("catdog", f"{CATDOG_SWEEP} --fix model=tutorial", "--fix"),  # the tutorial net takes 32x32 only
    ("cifar10", f"{CIFAR_SWEEP} --gpus-per-trial 0.5 --ray-num-gpus 0", "--gpus-per-trial"),  # no GPU here
]

# The same kinds of mistakes through real processes, as a user types them.
SUBPROCESS_CASES = [
    ("cnnclf", f"{TRAIN} --bogus", "--bogus"),
    ("cnnclf", "frobnicate", "frobnicate"),
    ("cnnclf", f"{TRAIN} --lr nan", "--lr"),
    ("cnnclf", f"{TRAIN} --model tutorial --image-size 64", "--image-size"),
    ("cnnclf", "train --task cifar10 --data-dir {FILE}", "{FILE}"),
    ("cnnclf", "train --task cifar10 --data-dir data", "network"),
    ("cnnclf", f"{TRAIN} --resume {{FILE}}", "--resume"),
    ("cnnclf", f"{PREDICT} {{MISSING}}.jpg", "{MISSING}.jpg"),
    ("cnnclf", "prepare --task cifar10 --data-dir {DATA} --image-size 4", "--image-size"),
    ("reports", "--tracking-uri http://127.0.0.1:9", "--tracking-uri"),
    ("reports", "--tracking-uri {DB} --experiment mnist", "mnist"),
    ("reports", "--tracking-uri {DB} --out {FILE}", "--out"),
    ("reports", "--tracking-uri {EMPTY}", "--tracking-uri"),
    ("cifar10", f"{CIFAR_SWEEP} --bogus", "--bogus"),
    ("cifar10", f"{CIFAR_SWEEP} --tracking-uri http://127.0.0.1:9", "--tracking-uri"),
    ("cifar10", f"{CIFAR_SWEEP} --fix lr=nan", "--fix"),
    ("cifar10", f"{CIFAR_SWEEP} --address 127.0.0.1:1 --connect-timeout 3", "--address"),  # hung for 10+ min
    ("catdog", "--data-dir {FILE}", "{FILE}"),
]


def _id(case: tuple[str, str, str]) -> str:
    cli, args, _ = case
    return f"{cli}:{args}".replace("{", "").replace("}", "")


def _fill(case: tuple[str, str, str], inputs: dict[str, str], store: Path) -> tuple[list[str], str]:
    _, args, needle = case
    values = {**inputs, "DB": f"sqlite:///{store}"}
    return [a.format(**values) for a in args.split()], needle.format(**values)


class ReachedRay(AssertionError):
    """A sweep got past validation: Ray would start, MLflow and ray_results would be written."""


def _tripwire(*args, **kwargs):
    raise ReachedRay("sweeps.driver.run_sweep was called: the invalid value was not refused before Ray")


def _run_in_process(cli: str, argv: list[str], monkeypatch, capsys) -> tuple[int, str]:
    for k, v in NO_NETWORK.items():
        monkeypatch.setenv(k, v)
    capsys.readouterr()
    if cli == "cnnclf":
        from cnnclf.__main__ import main

        rc = main(argv)
    elif cli == "reports":
        from reports.__main__ import main

        rc = main(argv)
    else:
        import sweeps.cli
        import sweeps.driver

        monkeypatch.setattr(sweeps.driver, "run_sweep", _tripwire)
        rc = sweeps.cli.main(importlib.import_module(f"sweeps.{cli}").SPEC, argv)
    return rc, capsys.readouterr().err


def _run_subprocess(cli: str, argv: list[str], cwd: Path) -> tuple[int, str]:
    cmd = [sys.executable, *(["-m", cli] if cli in ("cnnclf", "reports") else [str(ROOT / "sweeps" / f"{cli}.py")])]
    env = {k: v for k, v in os.environ.items() if not k.startswith("MLFLOW_")} | NO_NETWORK
    # A session of its own: if a case wrongly gets as far as Ray, its workers go down with it on timeout.
    p = subprocess.Popen(
        [*cmd, *argv],
        cwd=cwd,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,
    )
    try:
        _, err = p.communicate(timeout=120)
    except subprocess.TimeoutExpired:
        p.kill()
        p.communicate()
        pytest.fail(f"{cli} {' '.join(argv)}: still running after 120 s")
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(p.pid, signal.SIGKILL)  # whatever of its session is left (Ray's daemons), nothing else
    return p.returncode, err


def _sha256(*paths: Path | str) -> list[str]:
    return [hashlib.sha256(Path(p).read_bytes()).hexdigest() for p in paths]


def _check(cli: str, rc: int, err: str, needle: str, cwd: Path) -> None:
    lines = err.strip().splitlines()
    assert rc == 2, f"exit {rc}, stderr:\n{err[-3000:]}"
    assert len(lines) == 1, f"{len(lines)} lines on stderr:\n{err[-3000:]}"
    assert lines[0].startswith(PREFIX[cli]) and needle in lines[0], lines[0]
    assert sorted(p.name for p in cwd.iterdir()) == []  # no mlflow.db, mlruns, ray_results, data/, reports/


@pytest.mark.parametrize("case", CASES, ids=_id)
def test_invalid_value_exits_2_with_one_line_and_writes_nothing(case, inputs, store, tmp_path, monkeypatch, capsys):
    argv, needle = _fill(case, inputs, store)
    dbs = _sha256(store, inputs["OTHERDB"])
    monkeypatch.chdir(tmp_path)
    rc, err = _run_in_process(case[0], argv, monkeypatch, capsys)
    _check(case[0], rc, err, needle, tmp_path)
    assert _sha256(store, inputs["OTHERDB"]) == dbs  # nothing written to a database
    assert not Path(inputs["MISSING"]).exists()


@pytest.mark.parametrize("case", SWEEP_CASES, ids=_id)
def test_sweep_values_refused_before_ray(case, inputs, store, tmp_path, monkeypatch, capsys):
    argv, needle = _fill(case, inputs, store)
    monkeypatch.chdir(tmp_path)
    rc, err = _run_in_process(case[0], argv, monkeypatch, capsys)
    _check(case[0], rc, err, needle, tmp_path)


@pytest.mark.parametrize("case", SUBPROCESS_CASES, ids=_id)
def test_invalid_value_in_a_real_process(case, inputs, store, tmp_path):
    argv, needle = _fill(case, inputs, store)
    dbs = _sha256(store, inputs["OTHERDB"])
    rc, err = _run_subprocess(case[0], argv, tmp_path)
    _check(case[0], rc, err, needle, tmp_path)
    assert _sha256(store, inputs["OTHERDB"]) == dbs
