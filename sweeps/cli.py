"""The sweep scripts' command line: flags -> a frozen Settings, every value checked before Ray starts. The checks
that need the sweep's own files (its lock, a resume's settings) and `--sync` are sweeps/guard.py.

    python sweeps/cifar10.py --num-samples 40
    python sweeps/catdog.py --smoke-test --data-dir data

Exit codes: 0 success; 1 some trials failed or MLflow writes are still spooled; 2 bad flags or
unusable input (one line on stderr naming the flag or file, before anything is written); 130
interrupted.
"""

from __future__ import annotations

import argparse
import dataclasses
import math
import shlex
import socket
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING

from cnnclf.args import UsageError
from cnnclf.config import ConfigError, TrainConfig
from sweeps import store, warmstart
from sweeps.flags import DEFAULT_SAMPLES, SMOKE_SAMPLES, build_parser, check_args, confirm_defaults
from sweeps.guard import claim, lock_holder, same_sweep, tracking
from sweeps.journal_checks import read_meta
from sweeps.session import LOG_NAME, SweepFailed, disk_error, log_to_file
from sweeps.settings import EXIT_FAILED, EXIT_INTERRUPTED, EXIT_USAGE, Settings
from sweeps.spec import SEARCH_PARAMS, TaskSpec
from sweeps.warmstart import settings_of

if TYPE_CHECKING:
    from sweeps.saving import ReportWriter

# Light imports only (no Ray, Tune or MLflow; torch where a check builds a model): every flag is checked, and a
# mistake answered in a second, before `_main` imports sweeps.driver.


def main(spec: TaskSpec, argv: list[str] | None = None, report: ReportWriter | None = None) -> int:
    """The sweep script's main: `argv` (default sys.argv[1:]) -> exit status. `report` writes the report at
    the end (the task scripts hand in reports.write; no sweeps module imports reports)."""
    try:
        return _main(spec, sys.argv[1:] if argv is None else argv, report)
    except UsageError as e:
        print(f"{spec.task} sweep: error: {e}", file=sys.stderr)
        return EXIT_USAGE
    except KeyboardInterrupt:  # before any trial started (loading the data, starting Ray)
        print(f"{spec.task} sweep: interrupted before any trial started; nothing to resume", file=sys.stderr)
        return EXIT_INTERRUPTED
    except SweepFailed as e:  # the traceback is in the sweep's log file
        print(f"{spec.task} sweep: error: {e}", file=sys.stderr)
        return EXIT_FAILED
    except Exception as error:  # a disk that filled up or went read-only mid-sweep: one line, not a traceback
        e = disk_error(error)  # Tune wraps what its callbacks raise into a TuneError
        if e is None:
            raise
        where = f" writing {e.filename}" if e.filename else ""
        print(
            f"{spec.task} sweep: error: {e.strerror}{where}; free some space (or give another --out / --storage-path) "
            "and resume with --resume",
            file=sys.stderr,
        )
        return EXIT_FAILED


def _main(spec: TaskSpec, argv: list[str], report: ReportWriter | None) -> int:
    args = build_parser(spec).parse_args(argv)
    check_args(args)
    if args.sync:
        from sweeps.sync import sync

        return sync(spec, args, report)
    s, load = settings(spec, args, argv)
    if s.address is not None:
        check_reachable(s.address, s.connect_timeout)  # before the data is read: a typo costs seconds
    from cnnclf.data import DataError, load_task  # torch: after the flags, so a typo is answered at once

    try:
        data = load_task(spec.task, args.data_dir, download_missing=not args.no_download, **load)
    except DataError as e:
        raise UsageError(str(e)) from None
    print(
        f"{spec.task}: {len(data.train_y)} train / {len(data.val_y)} val / {len(data.test_y)} test images "
        f"at {data.image_size}px ({data.manifest['files_skipped']} files skipped)",
        flush=True,
    )
    # Ray, Tune and MLflow load here: after every check, and before log_to_file takes over the loggers that Ray
    # configures as it is imported (imported later, Ray would put Tune's lines and tracebacks back on the console).
    from sweeps import driver

    s = claim(s, args)  # before the sweep writes anything: one driver per name, and a resume is the same sweep
    log = log_to_file(s.out_dir / LOG_NAME)
    print(f"logs: {log} (Ray's, Tune's and MLflow's own messages, and any traceback)", flush=True)
    tracking("prepare", s.tracking_uri)
    print(f"MLflow: {s.tracking_uri}", flush=True)
    return driver.run_sweep(s, data, report)


def settings(spec: TaskSpec, args: argparse.Namespace, argv: Sequence[str] = ()) -> tuple[Settings, dict]:
    """The sweep's Settings and `load_task`'s keyword arguments; UsageError for anything unusable. `argv`: the
    flags `args` were parsed from (they go into the resume and sync commands)."""
    from sweeps.faults import load as load_faults

    try:
        faults = tuple(load_faults())
    except ValueError as e:
        raise UsageError(str(e)) from None
    v = dict(vars(args), tracking_uri=store.absolute(args.tracking_uri or store.DEFAULT_URI))
    # A trial's epochs and ASHA's max_t are one setting: with epochs above max_t every trial would be
    # stopped before its last epoch, with no test metrics, and its reproduce command would be wrong.
    fixed_epochs = parse_fix(args.fix, spec.base).get("epochs")
    if fixed_epochs is not None and args.max_epochs is not None and fixed_epochs != args.max_epochs:
        raise UsageError(
            f"argument --fix: epochs={fixed_epochs} disagrees with --max-epochs {args.max_epochs}; "
            "they are one setting, give one of them"
        )
    # --smoke-test sets defaults (few small trials on a small subset, 1 epoch, one confirmation seed);
    # every flag given beside it is kept.
    smoke = args.smoke_test
    v["max_epochs"] = fixed_epochs or args.max_epochs or (1 if smoke else spec.default_max_epochs)
    v["num_samples"] = args.num_samples or (SMOKE_SAMPLES if smoke else DEFAULT_SAMPLES)
    v["confirm"], v["confirm_top"] = confirm_defaults(
        v["num_samples"], 1 if smoke and args.confirm is None else args.confirm, args.confirm_top
    )
    # Data settings are TrainConfig fields, so every run logs them and its reproduce command repeats them.
    data = {"seed": args.seed, "subset": args.subset or (256 if smoke else None), "eval_subset": 128 if smoke else None}
    base, ranges = spec.base.replace(epochs=v["max_epochs"], **data), spec.ranges
    if smoke:
        ranges, base = spec.smoke_ranges, base.replace(image_size=spec.smoke_image_size)
    fixed = parse_fix(args.fix, base)
    base = base.replace(**{k: f for k, f in fixed.items() if k not in SEARCH_PARAMS})
    baseline = spec.baseline.replace(
        epochs=min(spec.baseline.epochs, v["max_epochs"]), image_size=base.image_size, **data
    )
    if "compile" in fixed:  # how trials run, not what they are: the baseline runs the same way
        baseline = baseline.replace(compile=fixed["compile"])
    _check_fit(base, baseline, args)
    v["name"] = args.name or f"{spec.task}-{time.strftime('%Y%m%d-%H%M%S')}"
    v["storage"] = storage_uri(args.storage_path)
    v["task"], v["warm_start"] = spec.task, tuple(dict.fromkeys(args.warm_start))
    _check_places(v)
    load = {k: getattr(base, k) for k in ("subset", "eval_subset", "image_size", "val_fraction", "test_fraction")}
    load["seed"] = base.data_seed
    v |= {"base": base, "baseline": baseline, "ranges": ranges, "fixed": fixed, "faults": faults}
    v["trial_settings"] = settings_of(base, fixed, ranges, load)
    s = _build(spec, v, argv)
    journal_dir = v["out"] / v["name"] / "journal"
    if s.resume and (journal_dir / "ops.jsonl").exists():  # early, before the data is read; again under the lock
        s = same_sweep(s, args, read_meta(journal_dir))
    return s, load


def script_of(spec: TaskSpec) -> str:
    """The task script as the user ran it (sys.argv[0], when it is that script), else its path."""
    here = Path(__file__).with_name(f"{spec.task}.py")
    given = sys.argv[0] if sys.argv else ""
    return given if given and Path(given).name == here.name else str(here)


def _build(spec: TaskSpec, v: dict, argv: Sequence[str]) -> Settings:
    """Settings from the resolved flags `v` (with base, baseline, ranges, fixed and faults added) and the
    command line `argv` they came from."""
    argv = [a for a in argv if a != "--resume"]
    argv += [] if "--name" in argv else ["--name", v["name"]]
    derived = ("base", "baseline", "ranges", "fixed", "faults", "trial_settings", "task")
    logged = {k: ",".join(x) if isinstance(x, tuple) else x for k, x in v.items() if k not in derived}
    logged = {k: (x if isinstance(x, int | float | str) else str(x)) for k, x in logged.items()}
    fields = {f.name for f in dataclasses.fields(Settings)} & v.keys()
    return Settings(
        **{k: v[k] for k in fields},
        spec=spec,
        with_baseline=not v["no_baseline"],
        params={k: x for k, x in logged.items() if k != "storage"},
        script=script_of(spec),
        argv=tuple(argv),
        resume_command=shlex.join([sys.executable, script_of(spec), *argv, "--resume"]),
    )


def _check_fit(base: TrainConfig, baseline: TrainConfig, args: argparse.Namespace) -> None:
    from cnnclf.recipe import check_model_fits

    for what, cfg in (("argument --fix", base), ("the baseline", baseline)):
        try:
            check_model_fits(cfg)
        except ValueError as e:
            raise UsageError(f"{what}: {e}") from None
    if args.address is None and (args.gpus_per_trial or 0) > 0:
        import torch

        local = args.ray_num_gpus if args.ray_num_gpus is not None else torch.cuda.device_count()
        if not local:
            raise UsageError("argument --gpus-per-trial: this machine has no GPU (join a cluster with --address)")


def _check_places(v: dict) -> None:
    """The storage path, --out, the tracking store and the warm-start sources, before anything is written
    (the sweep's name is checked by `claim`, under its lock)."""
    storage, out = v["storage"], v["out"]
    if "://" not in storage and Path(storage).exists() and not Path(storage).is_dir():
        raise UsageError(f"argument --storage-path: {storage} is a file, not a folder")
    if out.exists() and not out.is_dir():
        raise UsageError(f"argument --out: {out} is a file, not a folder")
    tracking("check", v["tracking_uri"])
    name, journal_dir = v["name"], out / v["name"] / "journal"
    if (holder := lock_holder(out / name / "driver.lock")) is not None:
        raise UsageError(f"argument --name: sweep {name!r} is being run by another process (pid {holder}); wait for it")
    if v["resume"]:
        from sweeps.resume import can_restore

        if not (can_restore(f"{storage.rstrip('/')}/{name}") or (journal_dir / "ops.jsonl").exists()):
            raise UsageError(f"argument --resume: no sweep named {name!r} under {storage}")
        ran = sum(read_meta(journal_dir).get("phases") or [0]) if (journal_dir / "ops.jsonl").exists() else 0
        if v["num_samples"] < ran:
            raise UsageError(
                f"argument --num-samples: sweep {name!r} has {ran} search trials; a resumed sweep keeps them "
                f"all (give {ran}, or more to extend it)"
            )
    elif ("://" not in storage and (Path(storage) / name).exists()) or journal_dir.exists():  # again under the lock
        raise UsageError(f"argument --name: a sweep named {name!r} already exists; add --resume to continue it")
    for flag, folder in (("--out", out), ("--storage-path", None if "://" in storage else Path(storage))):
        if folder is not None:
            writable_folder(folder, flag)
    _check_sources(v)


def writable_folder(folder: Path, flag: str, need_mb: int = 200) -> None:
    """A folder the sweep can write to, with room for its checkpoints and files; exit 2 naming the flag if not
    (a full or read-only disk found mid-sweep would cost the trials already trained)."""
    import shutil

    existing = next(p for p in (folder, *folder.parents) if p.exists())
    if not existing.is_dir():
        raise UsageError(f"argument {flag}: {existing} is a file, not a folder")
    import tempfile

    try:  # a real write: os.access says yes to root on a read-only mount
        with tempfile.TemporaryFile(dir=existing):
            pass
    except OSError as e:
        raise UsageError(f"argument {flag}: {existing} is not writable ({e.strerror or e})") from None
    free_mb = shutil.disk_usage(existing).free / 2**20
    if free_mb < need_mb:
        raise UsageError(
            f"argument {flag}: only {free_mb:.0f} MB free on {existing}; a sweep needs {need_mb} MB or more"
        )


def _check_sources(v: dict) -> None:
    """Each --warm-start sweep: another sweep of this task, with its Optuna study under --out."""
    from sweeps.warmstart import study_path

    for source in v["warm_start"]:
        if source == v["name"]:
            raise UsageError(f"argument --warm-start: {source!r} is this sweep; name earlier sweeps")
        if not study_path(v["out"], source).is_file():
            raise UsageError(f"argument --warm-start: no sweep {source!r} with an Optuna study under {v['out']}")
        warmstart.check(study_path(v["out"], source), source)  # an Optuna study of that name, read-only, before Ray
        task = read_meta(v["out"] / source / "journal").get("task")
        if task not in (None, v["task"]):
            raise UsageError(f"argument --warm-start: {source!r} is a {task} sweep, not {v['task']}")


def storage_uri(path: str) -> str:
    return path if "://" in path else str(Path(path).expanduser().resolve())


def check_reachable(address: str, timeout: float) -> None:
    """Wait up to `timeout` seconds for the cluster's port to accept a TCP connection; exit 2 if it never does.

    Ray's own connect retries for many minutes, and in C++ where SIGTERM is not seen.
    """
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
                raise UsageError(
                    f"argument --address: nothing answers at {address} after {timeout:g} s "
                    f"({e.strerror or type(e).__name__}); check the address, or raise --connect-timeout"
                ) from None
        time.sleep(min(1.0, max(0.0, deadline - time.monotonic())))


def parse_fix(items: list[str], base: TrainConfig) -> dict:
    """`--fix name=value` pairs, typed by TrainConfig's field; raises UsageError on a bad name or value."""
    types = {f.name: str(f.type) for f in dataclasses.fields(TrainConfig)}
    allowed = sorted(set(types) - {"task", "tags", "subset", "eval_subset", "seed", "split_seed"})
    fixed: dict = {}
    for item in items:
        name, sep, raw = item.partition("=")
        name = name.strip().replace("-", "_")
        if not sep or not raw:
            raise UsageError(f"argument --fix: expected name=value, got {item!r}")
        if name not in allowed:
            raise UsageError(f"argument --fix: unknown parameter {name!r}; known: {', '.join(allowed)}")
        fixed[name] = _typed(name, raw, types[name])
    try:
        base.replace(**fixed)
    except ConfigError as e:
        raise UsageError(f"argument --fix: {e}") from None
    if fixed.get("optimizer") == "sgd" and "amsgrad" in fixed:
        raise UsageError("argument --fix: amsgrad only applies to adam and adamw")
    if fixed.get("optimizer") in ("adam", "adamw") and "momentum" in fixed:
        raise UsageError("argument --fix: momentum only applies to sgd")
    return fixed


def _typed(name: str, raw: str, kind: str) -> object:
    try:
        if name == "model":
            from cnnclf.models import model_names

            if raw not in model_names():
                raise UsageError(f"argument --fix: unknown model {raw!r}; known: {', '.join(model_names())}")
        if "bool" in kind:
            if raw.lower() not in ("true", "false", "1", "0", "yes", "no"):
                raise ValueError(raw)
            return raw.lower() in ("true", "1", "yes")
        if "int" in kind:
            return int(raw)
        if "float" in kind:
            if not math.isfinite(value := float(raw)):
                raise ValueError(raw)
            return value
        return raw
    except ValueError:
        raise UsageError(f"argument --fix: {name}={raw!r} is not a valid {kind}") from None
