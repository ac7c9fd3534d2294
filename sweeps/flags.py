"""The sweep scripts' flags (argparse) and the checks that need no file, network or Ray: one line on
stderr and exit 2 for anything out of range (sweeps/cli.py turns them into Settings)."""

from __future__ import annotations

import argparse
import importlib.util
import math
import os
import re
from pathlib import Path

from cnnclf.args import Parser, UsageError, seed
from cnnclf.config import name_error
from sweeps import store
from sweeps.spec import TaskSpec

DEFAULT_SAMPLES, SMOKE_SAMPLES = 40, 2
MAX_WAIT_S = 7 * 24 * 3600  # --mlflow-wait: a week; "forever" is --sync later, not a process that never ends


def confirm_defaults(num_samples: int, seeds: int | None, top: int | None) -> tuple[int, int]:
    """(fresh seeds, top configurations) for the confirmation, where the flags left them out: three seeds, the
    fewest whose Student-t interval is usable (with two, t has 1 degree of freedom and the 95% interval is
    12.7 standard errors wide); as many configurations as keep it within about a third of the search's trials
    (up to 17 trials: 1 config x 3 seeds; 18: 2 x 3; 27 and more: 3 x 3), since a confirmation that costs
    more than the search is a second search."""
    seeds = 3 if seeds is None else seeds
    top = max(1, min(3, num_samples // 3 // max(seeds, 1))) if top is None else top
    return seeds, top


def build_parser(spec: TaskSpec) -> argparse.ArgumentParser:
    p = Parser(
        prog=f"sweeps/{spec.task}.py",
        description=f"Ray Tune + Optuna sweep of cnnclf on {spec.task}; every trial in MLflow.",
        epilog=spec.doc,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    _search_flags(p, spec)
    _resource_flags(p)
    _place_flags(p, spec)
    return p


def _search_flags(p: argparse.ArgumentParser, spec: TaskSpec) -> None:
    p.add_argument(
        "--num-samples",
        type=int,
        default=None,
        help=f"search trials; the seed baseline runs on top (default {DEFAULT_SAMPLES}; --smoke-test: {SMOKE_SAMPLES})",
    )
    p.add_argument(
        "--max-epochs",
        type=int,
        default=None,
        help=f"epochs per trial (default {spec.default_max_epochs}; --fix epochs=N is the same setting); ASHA's max_t "
        "with --budget-by epochs",
    )
    p.add_argument("--scheduler", choices=["asha", "fifo"], default="asha")
    p.add_argument(
        "--budget-by",
        choices=["time", "epochs"],
        default="time",
        help="what ASHA's rungs count: each trial's training seconds (with a cost guard), or its epochs",
    )
    p.add_argument(
        "--max-trial-minutes",
        type=float,
        default=None,
        help="--budget-by time: a search trial projected to train longer stops as too_slow; also ASHA's last "
        "rung (default: 2x the reference configuration's measured training time at --max-epochs, at least 1 minute)",
    )
    p.add_argument(
        "--grace-period", type=int, default=1, help="ASHA with --budget-by epochs: epochs before a trial can be stopped"
    )
    p.add_argument("--fix", action="append", default=[], metavar="NAME=VALUE", help="pin a parameter (repeatable)")
    p.add_argument("--no-baseline", action="store_true", help="leave out the re-measured seed baseline")
    p.add_argument(
        "--confirm",
        type=int,
        default=None,
        help="retrain the top configs with this many fresh seeds; the recommendation is the confirmed config with "
        "the best mean val/acc (0: off, the best search trial is recommended unconfirmed; default 3; --smoke-test: "
        "1)",
    )
    p.add_argument(
        "--confirm-top",
        type=int,
        default=None,
        help="how many top configs --confirm retrains (default: as many as keep the confirmation runs within about "
        "a third of --num-samples, 1 to 3)",
    )
    p.add_argument("--seed", type=seed, default=0)
    p.add_argument(
        "--smoke-test",
        action="store_true",
        help=f"defaults for a quick check: {SMOKE_SAMPLES} trials + baseline, 1 epoch, a small subset, small nets "
        "(flags given beside it are kept)",
    )
    p.add_argument(
        "--warm-start",
        action="append",
        default=[],
        metavar="NAME",
        help="seed the sampler with the finished search trials of earlier sweep NAME of this task (repeatable)",
    )
    p.add_argument(
        "--gpu-hour-price", type=float, default=None, help="price of a GPU-hour: the report adds the sweep's cost"
    )


def _resource_flags(p: argparse.ArgumentParser) -> None:
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


def _place_flags(p: argparse.ArgumentParser, spec: TaskSpec) -> None:
    p.add_argument(
        "--storage-path",
        default=os.environ.get("CNNCLF_STORAGE_PATH", "ray_results"),
        help="local folder, NFS path or s3://bucket/prefix (default: $CNNCLF_STORAGE_PATH, else ./ray_results)",
    )
    p.add_argument("--name", default=None, help="sweep name (default: task-YYYYmmdd-HHMMSS)")
    p.add_argument("--resume", action="store_true", help="continue the interrupted sweep --name")
    p.add_argument("--tracking-uri", default=None, help=f"MLflow tracking URI (default: {store.DEFAULT_URI})")
    p.add_argument(
        "--mlflow-wait",
        type=float,
        default=60.0,
        help="seconds to wait at the end for an unreachable MLflow server before leaving writes spooled",
    )
    p.add_argument("--sync", action="store_true", help="write what sweep --name spooled while MLflow was down")
    p.add_argument("--experiment", default=spec.task)
    p.add_argument(
        "--register-model",
        metavar="NAME",
        default=None,
        help="register the best model (logged on the sweep's run as an MLflow pyfunc model) in the Model Registry",
    )
    p.add_argument("--data-dir", type=Path, default=Path("data"))
    p.add_argument("--no-download", action="store_true")
    p.add_argument("--subset", type=int, default=None, help="train on this many training images")
    p.add_argument("--out", type=Path, default=Path("reports/out"), help="best config (and report) go to OUT/<name>/")


def check_args(args: argparse.Namespace) -> None:
    def need(ok: bool, flag: str, why: str) -> None:
        if not ok:
            raise UsageError(f"argument {flag}: {why}")

    for flag in ("num_samples", "grace_period", "confirm_top"):
        need(getattr(args, flag) is None or getattr(args, flag) >= 1, "--" + flag.replace("_", "-"), "expected >= 1")
    for flag in ("max_failures", "confirm", "mlflow_wait"):
        need(getattr(args, flag) is None or getattr(args, flag) >= 0, "--" + flag.replace("_", "-"), "expected >= 0")
    for flag in ("max_epochs", "max_concurrent"):
        need(getattr(args, flag) is None or getattr(args, flag) >= 1, "--" + flag.replace("_", "-"), "expected >= 1")
    need(args.cpus_per_trial > 0 and math.isfinite(args.cpus_per_trial), "--cpus-per-trial", "expected > 0")
    cores = os.cpu_count() or 1
    need(
        args.address is not None or args.cpus_per_trial <= cores,  # a cluster's is checked once Ray has joined it
        "--cpus-per-trial",
        f"{args.cpus_per_trial:g} is more than this machine's {cores} CPUs: no trial could ever start",
    )
    need(
        math.isfinite(args.mlflow_wait) and args.mlflow_wait <= MAX_WAIT_S,
        "--mlflow-wait",
        f"expected 0 to {MAX_WAIT_S}",
    )
    gpus = args.gpus_per_trial
    need(gpus is None or (gpus >= 0 and math.isfinite(gpus)), "--gpus-per-trial", "expected a number >= 0")
    need(args.subset is None or args.subset >= 2, "--subset", "expected >= 2")
    need(not args.resume or args.name is not None, "--resume", "needs --name of the sweep to continue")
    need(not args.sync or args.name is not None, "--sync", "needs --name of the sweep to write")
    need(not (args.sync and args.resume), "--sync", "cannot be combined with --resume")
    need(args.connect_timeout > 0 and math.isfinite(args.connect_timeout), "--connect-timeout", "expected > 0")
    if args.name is not None:
        need(name_error(args.name) is None, "--name", name_error(args.name) or "")
    need(args.experiment.strip() != "", "--experiment", "expected a name")
    if args.register_model is not None:
        need(name_error(args.register_model) is None, "--register-model", name_error(args.register_model) or "")
    for source in args.warm_start:
        need(name_error(source) is None, "--warm-start", name_error(source) or "")
    minutes = args.max_trial_minutes
    need(minutes is None or (minutes > 0 and math.isfinite(minutes)), "--max-trial-minutes", "expected a number > 0")
    need(minutes is None or args.budget_by == "time", "--max-trial-minutes", "applies to --budget-by time only")
    price = args.gpu_hour_price
    need(price is None or (price >= 0 and math.isfinite(price)), "--gpu-hour-price", "expected a number >= 0")
    if args.address is not None:
        need(
            args.address == "auto" or re.fullmatch(r"(ray://)?[\w.-]+:\d+", args.address) is not None,
            "--address",
            f"expected auto, host:port or ray://host:port, got {args.address!r}",
        )
        # ray:// needs the Ray Client's gRPC (what `ray.init` checks, through a private Ray helper).
        need(
            not args.address.startswith("ray://") or importlib.util.find_spec("grpc") is not None,
            "--address",
            "ray:// needs the Ray Client: pip install 'ray[client]' (or run on the head with --address auto)",
        )
