"""The shared sweep machinery: Ray Tune runs `cnnclf.train` trials, Optuna proposes them, MLflow records them.

`sweeps/cifar10.py` and `sweeps/catdog.py` are thin scripts that hand a `TaskSpec`
(search ranges, seed baseline, base config) to `main()`.

Data flow: the driver decodes the data once (cnnclf's cache), puts it into the Ray
object store through `tune.with_parameters`, and each trial moves it to its device
once. Trials report every epoch to Tune with a checkpoint; a driver-side Tune
callback (`MLflowCallback`) writes one parent run per sweep and one nested child run
per trial, so only the driver ever touches the tracking store.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import math
import os
import re
import shlex
import shutil
import sys
import tempfile
import time
import warnings
from dataclasses import dataclass
from pathlib import Path

from cnnclf.config import ConfigError, TrainConfig, name_error

METRIC, MODE = "val/acc", "max"
SEARCH_PARAMS = (
    "optimizer",
    "lr",
    "momentum",
    "amsgrad",
    "weight_decay",
    "batch_size",
    "depth",
    "kernel_size",
    "width",
)
METRIC_PREFIXES = ("train/", "val/", "test/", "time/", "throughput/", "resources/")
EXIT_OK, EXIT_FAILED, EXIT_USAGE, EXIT_INTERRUPTED = 0, 1, 2, 130


class UsageError(Exception):
    """Bad flags or unusable input: exit 2 with this one-line message, before Ray starts."""


@dataclass(frozen=True)
class Ranges:
    """A task's search ranges (documented in each script's docstring)."""

    lr_sgd: tuple[float, float]  # log-uniform
    lr_adam: tuple[float, float]  # log-uniform, adam and adamw
    momentum: tuple[float, float]  # uniform, sgd only
    weight_decay: tuple[float, float]  # log-uniform
    batch_size: tuple[int, ...]
    depth: tuple[int, int]  # inclusive
    kernel_size: tuple[int, ...]
    width: tuple[int, ...]


@dataclass(frozen=True)
class TaskSpec:
    task: str
    base: TrainConfig  # every search trial is base.replace(**suggested)
    baseline: TrainConfig  # the seed, re-measured in the same sweep
    ranges: Ranges
    smoke_ranges: Ranges  # --smoke-test: small nets only, so it takes about a minute on a CPU
    smoke_image_size: int
    default_max_epochs: int
    doc: str = ""


def parse_fix(items: list[str], base: TrainConfig) -> dict:
    """`--fix name=value` pairs, typed by TrainConfig's field; raises UsageError on a bad name or value."""
    types = {f.name: f.type for f in dataclasses.fields(TrainConfig)}
    allowed = sorted(set(types) - {"task", "tags", "subset", "seed"})
    fixed: dict = {}
    for item in items:
        name, sep, raw = item.partition("=")
        name = name.strip().replace("-", "_")
        if not sep or not raw:
            raise UsageError(f"argument --fix: expected name=value, got {item!r}")
        if name not in allowed:
            raise UsageError(f"argument --fix: unknown parameter {name!r}; known: {', '.join(allowed)}")
        kind = str(types[name])
        try:
            if name == "model":
                from cnnclf.models import model_names

                if raw not in model_names():
                    raise UsageError(f"argument --fix: unknown model {raw!r}; known: {', '.join(model_names())}")
            if "bool" in kind:
                if raw.lower() not in ("true", "false", "1", "0", "yes", "no"):
                    raise ValueError(raw)
                value = raw.lower() in ("true", "1", "yes")
            elif "int" in kind:
                value = int(raw)
            elif "float" in kind:
                value = float(raw)
                if not math.isfinite(value):
                    raise ValueError(raw)
            else:
                value = raw
        except ValueError:
            raise UsageError(f"argument --fix: {name}={raw!r} is not a valid {kind}") from None
        fixed[name] = value
    try:
        base.replace(**fixed)
    except ConfigError as e:
        raise UsageError(f"argument --fix: {e}") from None
    if fixed.get("optimizer") == "sgd" and "amsgrad" in fixed:
        raise UsageError("argument --fix: amsgrad only applies to adam and adamw")
    if fixed.get("optimizer") in ("adam", "adamw") and "momentum" in fixed:
        raise UsageError("argument --fix: momentum only applies to sgd")
    return fixed


META_KEYS = ("role", "confirm_of", "adopt")  # Tune config keys that are not TrainConfig fields


def trial_config(config: dict, base: TrainConfig, baseline: TrainConfig) -> TrainConfig:
    """A Tune trial's config dict -> the TrainConfig it trains (unknown keys fail loudly)."""
    params = {k: v for k, v in config.items() if k not in META_KEYS}
    return (baseline if config.get("role") == "baseline" else base).replace(**params)


# ---------------------------------------------------------------------------------------------
# The trainable: runs in a Ray worker.

CHECKPOINT_FILE, METRICS_FILE = "checkpoint.pt", "metrics.json"


def run_trial(
    config: dict,
    data: dict | None = None,
    base: TrainConfig | None = None,
    baseline: TrainConfig | None = None,
    experiment_path: str | None = None,
    faults: list | None = None,
    finished: frozenset[str] = frozenset(),
) -> None:
    import ray
    import torch
    from ray import tune

    from cnnclf.data import TaskData
    from sweeps.faults import fire

    faults = faults or []
    cfg = trial_config(config, base, baseline)
    ctx = ray.get_runtime_context()
    assigned = ctx.get_assigned_resources()
    torch.set_num_threads(max(1, int(assigned.get("CPU", 1))))
    device = "cuda" if assigned.get("GPU", 0) > 0 and torch.cuda.is_available() else "cpu"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # object-store arrays are read-only; nothing writes to them
        task_data = TaskData(**{k: torch.from_numpy(v) if hasattr(v, "dtype") else v for k, v in data.items()})
    extra = {
        "resources/gpu": float(assigned.get("GPU", 0)),
        "resources/cpu": float(assigned.get("CPU", 0)),
        "node_id": ctx.get_node_id(),
    }

    # Resume from the newest complete checkpoint: Tune's, or a newer one in this trial's folder
    # (written after Tune's last snapshot), or one of the trial this one continues (`adopt`).
    folders = [Path(d) for d in (config.get("adopt") or {}).get("dirs", [])]
    trial_id = tune.get_context().get_trial_id()
    own_folder = None
    if experiment_path and "://" not in experiment_path:
        own_folder = Path(experiment_path) / f"{config.get('role', 'trial')}-{trial_id}"
        folders.append(own_folder)
    found, tune_epoch = None, 0
    checkpoint = tune.get_checkpoint()
    if checkpoint is not None:
        with checkpoint.as_directory() as d:
            found = _read_checkpoint(Path(d))
        tune_epoch = found[1]["epoch"] if found else 0
    on_disk = _checkpoint_dirs(folders)
    for epoch in sorted((e for e in on_disk if e > tune_epoch), reverse=True):
        newer = _read_checkpoint(on_disk[epoch])
        if newer is not None:
            found = newer
            break
    resume = found[0] if found else None
    if found is not None and found[1]["epoch"] > tune_epoch:
        # Epochs that finished after the driver's last look (it went down): report them again, in
        # order, so nothing they measured is lost (the MLflow writer skips epochs it has logged);
        # the newest goes with its checkpoint, so Tune knows it from now on.
        for epoch in sorted(e for e in on_disk if tune_epoch < e < found[1]["epoch"]):
            with contextlib.suppress(OSError, ValueError):
                tune.report({**json.loads((on_disk[epoch] / METRICS_FILE).read_text()), **extra, "replayed": 1.0})
        with tempfile.TemporaryDirectory() as d:
            _write_checkpoint_dir(Path(d), resume, {**found[1], **extra})
            tune.report({**found[1], **extra, "replayed": 1.0}, checkpoint=tune.Checkpoint.from_directory(d))
    # It had ended before the driver went down (stopped by ASHA, say) though Tune's last snapshot
    # has it running: an orphan handed out again, or a trial Tune restored (`finished`, from the journal).
    ended = bool((config.get("adopt") or {}).get("ended")) or trial_id in finished
    if found is not None and (found[1]["epoch"] >= cfg.epochs or ended) and "val/acc" in found[1]:
        return  # the trial had ended before the driver went down; it is not trained twice

    def report(epoch: int, metrics: dict, save) -> None:
        m = {**metrics, **extra}
        fire(faults, "epoch_end", config, epoch)
        if m.get("diverged"):
            # The worst accuracy, not NaN: ASHA never stops a NaN trial and Optuna cannot record
            # one; with 0.0 both treat the trial as the worst, and TPE learns to avoid it.
            m[METRIC] = 0.0
            m["val/loss"] = float("inf")
            m["train/loss"] = float("inf")
        if save is None:
            tune.report(m)
            return
        with tempfile.TemporaryDirectory() as d:
            save(Path(d) / CHECKPOINT_FILE)
            fire(faults, "checkpoint", config, epoch)
            (Path(d) / METRICS_FILE).write_text(json.dumps(m))  # beside the state: replayed after a crash
            tune.report(m, checkpoint=tune.Checkpoint.from_directory(d))
        if own_folder is not None:
            prune_checkpoints(own_folder)

    failure = train_or_oom(cfg, task_data, report, device=device, resume=resume)
    if failure is not None:
        tune.report({"epoch": 0, METRIC: 0.0, **failure, **extra})


def train_or_oom(cfg: TrainConfig, data, report, device: str, resume=None) -> dict | None:
    """`cnnclf.train.train`, with running out of device memory turned into a recorded failure.

    Out of memory is a property of the configuration (batch, width), not bad luck: retrying
    cannot help. The trial's tensors are freed (they live in train()'s frame, gone once the
    exception is caught) and the allocator's cache emptied, so that later trials get the memory;
    the result is the worst score for Optuna, so TPE learns. Returns None when training ran.
    """
    import gc

    import torch

    from cnnclf.train import train

    try:
        train(cfg, data, report, device=device, resume=resume)
        return None
    except torch.OutOfMemoryError as e:
        message = str(e).splitlines()[0][:300] if str(e) else "out of memory"
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
    allocated = torch.cuda.memory_allocated() / 2**20 if torch.cuda.is_available() else 0.0
    return {"failure": "oom", "error": f"torch.OutOfMemoryError: {message}", "resources/gpu_mem_after_mb": allocated}


KEEP_RECENT_S = 300.0  # well beyond Tune's experiment snapshot period (10 s or more, "auto")


def prune_checkpoints(folder: Path, now: float | None = None) -> list[Path]:
    """Delete a trial's old checkpoints: keep the newest, the best by val/acc, and all from the last
    KEEP_RECENT_S seconds.

    Tune itself keeps them all (num_to_keep=None) because its own pruning deletes a checkpoint
    before its next experiment snapshot stops pointing at it: a driver killed in between leaves a
    trial that cannot be restored. Pruning with a lag longer than the snapshot period avoids that.
    """
    now = time.time() if now is None else now
    found = []
    for d in folder.glob("checkpoint_*"):
        try:
            m = json.loads((d / METRICS_FILE).read_text())
            found.append((m.get("epoch", 0), m.get(METRIC, -1.0), d.stat().st_mtime, d))
        except (OSError, ValueError):
            continue  # being written, or cut short: not ours to judge
    if len(found) <= 2:
        return []
    keep = {max(found, key=lambda f: f[0])[3], max(found, key=lambda f: (f[1], f[0]))[3]}
    gone = []
    for _epoch, _acc, mtime, d in found:
        if d not in keep and now - mtime > KEEP_RECENT_S:
            shutil.rmtree(d, ignore_errors=True)
            gone.append(d)
    return gone


def _read_checkpoint(folder: Path) -> tuple[dict, dict] | None:
    """(state, metrics) of a checkpoint folder, or None when it is incomplete or unreadable."""
    from cnnclf.train import CheckpointError, load_checkpoint

    try:
        metrics = json.loads((folder / METRICS_FILE).read_text())
        state = load_checkpoint(folder / CHECKPOINT_FILE)  # weights_only: nothing in it runs
    except CheckpointError as e:  # cut short by a crash, or not ours: the trial does without it
        print(f"ignoring checkpoint: {e}", file=sys.stderr, flush=True)
        return None
    except (OSError, ValueError):  # no metrics file yet: a write cut short by a crash
        return None
    return (state, metrics) if state.get("epoch") == metrics.get("epoch") else None


def _checkpoint_dirs(folders: list[Path]) -> dict[int, Path]:
    """epoch -> the newest checkpoint folder of that epoch with readable metrics, across `folders`."""
    found: dict[int, tuple[float, Path]] = {}
    for folder in folders:
        for d in folder.glob("checkpoint_*") if folder.is_dir() else ():
            with contextlib.suppress(OSError, ValueError):
                epoch = int(json.loads((d / METRICS_FILE).read_text()).get("epoch", 0))
                mtime = d.stat().st_mtime
                if epoch > 0 and (epoch not in found or mtime > found[epoch][0]):
                    found[epoch] = (mtime, d)
    return {e: d for e, (_, d) in found.items()}


def _write_checkpoint_dir(folder: Path, state: dict, metrics: dict) -> None:
    from cnnclf.train import save_checkpoint

    save_checkpoint(state, folder / CHECKPOINT_FILE)
    (folder / METRICS_FILE).write_text(json.dumps(metrics))


# ---------------------------------------------------------------------------------------------
# The driver.


def build_parser(spec: TaskSpec) -> argparse.ArgumentParser:
    class Parser(argparse.ArgumentParser):
        def error(self, message: str) -> None:
            raise UsageError(message)

    p = Parser(
        prog=f"sweeps/{spec.task}.py",
        description=f"Ray Tune + Optuna sweep of cnnclf on {spec.task}; every trial in MLflow.",
        epilog=spec.doc,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--num-samples", type=int, default=40, help="search trials (the seed baseline runs on top)")
    p.add_argument(
        "--max-epochs",
        type=int,
        default=None,
        help=f"epochs per trial; ASHA's max_t (default {spec.default_max_epochs}; --fix epochs=N is the same setting)",
    )
    p.add_argument("--scheduler", choices=["asha", "fifo"], default="asha")
    p.add_argument("--grace-period", type=int, default=1, help="ASHA: epochs before a trial can be stopped")
    p.add_argument("--fix", action="append", default=[], metavar="NAME=VALUE", help="pin a parameter (repeatable)")
    p.add_argument("--no-baseline", action="store_true", help="leave out the re-measured seed baseline")
    p.add_argument("--confirm", type=int, default=3, help="retrain the top configs with this many fresh seeds (0: off)")
    p.add_argument("--confirm-top", type=int, default=3, help="how many top configs --confirm retrains")
    p.add_argument("--cpus-per-trial", type=float, default=1.0)
    p.add_argument(
        "--gpus-per-trial",
        type=float,
        default=None,
        help="fractional packs trials onto a GPU (0.25: four per GPU); default 0.5 with GPUs, else 0",
    )
    p.add_argument("--max-concurrent", type=int, default=None, help="cap on trials running at once")
    p.add_argument("--max-failures", type=int, default=2, help="retries of a crashed trial, from its checkpoint")
    p.add_argument("--address", default=None, help="join a Ray cluster: auto or ray://host:10001")
    p.add_argument("--connect-timeout", type=float, default=60.0, help="seconds to wait for the cluster at --address")
    p.add_argument("--ray-num-gpus", type=float, default=None, help=argparse.SUPPRESS)  # declare GPUs (tests)
    p.add_argument(
        "--storage-path",
        default=os.environ.get("CNNCLF_STORAGE_PATH", "ray_results"),
        help="local folder, NFS path or s3://bucket/prefix (default: $CNNCLF_STORAGE_PATH, else ./ray_results)",
    )
    p.add_argument("--name", default=None, help="sweep name (default: task-YYYYmmdd-HHMMSS)")
    p.add_argument("--resume", action="store_true", help="continue the interrupted sweep --name")
    p.add_argument("--tracking-uri", default=None, help="MLflow tracking URI (default: sqlite:///mlflow.db)")
    p.add_argument(
        "--mlflow-wait",
        type=float,
        default=60.0,
        help="seconds to wait at the end for an unreachable MLflow server before leaving writes spooled",
    )
    p.add_argument("--sync", action="store_true", help="write what sweep --name spooled while MLflow was down")
    p.add_argument("--experiment", default=spec.task)
    p.add_argument("--data-dir", type=Path, default=Path("data"))
    p.add_argument("--no-download", action="store_true")
    p.add_argument("--subset", type=int, default=None, help="train on this many training images")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--smoke-test", action="store_true", help="2 trials + baseline, 1 epoch, small subset")
    p.add_argument("--out", type=Path, default=Path("reports/out"), help="best config (and report) go to OUT/<name>/")
    return p


def check_args(args: argparse.Namespace) -> None:
    def need(ok: bool, flag: str, why: str) -> None:
        if not ok:
            raise UsageError(f"argument {flag}: {why}")

    need(args.num_samples >= 1, "--num-samples", "expected >= 1")
    need(args.max_epochs is None or args.max_epochs >= 1, "--max-epochs", "expected >= 1")
    need(args.grace_period >= 1, "--grace-period", "expected >= 1")
    need(args.cpus_per_trial > 0, "--cpus-per-trial", "expected > 0")
    need(args.gpus_per_trial is None or args.gpus_per_trial >= 0, "--gpus-per-trial", "expected >= 0")
    need(args.max_concurrent is None or args.max_concurrent >= 1, "--max-concurrent", "expected >= 1")
    need(args.max_failures >= 0, "--max-failures", "expected >= 0")
    need(args.confirm >= 0, "--confirm", "expected >= 0")
    need(args.confirm_top >= 1, "--confirm-top", "expected >= 1")
    need(args.subset is None or args.subset >= 2, "--subset", "expected >= 2")
    need(not args.resume or args.name is not None, "--resume", "needs --name of the sweep to continue")
    need(not args.sync or args.name is not None, "--sync", "needs --name of the sweep to write")
    need(not (args.sync and args.resume), "--sync", "cannot be combined with --resume")
    need(args.mlflow_wait >= 0, "--mlflow-wait", "expected >= 0")
    need(args.connect_timeout > 0 and math.isfinite(args.connect_timeout), "--connect-timeout", "expected > 0")
    need(math.isfinite(args.cpus_per_trial), "--cpus-per-trial", "expected a finite number")
    need(args.gpus_per_trial is None or math.isfinite(args.gpus_per_trial), "--gpus-per-trial", "expected a number")
    if args.name is not None:
        need(name_error(args.name) is None, "--name", name_error(args.name) or "")
    need(args.experiment.strip() != "", "--experiment", "expected a name")
    if args.address is not None:
        need(
            args.address == "auto" or re.fullmatch(r"(ray://)?[\w.-]+:\d+", args.address) is not None,
            "--address",
            f"expected auto, host:port or ray://host:port, got {args.address!r}",
        )
        if args.address.startswith("ray://"):
            from ray._private.utils import get_ray_client_dependency_error  # what ray.init checks

            need(
                get_ray_client_dependency_error() is None,
                "--address",
                "ray:// needs the Ray Client: pip install 'ray[client]' (or run on the head with --address auto)",
            )


TRACKING_SCHEMES = ("http", "https", "sqlite", "file", "postgresql", "mysql", "mssql", "databricks")


def check_tracking(uri: str) -> None:
    """Fail fast (exit 2) when the tracking store cannot be reached or is not MLflow's, before any training."""
    scheme = uri.split("://", 1)[0].split("+", 1)[0] if "://" in uri else ""
    if not uri.strip() or (scheme and scheme not in TRACKING_SCHEMES):
        raise UsageError(
            f"argument --tracking-uri: {uri!r} is not an MLflow tracking URI ({', '.join(TRACKING_SCHEMES)})"
        )
    if uri.startswith("sqlite:///"):
        db = Path(uri.removeprefix("sqlite:///")).expanduser()
        if db.is_dir():
            raise UsageError(f"argument --tracking-uri: {db} is a folder, not a database file")
        folder = db.resolve().parent
        if not folder.is_dir() or not os.access(folder, os.W_OK):
            raise UsageError(f"argument --tracking-uri: {folder} is not a writable folder")
        if db.is_file() and db.stat().st_size > 0 and _mlflow_tables(db) is None:
            raise UsageError(f"argument --tracking-uri: {db} is not an MLflow database")
    elif uri.startswith(("http://", "https://")):
        import urllib.error
        import urllib.request

        try:
            with urllib.request.urlopen(uri.rstrip("/") + "/health", timeout=5) as r:
                if r.status != 200:
                    raise OSError(f"HTTP {r.status}")
        except (urllib.error.URLError, OSError) as e:
            raise UsageError(f"argument --tracking-uri: cannot reach {uri} ({getattr(e, 'reason', e)})") from None
    elif uri.startswith(("file:", "/", "./")) or "://" not in uri:
        os.environ.setdefault("MLFLOW_ALLOW_FILE_STORE", "true")  # MLflow 3 refuses a file store otherwise


def _mlflow_tables(db: Path) -> set[str] | None:
    """The tables of an MLflow SQLite database, maybe half-made; None for any other file."""
    from mlflow.store.db.base_sql_model import Base
    from mlflow.store.db.utils import InitialBase

    from reports.__main__ import sqlite_tables

    tables = sqlite_tables(db)
    ours = set(Base.metadata.tables) | set(InitialBase.metadata.tables) | {"alembic_version"}
    # MLflow's first table is experiments; one that holds runs also has its schema's revision.
    if tables is None or not ((tables <= ours and "experiments" in tables) or {"alembic_version", "runs"} <= tables):
        return None  # another program's database, which MLflow would add its tables to
    return tables


def prepare_tracking(uri: str) -> None:
    """Make a SQLite tracking database ready, once all input is checked and before any training.

    MLflow builds its schema in some 60 migrations that are not crash-safe: a sweep killed while they
    ran leaves a database MLflow cannot open again. Such a database holds no run (runs come after the
    last migration), so it is set aside and made anew; the sweep's journal holds everything to write.
    Two sweeps starting at once on one database take turns, under a lock.
    """
    if not uri.startswith("sqlite:///"):
        return
    import fcntl

    from mlflow.exceptions import MlflowException
    from mlflow.store.db.utils import _get_latest_schema_revision
    from mlflow.tracking import MlflowClient

    db = Path(uri.removeprefix("sqlite:///")).expanduser()
    # The lock lives beside the database (a folder check_tracking found writable), not at a fixed
    # name in a shared /tmp; O_NOFOLLOW refuses a planted symlink and nothing is ever truncated.
    lock_path = db.with_name(db.name + ".lock")
    try:
        fd = os.open(lock_path, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600)
    except OSError as e:
        raise UsageError(f"argument --tracking-uri: cannot use the lock file {lock_path} ({e.strerror})") from None
    with os.fdopen(fd, "r+b") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # released when the file closes, or when the process dies
        tables = _mlflow_tables(db) if db.is_file() and db.stat().st_size > 0 else None
        revision, has_runs = _schema(db, tables) if tables else (None, False)
        head = _get_latest_schema_revision()
        if tables and revision != head and has_runs:
            raise UsageError(
                f"argument --tracking-uri: {db} has MLflow schema {revision}, this MLflow needs {head}; "
                f"back it up, then run: mlflow db upgrade {uri}"
            )
        if tables and revision != head:
            aside = db.with_name(f"{db.name}.unfinished-{time.strftime('%Y%m%d-%H%M%S')}")
            for suffix in ("", "-journal", "-wal", "-shm"):
                if (part := Path(f"{db}{suffix}")).exists():
                    os.replace(part, f"{aside}{suffix}")
            print(
                f"MLflow: {db} was left half-made by a killed process and holds no run; "
                f"set aside as {aside.name}, starting a fresh one",
                file=sys.stderr,
                flush=True,
            )
        try:
            MlflowClient(tracking_uri=uri).search_experiments(max_results=1)  # makes the schema if new
        except MlflowException as e:
            raise UsageError(f"argument --tracking-uri: {db}: {' '.join(e.message.split())}") from None


def _schema(db: Path, tables: set[str]) -> tuple[str | None, bool]:
    """The database's schema revision, and whether it holds any run."""
    import sqlite3

    with contextlib.closing(sqlite3.connect(f"{db.resolve().as_uri()}?mode=ro", uri=True)) as c:
        revision = None
        if "alembic_version" in tables:
            row = c.execute("SELECT version_num FROM alembic_version").fetchone()
            revision = row[0] if row else None
        has_runs = "runs" in tables and c.execute("SELECT 1 FROM runs LIMIT 1").fetchone() is not None
    return revision, has_runs


def _storage_uri(path: str) -> str:
    return path if "://" in path else str(Path(path).expanduser().resolve())


def main(spec: TaskSpec, argv: list[str] | None = None) -> int:
    try:
        return _main(spec, sys.argv[1:] if argv is None else argv)
    except UsageError as e:
        print(f"{spec.task} sweep: error: {e}", file=sys.stderr)
        return EXIT_USAGE
    except KeyboardInterrupt:  # before any trial started (loading the data, starting Ray)
        print(f"{spec.task} sweep: interrupted before any trial started; nothing to resume", file=sys.stderr)
        return EXIT_INTERRUPTED


def _sigterm_as_sigint() -> None:
    """SIGTERM (`kill`, `timeout`, `ray job stop`) takes Ctrl-C's path: trials stop, state is saved,
    runs are closed as KILLED, and the resume command is printed. A second signal is not softened."""
    import signal
    import threading

    def handler(signum, frame) -> None:
        signal.signal(signal.SIGTERM, signal.SIG_DFL)
        os.kill(os.getpid(), signal.SIGINT)

    if threading.current_thread() is threading.main_thread():  # signal handlers are the main thread's
        signal.signal(signal.SIGTERM, handler)


def _main(spec: TaskSpec, argv: list[str]) -> int:
    args = build_parser(spec).parse_args(argv)
    check_args(args)
    from cnnclf.data import DataError, load_task  # torch: after the flags, so a typo is answered at once

    if args.sync:
        return sync(spec, args)
    args.tracking_uri = args.tracking_uri or DEFAULT_TRACKING_URI
    try:
        faults = load_faults()
    except ValueError as e:
        raise UsageError(str(e)) from None
    ranges = spec.ranges
    # A trial's epochs and ASHA's max_t are one setting: with epochs above max_t every trial would be
    # stopped before its last epoch, with no test metrics, and its reproduce command would be wrong.
    fixed_epochs = parse_fix(args.fix, spec.base).get("epochs")
    if fixed_epochs is not None and args.max_epochs is not None and fixed_epochs != args.max_epochs:
        raise UsageError(
            f"argument --fix: epochs={fixed_epochs} disagrees with --max-epochs {args.max_epochs}; "
            "they are one setting, give one of them"
        )
    args.max_epochs = fixed_epochs or args.max_epochs or spec.default_max_epochs
    base = spec.base.replace(epochs=args.max_epochs, seed=args.seed)
    subset, eval_subset = args.subset, None
    if args.smoke_test:
        args.num_samples, args.max_epochs, ranges = 2, 1, spec.smoke_ranges
        args.confirm, args.confirm_top = min(args.confirm, 1), 1  # one confirmation run: the path is exercised
        base = base.replace(epochs=1, image_size=spec.smoke_image_size)
        subset, eval_subset = subset or 256, 128
    fixed = parse_fix(args.fix, base)
    if args.smoke_test:
        fixed.pop("epochs", None)  # the smoke test trains one epoch, whatever was fixed
    base = base.replace(**{k: v for k, v in fixed.items() if k not in SEARCH_PARAMS})
    baseline = spec.baseline.replace(
        epochs=min(spec.baseline.epochs, args.max_epochs), image_size=base.image_size, seed=args.seed
    )
    from cnnclf.train import check_model_fits

    for what, cfg in (("--fix", base), ("the baseline", baseline)):
        try:
            check_model_fits(cfg)
        except ValueError as e:
            raise UsageError(f"argument --fix: {e}" if what == "--fix" else f"{what}: {e}") from None
    if args.address is None and (args.gpus_per_trial or 0) > 0:
        import torch

        local = args.ray_num_gpus if args.ray_num_gpus is not None else torch.cuda.device_count()
        if not local:
            raise UsageError("argument --gpus-per-trial: this machine has no GPU (join a cluster with --address)")
    name = args.name or f"{spec.task}-{time.strftime('%Y%m%d-%H%M%S')}"
    storage = _storage_uri(args.storage_path)
    if "://" not in storage and Path(storage).exists() and not Path(storage).is_dir():
        raise UsageError(f"argument --storage-path: {storage} is a file, not a folder")
    if args.out.exists() and not args.out.is_dir():
        raise UsageError(f"argument --out: {args.out} is a file, not a folder")
    check_tracking(args.tracking_uri)
    journal_dir = args.out / name / "journal"
    if args.resume and not (_can_restore(storage, name) or (journal_dir / "ops.jsonl").exists()):
        raise UsageError(f"argument --resume: no sweep named {name!r} under {storage}")
    exists = ("://" not in storage and (Path(storage) / name).exists()) or journal_dir.exists()
    if not args.resume and exists:
        raise UsageError(f"argument --name: a sweep named {name!r} already exists; add --resume to continue it")

    if args.address is not None:
        _check_reachable(args.address, args.connect_timeout)  # before the data is read: a typo costs seconds
    try:
        data = load_task(
            spec.task,
            args.data_dir,
            image_size=base.image_size,
            val_fraction=base.val_fraction,
            test_fraction=base.test_fraction,
            subset=subset,
            seed=args.seed,
            download_missing=not args.no_download,
            eval_subset=eval_subset,
        )
    except DataError as e:
        raise UsageError(str(e)) from None
    print(
        f"{spec.task}: {len(data.train_y)} train / {len(data.val_y)} val / {len(data.test_y)} test images "
        f"at {data.image_size}px ({data.manifest['files_skipped']} files skipped)",
        flush=True,
    )
    prepare_tracking(args.tracking_uri)
    return run_sweep(spec, args, name, storage, base, baseline, ranges, fixed, data, faults)


DEFAULT_TRACKING_URI = "sqlite:///mlflow.db"


def load_faults() -> list[dict]:
    from sweeps.faults import load

    return load()


def _quiet_mlflow_http() -> None:
    # The journal retries on its own, forever and in the background; MLflow's own retries
    # (7, with exponential backoff) would only hide an outage for minutes.
    os.environ.setdefault("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
    os.environ.setdefault("MLFLOW_HTTP_REQUEST_TIMEOUT", "15")


def sync(spec: TaskSpec, args: argparse.Namespace) -> int:
    """`--sync --name N`: write what sweep N spooled while MLflow was unreachable, then its report."""
    from sweeps.finish import write_report
    from sweeps.journal import Journal

    folder = args.out / args.name / "journal"
    if not (folder / "ops.jsonl").exists():
        raise UsageError(f"argument --name: no journal of a sweep {args.name!r} under {args.out}")
    meta = Journal(folder, "", "", args.name, verbose=False).meta
    uri = args.tracking_uri or meta.get("tracking_uri") or DEFAULT_TRACKING_URI
    check_tracking(uri)
    prepare_tracking(uri)
    _quiet_mlflow_http()
    journal = Journal(folder, uri, meta.get("experiment", args.experiment), args.name)
    todo = journal.pending()
    journal.start()
    left = journal.close(timeout=max(args.mlflow_wait, 1.0))
    print(f"{args.name}: wrote {todo - left} of {todo} spooled MLflow writes to {uri}", flush=True)
    if left:
        print(f"{spec.task} sweep: error: {left} MLflow writes are still spooled in {folder}", file=sys.stderr)
        return EXIT_FAILED
    if meta.get("finished") and not (args.out / args.name / "report.html").exists():
        journal = Journal(folder, uri, meta.get("experiment", args.experiment), args.name)
        journal.start()
        write_report(journal, args.out / args.name)
        if journal.close(timeout=max(args.mlflow_wait, 1.0)):
            return EXIT_FAILED
    return EXIT_OK


def _can_restore(storage: str, name: str) -> bool:
    """Whether Tune can restore the experiment: its state files exist and read back whole.

    Tune writes and copies those files in place, so a driver killed at the wrong moment leaves
    one truncated, and Tune's own fallback then silently starts the experiment over. A local
    experiment with such a file is not restorable; the sweep continues from its journal instead.
    """
    from ray import tune

    path = f"{storage.rstrip('/')}/{name}"
    try:
        if not tune.Tuner.can_restore(path):
            return False
    except Exception:
        return False
    if "://" in path:
        return True
    import cloudpickle

    folder = Path(path)
    states = sorted(folder.glob("experiment_state-*.json"))
    try:
        if not states:
            return False
        json.loads(states[-1].read_text())
        for f in [folder / "tuner.pkl", *folder.glob("searcher-state-*.pkl")]:
            with open(f, "rb") as fh:
                cloudpickle.load(fh)  # our own experiment folder: trusted, as Tune's own restore assumes
    except Exception:
        return False
    return True


def _set_aside_tune_state(storage: str, name: str) -> None:
    """Rename a cut-short Tune state out of the way, so a fresh Tuner starts clean beside the trial folders."""
    folder = Path(storage) / name
    if "://" in storage or not folder.is_dir():
        return
    stamp = time.strftime("%Y%m%d-%H%M%S")
    for pattern in ("experiment_state-*.json", "searcher-state-*.pkl", "tuner.pkl", "basic-variant-state-*.json"):
        for f in folder.glob(pattern):
            f.rename(f.with_name(f"{f.name}.unreadable-{stamp}"))


def _check_reachable(address: str, timeout: float) -> None:
    """Wait up to `timeout` seconds for the cluster's port to accept a TCP connection; exit 2 if it never does.

    Ray's own connect retries for many minutes, and in C++ where SIGTERM is not seen.
    """
    import socket

    if address == "auto":
        return  # the address of a cluster started on this machine, read from its session files
    host, _, port = address.removeprefix("ray://").rpartition(":")
    deadline = time.monotonic() + timeout
    while True:
        left = deadline - time.monotonic()
        try:
            with socket.create_connection((host, int(port)), timeout=max(0.1, min(5.0, left))):
                return
        except OSError as e:
            if left <= 1.0:
                why = e.strerror or type(e).__name__
                raise UsageError(
                    f"argument --address: nothing answers at {address} after {timeout:g} s ({why}); "
                    "check the address, or raise --connect-timeout"
                ) from None
        time.sleep(min(1.0, max(0.0, deadline - time.monotonic())))


@contextlib.contextmanager
def _deadline(seconds: float | None, task: str, address: str | None):
    """Exit 2 if the block (ray.init on a reachable port that is not a Ray head) outlasts `seconds`.

    Nothing of the sweep has been written yet, so a hard exit loses nothing.
    """
    if seconds is None:
        yield
        return
    import threading

    def give_up() -> None:
        print(
            f"{task} sweep: error: argument --address: no Ray cluster answered at {address} "
            f"within {seconds:g} s; check the address, or raise --connect-timeout",
            file=sys.stderr,
            flush=True,
        )
        os._exit(EXIT_USAGE)

    timer = threading.Timer(seconds, give_up)
    timer.daemon = True
    timer.start()
    try:
        yield
    finally:
        timer.cancel()


def run_sweep(spec, args, name, storage, base, baseline, ranges, fixed, data, faults=()) -> int:
    import optuna
    import ray
    from ray import tune
    from ray.tune.schedulers import FIFOScheduler

    from sweeps.journal import Journal
    from sweeps.search import Space, make_searcher
    from sweeps.tracking import MLflowCallback, ProgressCallback, SweepASHA

    # We checkpoint every epoch on purpose; and our own progress lines replace Tune's tables.
    os.environ.setdefault("TUNE_WARN_EXCESSIVE_EXPERIMENT_CHECKPOINT_SYNC_THRESHOLD_S", "0")
    os.environ.setdefault("RAY_AIR_NEW_OUTPUT", "0")
    _quiet_mlflow_http()
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    warnings.filterwarnings("ignore", category=optuna.exceptions.ExperimentalWarning)
    out_dir = args.out / name
    init_kw: dict = {"include_dashboard": False, "log_to_driver": False} if args.address is None else {}
    if args.address:
        init_kw["address"] = args.address
    if args.ray_num_gpus is not None:
        init_kw["num_gpus"] = args.ray_num_gpus
    try:
        with _deadline(args.connect_timeout if args.address else None, spec.task, args.address):
            ray.init(**init_kw)
    except Exception as e:
        if args.address is None:
            raise
        raise UsageError(
            f"argument --address: cannot join the Ray cluster at {args.address} ({_first_line(e)})"
        ) from None
    _sigterm_as_sigint()  # after ray.init: its core worker installs a SIGTERM handler that aborts
    journal = Journal(out_dir / "journal", args.tracking_uri, args.experiment, name)
    if not journal.meta:
        journal.append(
            "meta", data={"tracking_uri": args.tracking_uri, "experiment": args.experiment, "task": spec.task}
        )
    try:
        gpus_available = ray.cluster_resources().get("GPU", 0)
        gpus = args.gpus_per_trial if args.gpus_per_trial is not None else (0.5 if gpus_available else 0.0)
        if gpus > 0 and not gpus_available and args.address is None:
            raise UsageError("argument --gpus-per-trial: the Ray cluster has no GPUs")
        if gpus > 0 and not gpus_available:
            # cluster.yaml scales GPU workers from zero: trials waiting for a GPU make the autoscaler add one.
            print("no GPU node in the cluster yet; the trials wait for the autoscaler to add one", flush=True)
        if base.normalize == "dataset" or baseline.normalize == "dataset":
            data.train_stats()  # once here, not once per trial
        arrays = {
            f.name: getattr(data, f.name).numpy() if hasattr(getattr(data, f.name), "numpy") else getattr(data, f.name)
            for f in dataclasses.fields(data)
        }
        path = f"{storage.rstrip('/')}/{name}"
        confirm_path = f"{path}-confirm"

        def trainable_for(experiment_path: str):
            return tune.with_resources(
                tune.with_parameters(
                    run_trial,
                    data=arrays,
                    base=base,
                    baseline=baseline,
                    experiment_path=experiment_path,
                    faults=list(faults),
                    finished=journal.finished_trial_ids(),
                ),
                {"cpu": args.cpus_per_trial, "gpu": gpus},
            )

        with_baseline = not args.no_baseline
        total = args.num_samples + (1 if with_baseline else 0)
        argv_resume = [a for a in sys.argv[1:] if a != "--resume"]
        if "--name" not in argv_resume:
            argv_resume += ["--name", name]
        resume_cmd = shlex.join([sys.executable, sys.argv[0], *argv_resume, "--resume"])
        mlflow_cb = MLflowCallback(
            journal,
            base=base,
            baseline=baseline,
            sweep_params={k: (str(v) if not isinstance(v, int | float | str) else v) for k, v in vars(args).items()},
        )
        progress = ProgressCallback(total=total, max_epochs=args.max_epochs, base=base, baseline=baseline)

        def interrupted() -> int:
            mlflow_cb.close_orphans(interrupted=True)
            left = journal.close(timeout=min(args.mlflow_wait, 10.0))
            spooled = f" ({left} MLflow writes spooled in {journal.folder})" if left else ""
            print(
                f"\nsweep {name} interrupted; its state is saved{spooled}. Resume with:\n  {resume_cmd}",
                file=sys.stderr,
            )
            return EXIT_INTERRUPTED

        if args.resume and _can_restore(storage, name):
            print(f"resuming sweep {name} from {path}", flush=True)
            tuner = tune.Tuner.restore(path, trainable=trainable_for(path), resume_errored=True)
            # Tune unpickles the callbacks of the first run; use this run's, so the driver sees what they saw.
            tuner._local_tuner.get_run_config().callbacks = [mlflow_cb, progress]
            known = _known_trials(tuner)
        else:
            if args.resume:
                _set_aside_tune_state(storage, name)
                print(
                    f"resuming sweep {name}: Tune's saved state is missing or was cut short; continuing from the "
                    "sweep's journal",
                    flush=True,
                )
            baseline_cfg = None
            if with_baseline:
                baseline_cfg = {k: v for k, v in baseline.to_dict().items() if k in _baseline_keys()}
                baseline_cfg["role"] = "baseline"
            searcher = make_searcher(Space(ranges, fixed), baseline_cfg, args.seed, args.max_concurrent)
            if args.scheduler == "asha":
                scheduler = SweepASHA(
                    time_attr="epoch",
                    metric=METRIC,
                    mode=MODE,
                    max_t=args.max_epochs,
                    grace_period=min(args.grace_period, args.max_epochs),
                    reduction_factor=3,
                )
            else:
                scheduler = FIFOScheduler()
            tuner = tune.Tuner(
                trainable_for(path),
                tune_config=tune.TuneConfig(
                    search_alg=searcher,
                    scheduler=scheduler,
                    num_samples=total,
                    reuse_actors=True,
                    trial_dirname_creator=_trial_dirname,
                ),
                run_config=tune.RunConfig(
                    name=name,
                    storage_path=storage,
                    callbacks=[mlflow_cb, progress],
                    failure_config=tune.FailureConfig(max_failures=args.max_failures),
                    # Tune keeps every checkpoint; the trial prunes its own, with a lag (prune_checkpoints).
                    checkpoint_config=tune.CheckpointConfig(
                        checkpoint_score_attribute=METRIC, checkpoint_score_order=MODE
                    ),
                    verbose=0,
                ),
            )
            known = set()
        try:
            return _run_tuners(
                args, spec, name, storage, path, confirm_path, tuner, known, journal, mlflow_cb, data,
                base, baseline, total, trainable_for, interrupted,
            )  # fmt: skip
        except KeyboardInterrupt:  # outside Tune's loop: while confirming, exporting or waiting on MLflow
            return interrupted()
        except BaseException:
            mlflow_cb.close_orphans(interrupted=True)  # no run left RUNNING, however it ended
            journal.close(timeout=min(args.mlflow_wait, 10.0))
            raise
    finally:
        journal.close(timeout=0)
        ray.shutdown()


def _run_tuners(
    args, spec, name, storage, path, confirm_path, tuner, known, journal, mlflow_cb, data,
    base, baseline, total, trainable_for, interrupted,
) -> int:  # fmt: skip
    """The search Tuner, then the confirmation Tuner, then the end of the sweep."""
    from ray import tune

    from sweeps.finish import collect, confirm_configs, finish, rank
    from sweeps.search import FixedConfigs, Orphans, export_study, set_orphans
    from sweeps.tracking import ProgressCallback

    out_dir = args.out / name
    orphans = Orphans.from_journal(journal, known, path, roles=("trial", "baseline"))
    if orphans.entries:
        print(f"{len(orphans.entries)} trial(s) began after Tune's last snapshot; they continue where they were")
    set_orphans(tuner, orphans)
    results, statuses = _fit(tuner, mlflow_cb)
    if results is None or _unfinished(statuses, total):
        return interrupted()
    export_study(tuner, out_dir / "optuna.db")
    rows = collect(results, base, baseline)

    confirm = confirm_configs(rank(rows), args.confirm_top, args.confirm, args.seed) if args.confirm else []
    if confirm:
        # The top configurations again with fresh seeds (same data and splits), so no claim
        # rests on one lucky run. A second Tuner in the same Ray session; FIFO, no search.
        print(f"confirming the top {len(confirm) // args.confirm} with {args.confirm} fresh seeds each", flush=True)
        progress_c = ProgressCallback(total=len(confirm), max_epochs=args.max_epochs, base=base, baseline=baseline)
        if args.resume and _can_restore(storage, f"{name}-confirm"):
            ctuner = tune.Tuner.restore(confirm_path, trainable=trainable_for(confirm_path), resume_errored=True)
            ctuner._local_tuner.get_run_config().callbacks = [mlflow_cb, progress_c]
            cknown = _known_trials(ctuner)
        else:
            if args.resume:
                _set_aside_tune_state(storage, f"{name}-confirm")
            ctuner = tune.Tuner(
                trainable_for(confirm_path),
                tune_config=tune.TuneConfig(
                    search_alg=FixedConfigs(confirm),
                    num_samples=len(confirm),
                    reuse_actors=True,
                    trial_dirname_creator=_trial_dirname,
                ),
                run_config=tune.RunConfig(
                    name=f"{name}-confirm",
                    storage_path=storage,
                    callbacks=[mlflow_cb, progress_c],
                    failure_config=tune.FailureConfig(max_failures=args.max_failures),
                    checkpoint_config=tune.CheckpointConfig(),
                    verbose=0,
                ),
            )
            cknown = set()
        set_orphans(ctuner, Orphans.from_journal(journal, cknown, confirm_path, roles=("confirm",)))
        cresults, cstatuses = _fit(ctuner, mlflow_cb)
        if cresults is None or _unfinished(cstatuses, len(confirm)):
            return interrupted()
        rows += collect(cresults, base, baseline)
        statuses = {**statuses, **cstatuses}
    mlflow_cb.close_orphans(interrupted=False)
    summary = finish(rows, statuses, out_dir, mlflow_cb, data, wait=args.mlflow_wait)
    left = journal.close(timeout=args.mlflow_wait)
    if left:
        sync_cmd = shlex.join([sys.executable, sys.argv[0], "--sync", "--name", name, "--out", str(args.out)])
        print(
            f"{spec.task} sweep: error: MLflow at {args.tracking_uri} stayed unreachable; {left} writes are "
            f"kept in {journal.folder}. Once it is back: {sync_cmd}",
            file=sys.stderr,
        )
        return EXIT_FAILED
    if journal.rejected:
        print(f"{spec.task} sweep: error: MLflow refused {journal.rejected} writes; see {journal.rejected_path}")
        return EXIT_FAILED
    return EXIT_FAILED if summary["failed"] else EXIT_OK


def _first_line(e: BaseException) -> str:
    lines = str(e).strip().splitlines()
    return (lines[0] if lines else type(e).__name__)[:300]


def _known_trials(tuner) -> set[str]:
    """Trial ids in Tune's restored state (trial folders are named <role>-<trial_id>)."""
    try:
        return {Path(str(r.path)).name.rsplit("-", 1)[-1] for r in tuner.get_results()}
    except Exception:
        return set()


def _fit(tuner, mlflow_cb) -> tuple[object | None, dict]:
    try:
        results = tuner.fit()
    except KeyboardInterrupt:
        results = None
    return results, dict(mlflow_cb.trial_statuses)


def _unfinished(statuses: dict, total: int) -> bool:
    """Tune returns normally after Ctrl-C, with trials still pending or running."""
    return len(statuses) < total or any(s not in ("TERMINATED", "ERROR") for s in statuses.values())


def _trial_dirname(trial) -> str:
    return f"{trial.config.get('role', 'trial')}-{trial.trial_id}"  # Tune's default packs the config into it


def _baseline_keys() -> set[str]:
    """The baseline preset's training fields; data fields (resolution, splits, subset, seed) come from the sweep."""
    data_fields = {"task", "tags", "image_size", "val_fraction", "test_fraction", "subset", "seed"}
    return {f.name for f in dataclasses.fields(TrainConfig)} - data_fields


def finite(x) -> bool:
    return isinstance(x, int | float) and math.isfinite(x)


def dump_json(obj, path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(obj, indent=1, default=str))
    return path
