"""Does --warm-start pay? Cold and warm-started sweeps of the same seed and budget, best val/acc after each trial.

    python benchmarks/warm_start.py --data-dir /tmp/data/cifar10-jpg --pairs 1 --num-samples 6 --subset 4000

For each pair i: an earlier sweep `src-i` (seed 100 + i), then with seed i and the same budget a cold
sweep `cold-i` and a sweep `warm-i` warm-started from `src-i`. All run `sweeps/cifar10.py` as a user
would (real subprocesses, Ray, Optuna, MLflow), without the baseline or confirmation runs, so every
trial is a search trial. Prints, for each sweep, the best val/acc after its 1st, 2nd, ... search
trial to end (by end time), and the wall time; one pair is one sample of a noisy process.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--data-dir", type=Path, required=True)
    p.add_argument("--pairs", type=int, default=1)
    p.add_argument("--first", type=int, default=0, help="number of the first pair (seeds first.., 100 + first..)")
    p.add_argument("--num-samples", type=int, default=6)
    p.add_argument("--max-epochs", type=int, default=2)
    p.add_argument("--subset", type=int, default=4000)
    p.add_argument("--max-concurrent", type=int, default=2)
    p.add_argument("--keep", type=Path, default=None, help="keep the stores here (default: a temporary folder)")
    args = p.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        root = args.keep or Path(tmp)
        root.mkdir(parents=True, exist_ok=True)
        results = {}
        for i in range(args.first, args.first + args.pairs):
            for name, seed, extra in ((f"src-{i}", 100 + i, []), (f"cold-{i}", i, []), (f"warm-{i}", i, [f"src-{i}"])):
                results[name] = run(args, root, name, seed, extra)
                print(line(name, results[name]), flush=True)
        print(json.dumps(results))


def run(args: argparse.Namespace, root: Path, name: str, seed: int, warm: list[str]) -> dict:
    cmd = [
        sys.executable, str(ROOT / "sweeps" / "cifar10.py"), "--data-dir", str(args.data_dir.resolve()),
        "--no-download", "--num-samples", str(args.num_samples), "--max-epochs", str(args.max_epochs),
        "--subset", str(args.subset), "--max-concurrent", str(args.max_concurrent), "--no-baseline",
        "--confirm", "0", "--seed", str(seed), "--name", name, "--out", str(root / "out"),
        "--tracking-uri", f"sqlite:///{root / 'mlflow.db'}", "--storage-path", str(root / "ray"),
    ]  # fmt: skip
    for w in warm:
        cmd += ["--warm-start", w]
    t0 = time.monotonic()
    r = subprocess.run(cmd, capture_output=True, text=True)
    wall = time.monotonic() - t0
    if r.returncode != 0:
        sys.exit(f"{name}: exit {r.returncode}: {r.stderr.strip().splitlines()[-1:]}")
    return {"wall_s": round(wall, 1), "best_after": best_after(root, name), "seed": seed, "warm_start": warm}


def best_after(root: Path, name: str) -> list[float]:
    """Best val/acc after each search trial, in the order the trials ended (MLflow end times)."""
    from mlflow.tracking import MlflowClient

    c = MlflowClient(f"sqlite:///{root / 'mlflow.db'}")
    exp = c.get_experiment_by_name("cifar10")
    runs = c.search_runs([exp.experiment_id], f"tags.sweep = '{name}' and tags.role = 'trial'", max_results=1000)
    best, out = 0.0, []
    for r in sorted(runs, key=lambda r: r.info.end_time or 0):
        acc = r.data.metrics.get("val/acc")
        if acc is not None and r.data.tags.get("status") in ("completed", "early_stopped"):
            best = max(best, acc)
        out.append(round(best, 4))
    return out


def line(name: str, r: dict) -> str:
    curve = " ".join(f"{x:.3f}" for x in r["best_after"])
    return f"{name:8s} seed {r['seed']:3d} {r['wall_s']:7.1f} s  best val/acc after each trial: {curve}"


if __name__ == "__main__":
    main()
