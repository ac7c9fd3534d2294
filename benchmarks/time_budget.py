"""Anytime quality of a sweep: how soon it beats the documented baseline, and what it has at a deadline.

    python benchmarks/time_budget.py --data-dir /tmp/data/cifar10-jpg --budget-by time --minutes 32
    python benchmarks/time_budget.py --data-dir /tmp/data/cifar10-jpg --budget-by epochs --minutes 32

Runs `sweeps/cifar10.py --num-samples 8 --max-epochs 3 --confirm 0` (plus the given --budget-by and
any extra flags after `--`) as a user would, stops it with Ctrl-C (SIGINT: its state is saved) after
--minutes if it has not ended, then reads its MLflow runs. Prints, from the command's start:

    first_beat_min   when the first search trial whose final val/acc beats 61% ended
    at_<N>_min       the sweep's answer at N minutes (--at, repeatable): the completed search trial with
                     the best val/acc among those ended by then, its val/acc and test/acc
    outcomes         how its trials ended (completed, early_stopped, too_slow, ...)

Run it with nothing else on the machine: the figures are wall times.
"""

from __future__ import annotations

import argparse
import json
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
DOCUMENTED = 0.61


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--data-dir", type=Path, required=True)
    p.add_argument("--budget-by", choices=["time", "epochs"], default="time")
    p.add_argument("--minutes", type=float, default=32.0, help="stop the sweep (Ctrl-C) after this long")
    p.add_argument("--at", type=float, action="append", default=None, help="report the best at N minutes")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--keep", type=Path, default=None, help="keep the store here (default: a temporary folder)")
    p.add_argument("extra", nargs="*", help="more sweep flags, after --")
    args = p.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        root = args.keep or Path(tmp)
        root.mkdir(parents=True, exist_ok=True)
        name = f"{args.budget_by}-{args.seed}"
        cmd = [
            sys.executable, str(ROOT / "sweeps" / "cifar10.py"), "--data-dir", str(args.data_dir.resolve()),
            "--no-download", "--num-samples", "8", "--max-epochs", "3", "--confirm", "0",
            "--budget-by", args.budget_by, "--seed", str(args.seed), "--name", name, "--out", str(root / "out"),
            "--tracking-uri", f"sqlite:///{root / 'mlflow.db'}", "--storage-path", str(root / "ray"), *args.extra,
        ]  # fmt: skip
        t0 = time.time()
        log = open(root / f"{name}.log", "w")  # noqa: SIM115 (the sweep's output, kept beside the store)
        proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, text=True)
        try:
            proc.wait(timeout=args.minutes * 60)
        except subprocess.TimeoutExpired:
            proc.send_signal(signal.SIGINT)
            proc.wait(timeout=600)
        wall = time.time() - t0
        log.close()
        out = {"budget_by": args.budget_by, "exit": proc.returncode, "wall_min": round(wall / 60, 1)}
        out |= measure(root, name, t0, args.at or [10.0, 30.0])
        print(json.dumps(out, indent=1))


def measure(root: Path, name: str, t0: float, at: list[float]) -> dict:
    from mlflow.tracking import MlflowClient

    c = MlflowClient(f"sqlite:///{root / 'mlflow.db'}")
    exp = c.get_experiment_by_name("cifar10")
    runs = c.search_runs([exp.experiment_id], f"tags.sweep = '{name}'", max_results=1000)
    trials = [r for r in runs if r.data.tags.get("role") == "trial" and r.info.end_time]
    outcomes: dict[str, int] = {}
    for r in runs:
        if r.data.tags.get("role") in ("trial", "baseline"):
            status = r.data.tags.get("status", "?")
            outcomes[status] = outcomes.get(status, 0) + 1

    def ended_min(r) -> float:
        return (r.info.end_time / 1000 - t0) / 60

    beat = [ended_min(r) for r in trials if r.data.metrics.get("val/acc", 0) > DOCUMENTED]
    res: dict = {"first_beat_min": round(min(beat), 1) if beat else None, "outcomes": outcomes}
    for m in at:
        done = [r for r in trials if ended_min(r) <= m and r.data.tags.get("status") == "completed"]
        best = max(done, key=lambda r: r.data.metrics.get("val/acc", 0), default=None)
        res[f"at_{m:g}_min"] = (
            None
            if best is None
            else {
                "trial": best.data.tags.get("trial_id"),
                "val_acc": round(best.data.metrics.get("val/acc", 0), 4),
                "test_acc": round(best.data.metrics.get("test/acc", 0), 4),
            }
        )
    base = [r for r in runs if r.data.tags.get("role") == "baseline" and r.info.end_time]
    if base:
        res["baseline"] = {"ended_min": round(ended_min(base[0]), 1), "test_acc": base[0].data.metrics.get("test/acc")}
    return res


if __name__ == "__main__":
    main()
