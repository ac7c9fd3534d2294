"""GPU speed of the training loop, and what it means for a sweep: one command, at most 8 minutes on one H100/H200.

    PYTHONPATH=. python benchmarks/gpu.py --data-dir /tmp/cnnclf-data --json gpu.json
    PYTHONPATH=. python benchmarks/gpu.py --device cpu --quick --data-dir DIR     # the same code, ~1 min on a CPU

DIR holds CIFAR-10 in `DIR/cifar10-jpg` and a Cat/Dog set (the 6,000-image subset carried to the device) in
`DIR/catdog`, in any layout cnnclf reads; `--cifar10-dir` and `--catdog-dir` name them one by one.
benchmarks/device_check.sh prepares them and runs this after the `gpu` tests. Only cnnclf (torch,
torchvision, numpy, PIL, tqdm): no Ray, Optuna or MLflow, which the device machine does not have.

Sections, each printed as a table and written to --json as soon as it is measured:

  throughput  images/s of the second epoch (steady state; the first compiles and warms up) of
              `cnnclf.train.train`, eager against compiled (torch.compile, "reduce-overhead" on CUDA:
              CUDA graphs), with the compile time apart: the tutorial net at batch 4 and 128,
              `cifar10-strong`, `catdog-strong`, and a sweep trial of each task (sweeps/*.py's base
              config) plus the Cat/Dog seed (the catdog sweep's baseline) for the projection.
  packing     1, 2, 4, 8 trial processes (`python -m cnnclf train`, the CIFAR-10 sweep trial) at
              once on one device: aggregate images/s, and trials per hour of a 15-epoch trial
              (each process's fixed cost, start to exit less its epochs, plus 15 of its epochs).
  accuracy    `cifar10-strong` for its 40 epochs on all of CIFAR-10, and `catdog-strong` for 40 on the
              Cat/Dog set given: test accuracy, wall time, and when val/acc first reached the target.
  projection  LABELLED AS ONE: the wall time of `sweeps/cifar10.py --num-samples 40` and
              `sweeps/catdog.py --num-samples 40` on this one device, from the measured per-epoch
              times, the best packing, ASHA's ideal stops (reduction factor 3, grace 1, max_t 10 and
              15), the baseline, the 3x3 confirmation runs, and a per-trial sweep overhead
              (--sweep-overhead-s, measured by benchmarks/sweep.py).
  modes       torch.compile's "default" mode (no CUDA graphs) for the four throughput configs: the
              measurement that picks the mode, run last as it is the first to give way to the budget.

They run in order of importance: the four throughput configs of the issue, packing, accuracy, the
throughput of the sweep trials and baselines, the projection, the modes. Measurements that would
start after --budget-s are skipped and listed in the JSON's "skipped"; `--sections ... --merge`
measures only those sections again and keeps the rest of an earlier --json.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import platform
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from cnnclf.config import PRESETS, SWEEP_BASES, TrainConfig
from cnnclf.data import TaskData, load_task, stratified_subset
from cnnclf.train import COMPILE_MODES, resolve_device, train
from sweeps.budget import expected_fraction  # Ray-free: the device machine has no Ray

ROOT = Path(__file__).resolve().parents[1]

# The sweeps' base trial configs (sweeps/*.py SPEC.base: declared in cnnclf/config.py, since importing
# sweeps/ imports Ray).
CIFAR10_TRIAL, CATDOG_TRIAL = SWEEP_BASES["cifar10"], SWEEP_BASES["catdog"]
# What the projection assumes of the sweeps (sweeps/cli.py defaults, sweeps/*.py default_max_epochs).
SWEEPS = {
    "cifar10": {
        "max_t": 5,
        "trial": "cifar10 trial",
        "baseline": "cifar10-seed",
        "baseline_row": "tutorial b4",
        "train_images": 45_000,
    },
    "catdog": {  # Kaggle's 25,000 labelled photos less 10% test and 10% of the rest for validation
        "max_t": 15,
        "trial": "catdog trial",
        "baseline": "catdog-seed",
        "baseline_row": "catdog-seed",
        "train_images": 20_250,
    },
}
ASHA = {"reduction_factor": 3, "grace_period": 1}
SECTIONS = ("throughput", "packing", "accuracy", "projection", "modes")
CONFIRM = {"confirm": 3, "confirm_top": 3}  # --confirm 3 seeds of the --confirm-top 3 configs, max_t epochs each
TARGETS = {"cifar10": 0.93, "catdog": 0.95}  # val/acc the accuracy section times (the test targets)


@dataclass(frozen=True)
class Row:
    name: str
    task: str
    cfg: TrainConfig
    images: int | None  # training images per epoch (None: all)
    modes: tuple[str, ...] = ("eager", "compiled")


def rows_for(quick: bool, on_cpu: bool) -> list[Row]:
    seed = PRESETS["cifar10-seed"]
    rows = [
        Row("tutorial b4", "cifar10", seed, 8_000),
        Row("tutorial b128", "cifar10", seed.replace(batch_size=128), 45_000),
        Row("cifar10-strong", "cifar10", PRESETS["cifar10-strong"], 45_000),
        Row("catdog-strong", "catdog", PRESETS["catdog-strong"], None),
        Row("cifar10 trial", "cifar10", CIFAR10_TRIAL, 45_000),
        Row("catdog trial", "catdog", CATDOG_TRIAL, None),
        Row("catdog-seed", "catdog", PRESETS["catdog-seed"], 2_000, ("compiled",)),
    ]
    if not quick:
        return rows
    # --quick: the same rows and code, sized for a CPU minute: few images, narrow nets, 32-pixel Cat/Dog,
    # and (on the CPU, where each compile takes tens of seconds) one compiled row.
    small = []
    for r in rows:
        cfg = r.cfg.replace(width=min(r.cfg.width, 8), image_size=32)
        modes = r.modes if not on_cpu or r.name == "tutorial b128" else tuple(m for m in r.modes if m == "eager")
        small.append(dataclasses.replace(r, cfg=cfg, images=256, modes=modes or ("eager",)))
    return small


# ---------------------------------------------------------------------------------------------


class Bench:
    def __init__(self, args: argparse.Namespace) -> None:
        self.args = args
        self.device = resolve_device(args.device)
        self.started = time.monotonic()
        self.out: dict = {
            "meta": meta(self.device, args),
            "throughput": [],
            "packing": [],
            "accuracy": [],
            "projection": [],
            "modes": [],
            "skipped": [],
        }
        self._data: dict[str, TaskData] = {}

    def elapsed(self) -> float:
        return time.monotonic() - self.started

    def over_budget(self, what: str) -> bool:
        if self.elapsed() < self.args.budget_s:
            return False
        self.out["skipped"].append(f"{what} (budget {self.args.budget_s:.0f} s spent)")
        print(f"  skipped: {what} (past --budget-s {self.args.budget_s:.0f})", flush=True)
        return True

    def save(self) -> None:
        self.out["meta"]["elapsed_s"] = round(self.elapsed(), 1)
        path = Path(self.args.json)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(path.name + ".tmp")
        tmp.write_text(json.dumps(self.out, indent=1))
        os.replace(tmp, path)

    def data(self, task: str) -> TaskData:
        if task not in self._data:
            t = time.monotonic()
            where = self.args.cifar10_dir if task == "cifar10" else self.args.catdog_dir
            size = 32 if task == "cifar10" or self.args.quick else 128
            data = load_task(task, where, image_size=size, download_missing=False, progress=False)
            self._data[task] = data.to(self.device)
            n = {k: len(getattr(data, f"{k}_y")) for k in ("train", "val", "test")}
            self.out["meta"].setdefault("data", {})[task] = {"dir": str(where), "load_s": time.monotonic() - t, **n}
            print(f"{task}: {n} images from {where} ({time.monotonic() - t:.1f} s)", flush=True)
        return self._data[task]

    # --- throughput ---------------------------------------------------------------------------

    def throughput(self, row: Row, mode: str) -> dict | None:
        if self.over_budget(f"throughput {row.name} {mode}"):
            return None
        data = self.data(row.task)
        data = trimmed(data, row.images, eval_images=2_000)
        compile_mode = None if mode == "eager" else (COMPILE_MODES[self.device.type] if mode == "compiled" else mode)
        cfg = row.cfg.replace(epochs=2, compile="off" if compile_mode is None else compile_mode)
        epochs: list[dict] = []
        t = time.monotonic()
        result = train(cfg, data, lambda e, m, s: epochs.append(m), device=self.device)
        last = epochs[-1]
        rec = {
            "row": row.name,
            "mode": mode if compile_mode is None else compile_mode,
            "batch_size": cfg.batch_size,
            "images": len(data.train_y),
            "img_s": round(last["throughput/train_img_s"], 1),
            "epoch_s": round(last["time/epoch_s"], 3),
            "compile_s": round(result["time/compile_s"], 2) if "time/compile_s" in result else None,
            "wall_s": round(time.monotonic() - t, 2),
        }
        print(
            f"  {row.name:<15s} {rec['mode']:<16s} batch {cfg.batch_size:4d}: {rec['img_s']:10.0f} img/s"
            + (f"   compile {rec['compile_s']:6.1f} s" if rec["compile_s"] is not None else ""),
            flush=True,
        )
        return rec

    # --- packing ------------------------------------------------------------------------------

    def packing(self, k: int) -> dict | None:
        if self.over_budget(f"packing {k}"):
            return None
        quick = self.args.quick
        epochs = 2  # the last one is timed: the first has the compile (and warm-up)
        cfg = CIFAR10_TRIAL.replace(epochs=epochs, subset=256 if quick else None, width=8 if quick else 32)
        self.data("cifar10")  # decoded and cached before the processes start: they read the cache
        cmd = [sys.executable, "-m", "cnnclf", "train", *cfg.cli_args(), "--data-dir", str(self.args.cifar10_dir)]
        cmd += ["--device", self.device.type, "--no-download", "--json"]
        env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))}
        share = str(max(1, (os.cpu_count() or 1) // k))  # each process its share of the CPUs, as Ray gives a trial
        env |= {"OMP_NUM_THREADS": share, "TORCHINDUCTOR_COMPILE_THREADS": share}
        t0 = time.monotonic()
        procs = []
        for i in range(k):
            p = subprocess.Popen(
                [*cmd, "--seed", str(i)], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env, cwd=ROOT
            )
            procs.append((p, time.monotonic()))
        runs, errors = [], []
        for p, started in procs:
            out, err = p.communicate(timeout=self.args.process_timeout_s)
            wall = time.monotonic() - started
            if p.returncode != 0:
                errors.append(f"exit {p.returncode}: {err.strip().splitlines()[-1] if err.strip() else ''}")
                continue
            r = json.loads(out.strip().splitlines()[-1])
            runs.append(
                {"wall_s": wall, "epoch_s": r["time/epoch_s"], "img_s": r["throughput/train_img_s"]}
                | {
                    "compile_s": r.get("time/compile_s"),
                    "fixed_s": wall - epochs * r["time/epoch_s"],  # start-up, data, compile, test evaluation
                }
            )
        span = time.monotonic() - t0
        if not runs:
            rec = {"processes": k, "errors": errors}
            print(f"  {k} processes: all failed: {errors[:1]}", flush=True)
            return rec
        epoch_s = sum(r["epoch_s"] for r in runs) / len(runs)
        fixed_s = sum(r["fixed_s"] for r in runs) / len(runs)
        trial15_s = fixed_s + 15 * epoch_s
        rec = {
            "processes": k,
            "ok": len(runs),
            "errors": errors,
            "aggregate_img_s": round(sum(r["img_s"] for r in runs), 1),
            "epoch_s": round(epoch_s, 3),
            "fixed_s": round(fixed_s, 2),
            "compile_s": max((r["compile_s"] or 0.0) for r in runs),
            "trial15_s": round(trial15_s, 1),
            "trials_per_hour": round(len(runs) * 3600 / trial15_s, 1),
            "span_s": round(span, 1),
            "images_per_epoch": len(self.data("cifar10").train_y) if not quick else cfg.subset,
        }
        print(
            f"  {k} processes: {rec['aggregate_img_s']:10.0f} img/s together, epoch {epoch_s:6.2f} s, "
            f"fixed {fixed_s:5.1f} s, {rec['trials_per_hour']:7.1f} 15-epoch trials/h"
            + (f"  ({len(errors)} failed: {errors[0]})" if errors else ""),
            flush=True,
        )
        return rec

    # --- time to accuracy -----------------------------------------------------------------------

    def accuracy(self, name: str, task: str) -> dict | None:
        if self.over_budget(f"accuracy {name}"):
            return None
        cfg = PRESETS[name]
        data = self.data(task)
        if self.args.quick:
            cfg = cfg.replace(epochs=2, width=8, image_size=32)
            data = trimmed(data, 256, eval_images=256)
        history: list[tuple[int, float, float]] = []
        result = train(
            cfg, data, lambda e, m, s: history.append((e, m["val/acc"], m["time/epoch_s"])), device=self.device
        )
        target = TARGETS[task]
        reached = next(
            ((e, sum(h[2] for h in history[: i + 1])) for i, (e, v, _) in enumerate(history) if v >= target), None
        )
        rec = {
            "preset": name,
            "epochs": result["epochs"],
            "train_images": len(data.train_y),
            "test_acc": round(result.get("test/acc", float("nan")), 4),
            "val_acc": round(result.get("val/acc", float("nan")), 4),
            "seconds": round(result["seconds"], 1),  # train()'s wall time: data to device, compile, epochs, test
            "epochs_s": round(sum(h[2] for h in history), 1),  # the epochs alone (training and validation)
            "compile_s": round(result["time/compile_s"], 1) if "time/compile_s" in result else None,
            "img_s": round(result["throughput/train_img_s"], 1),
            "target_val_acc": target,
            "target_epoch": reached[0] if reached else None,
            "target_s": round(reached[1], 1) if reached else None,
        }
        print(
            f"  {name:<15s} {rec['epochs']:3d} epochs on {rec['train_images']} images: test/acc {rec['test_acc']:.4f} "
            f"in {rec['seconds']:.1f} s ({rec['epochs_s']:.1f} s of epochs); val/acc >= {target} "
            + (f"at epoch {reached[0]} ({reached[1]:.1f} s)" if reached else "not reached"),
            flush=True,
        )
        return rec

    # --- projection -------------------------------------------------------------------------------

    def projection(self) -> list[dict]:
        packs = [p for p in self.out["packing"] if p.get("ok")]
        if not packs:
            self.out["skipped"].append("projection (no packing measured)")
            return []
        best = max(packs, key=lambda p: p["trials_per_hour"])
        one = next((p for p in packs if p["processes"] == 1), best)
        slowdown = best["epoch_s"] / one["epoch_s"]  # an epoch's time at the best packing against alone
        # Start-up and data of a trial process, without its compile (the packed runs found it cached).
        start_up = max(0.0, best["fixed_s"] - (best["compile_s"] or 0.0))
        measured = {(r["row"], r["mode"] != "eager"): r for r in self.out["throughput"]}
        out = []
        for task, sweep in SWEEPS.items():
            max_t = 1 if self.args.quick else sweep["max_t"]
            for compiled in (True, False):
                trial = measured.get((sweep["trial"], compiled))
                base = measured.get((sweep["baseline_row"], compiled)) or measured.get((sweep["baseline_row"], True))
                if trial is None or base is None:
                    continue
                n = trial["images"] if self.args.quick else sweep["train_images"]
                # An epoch: n training images at the measured pace, slowed as packing slowed the CIFAR-10
                # trial, plus validation (n / 9 images, about 3x faster each without a backward pass).
                per_epoch = slowdown * n * (1 + 1 / 27) / trial["img_s"]
                base_epoch = slowdown * n * (1 + 1 / 27) / base["img_s"]
                fixed = start_up + (trial["compile_s"] or 0.0) + self.args.sweep_overhead_s
                base_fixed = start_up + (base["compile_s"] or 0.0) + self.args.sweep_overhead_s
                e_search = asha_expected_epochs(max_t, ASHA["grace_period"], ASHA["reduction_factor"])
                n_confirm = CONFIRM["confirm"] * CONFIRM["confirm_top"]
                base_epochs = min(PRESETS[sweep["baseline"]].epochs, max_t)
                work = (
                    self.args.num_samples * (fixed + e_search * per_epoch)
                    + (base_fixed + base_epochs * base_epoch)
                    + n_confirm * (fixed + max_t * per_epoch)
                )
                wall = work / best["processes"]  # the slots kept full; the last trials' tail is left out
                rec = {
                    "label": "PROJECTION, not a measurement",
                    "sweep": f"sweeps/{task}.py --num-samples {self.args.num_samples}",
                    "compile": "auto (on)" if compiled else "off",
                    "packing": best["processes"],
                    "trials": f"{self.args.num_samples} search + 1 baseline + {n_confirm} confirmation",
                    "asha_expected_epochs": round(e_search, 3),
                    "epoch_s": round(per_epoch, 2),
                    "baseline_epoch_s": round(base_epoch, 2),
                    "fixed_s_per_trial": round(fixed, 2),
                    "work_min": round(work / 60, 1),
                    "wall_min": round(wall / 60, 1),
                }
                out.append(rec)
                print(
                    f"  {rec['sweep']:<36s} compile {rec['compile']:<9s}: {rec['wall_min']:6.1f} min "
                    f"({best['processes']} at a time, {e_search:.2f} epochs/trial expected, epoch {per_epoch:.2f} s, "
                    f"fixed {fixed:.1f} s/trial)",
                    flush=True,
                )
        return out


def asha_expected_epochs(max_t: int, grace: int = 1, rf: int = 3) -> float:
    """Epochs a search trial trains under ASHA if each rung keeps exactly its top 1/rf: rungs at
    grace * rf**i below max_t; the survivors of the last rung train to max_t (sweeps/budget.py's share)."""
    rungs = [grace * rf**i for i in range(64) if grace * rf**i < max_t]
    return max_t * expected_fraction(rungs, max_t, rf)


def trimmed(data: TaskData, train_images: int | None, eval_images: int | None = None) -> TaskData:
    """Seeded stratified subsets of the training split and (eval_images each) of val and test."""
    changes = {}
    for split, n in (("train", train_images), ("val", eval_images), ("test", eval_images)):
        x, y = getattr(data, f"{split}_x"), getattr(data, f"{split}_y")
        if n is not None and n < len(y):
            idx = stratified_subset(y.cpu(), n, seed=0).to(y.device)
            changes |= {f"{split}_x": x[idx], f"{split}_y": y[idx]}
    return dataclasses.replace(data, **changes)


def meta(device: torch.device, args: argparse.Namespace) -> dict:
    m = {
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else f"cpu ({os.cpu_count()} cores)",
        "torch": torch.__version__,
        "python": platform.python_version(),
        "threads": torch.get_num_threads(),
        "date": time.strftime("%Y-%m-%d %H:%M:%S"),
        "quick": args.quick,
        "command": " ".join([Path(sys.argv[0]).name, *sys.argv[1:]]),
        "sweep_overhead_s": args.sweep_overhead_s,
    }
    if device.type == "cuda":
        m["memory_gib"] = round(torch.cuda.get_device_properties(device).total_memory / 2**30, 1)
    return m


def table(title: str, header: list[str], rows: list[list[object]]) -> str:
    cells = [header] + [
        ["" if c is None else (f"{c:,.0f}" if isinstance(c, float) and c >= 100 else str(c)) for c in r] for r in rows
    ]
    widths = [max(len(r[i]) for r in cells) for i in range(len(header))]
    lines = [title] + [
        "  ".join(c.rjust(w) if i else c.ljust(w) for i, (c, w) in enumerate(zip(r, widths, strict=True))).rstrip()
        for r in cells
    ]
    return "\n".join(lines)


def summary(out: dict) -> str:
    tp: dict[str, dict] = {}
    for r in out["throughput"] + out["modes"]:
        tp.setdefault(r["row"], {})[r["mode"]] = r
    modes = sorted({m for v in tp.values() for m in v}, key=lambda m: (m != "eager", m))
    parts = [
        table(
            f"throughput: images/s of a steady epoch ({out['meta']['device']}; compile s in brackets)",
            ["config", "batch", *modes],
            [
                [name, next(iter(v.values()))["batch_size"]]
                + [
                    (f"{v[m]['img_s']:,.0f}" + (f" ({v[m]['compile_s']:.0f} s)" if v[m]["compile_s"] else ""))
                    if m in v
                    else "-"
                    for m in modes
                ]
                for name, v in tp.items()
            ],
        )
    ]
    if out["packing"]:
        one = next((p for p in out["packing"] if p["processes"] == 1 and p.get("ok")), None)
        parts.append(
            table(
                "packing: CIFAR-10 sweep trials (cnn depth 4 width 32, batch 128) as processes on one device",
                ["processes", "img/s together", "x one", "epoch s", "fixed s", "15-epoch trials/h", "failed"],
                [
                    [
                        p["processes"],
                        p.get("aggregate_img_s"),
                        f"{p['aggregate_img_s'] / one['aggregate_img_s']:.2f}" if one and p.get("ok") else None,
                        p.get("epoch_s"),
                        p.get("fixed_s"),
                        p.get("trials_per_hour"),
                        len(p.get("errors", [])),
                    ]
                    for p in out["packing"]
                ],
            )
        )
    if out["accuracy"]:
        parts.append(
            table(
                "time to accuracy",
                ["preset", "epochs", "train images", "test/acc", "wall s", "epochs s", "compile s", "val>=target at"],
                [
                    [
                        a["preset"],
                        a["epochs"],
                        a["train_images"],
                        a["test_acc"],
                        a["seconds"],
                        a["epochs_s"],
                        a["compile_s"],
                        f"epoch {a['target_epoch']}, {a['target_s']} s" if a["target_epoch"] else "-",
                    ]
                    for a in out["accuracy"]
                ],
            )
        )
    if out["projection"]:
        parts.append(
            table(
                "PROJECTION (not measured): sweep wall time on this one device",
                ["sweep", "compile", "at a time", "epochs/trial", "epoch s", "fixed s/trial", "wall min"],
                [
                    [
                        p["sweep"],
                        p["compile"],
                        p["packing"],
                        p["asha_expected_epochs"],
                        p["epoch_s"],
                        p["fixed_s_per_trial"],
                        p["wall_min"],
                    ]
                    for p in out["projection"]
                ],
            )
        )
    if out["skipped"]:
        parts.append("skipped: " + "; ".join(out["skipped"]))
    return "\n\n".join(parts)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--data-dir", type=Path, default=Path("data"), help="holds cifar10-jpg/ and catdog/")
    p.add_argument("--cifar10-dir", type=Path, help="CIFAR-10 (default: DATA_DIR/cifar10-jpg)")
    p.add_argument("--catdog-dir", type=Path, help="Cat/Dog (default: DATA_DIR/catdog)")
    p.add_argument("--device", choices=["auto", "cuda", "cpu"], default="auto")
    p.add_argument("--quick", action="store_true", help="tiny sizes: the same code paths in about a minute")
    p.add_argument("--json", default="gpu-benchmark.json", help="where the results go (rewritten after each step)")
    p.add_argument("--sections", default=",".join(SECTIONS), help=f"comma-separated subset of {','.join(SECTIONS)}")
    p.add_argument(
        "--merge", action="store_true", help="keep the other sections' results from an existing --json (a rerun)"
    )
    p.add_argument("--packing", default="1,2,4,8", help="process counts for the packing section")
    p.add_argument("--num-samples", type=int, default=40, help="search trials of the projected sweeps")
    p.add_argument(
        "--sweep-overhead-s",
        type=float,
        default=0.48,
        help="the sweep's own cost per trial (benchmarks/sweep.py measured 0.48 s on the CPU)",
    )
    p.add_argument("--budget-s", type=float, default=450.0, help="start no measurement after this many seconds")
    p.add_argument("--process-timeout-s", type=float, default=300.0, help="per packed training process")
    args = p.parse_args(argv)
    args.cifar10_dir = args.cifar10_dir or args.data_dir / "cifar10-jpg"
    args.catdog_dir = args.catdog_dir or args.data_dir / "catdog"
    args.sections = [s.strip() for s in args.sections.split(",") if s.strip()]
    unknown = set(args.sections) - set(SECTIONS)
    if unknown:
        p.error(f"unknown section(s): {', '.join(sorted(unknown))}")
    args.packing = [int(k) for k in args.packing.split(",") if k.strip()]
    if args.quick and args.packing == [1, 2, 4, 8]:
        args.packing = [1, 2]
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    bench = Bench(args)
    print(f"benchmarks/gpu.py on {bench.out['meta']['device']}, torch {torch.__version__}", flush=True)
    if args.merge and Path(args.json).is_file():  # keep what an earlier run measured of the other sections
        earlier = json.loads(Path(args.json).read_text())
        for section in SECTIONS:
            if section not in args.sections:
                bench.out[section] = earlier.get(section, [])
        bench.out["skipped"] = [s for s in earlier.get("skipped", []) if s.split()[0] not in args.sections]
        bench.out["meta"]["merged_from"] = earlier.get("meta", {}).get("date")
    rows = rows_for(args.quick, bench.device.type == "cpu")

    def throughput(rows: list[Row]) -> None:
        for row in rows:
            for mode in row.modes:
                if (rec := bench.throughput(row, mode)) is not None:
                    bench.out["throughput"].append(rec)
                    bench.save()

    if "throughput" in args.sections:
        print("throughput", flush=True)
        throughput(rows[:4])  # the four configs first: the budget drops the last measurements
    if "packing" in args.sections:
        print("packing", flush=True)
        for k in args.packing:
            if (rec := bench.packing(k)) is not None:
                bench.out["packing"].append(rec)
                bench.save()
    if "accuracy" in args.sections:
        print("accuracy", flush=True)
        for name, task in (("cifar10-strong", "cifar10"), ("catdog-strong", "catdog")):
            if (rec := bench.accuracy(name, task)) is not None:
                bench.out["accuracy"].append(rec)
                bench.save()
    if "throughput" in args.sections:
        print("throughput: the sweeps' trials and baselines (the projection's inputs)", flush=True)
        throughput(rows[4:])
    if "projection" in args.sections:
        print("projection (from the figures above; not a measurement)", flush=True)
        bench.out["projection"] = bench.projection()
        bench.save()
    if "modes" in args.sections and bench.device.type == "cuda":
        print("modes: torch.compile without CUDA graphs", flush=True)
        for row in rows[:4]:
            if (rec := bench.throughput(row, "default")) is not None:
                bench.out["modes"].append(rec)
                bench.save()
    print("\n" + summary(bench.out), flush=True)
    print(f"\nwritten to {args.json} ({bench.elapsed():.0f} s)", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
