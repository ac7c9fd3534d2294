"""The sweep's own overhead: wall time of an N-trial sweep against its trials' training time.

    python benchmarks/sweep.py --data-dir /tmp/data/cifar10-jpg --num-samples 8 --subset 2000

Runs `sweeps/cifar10.py` as a user would (a real subprocess: Ray start, data into the
object store, Optuna, checkpoints every epoch, the MLflow writer), with FIFO scheduling
and a fixed small model so every trial trains the same amount. Then:

    work     = a trial's own work in cnnclf.train: every epoch's training and validation
               (time/epoch_s) plus its final test-set evaluation (time/test_s), from MLflow
    ideal    = sum of the trials' work / concurrency
    overhead = (span of the trials - ideal) / N      target: < 2 s per trial on the 2-core CPU

Everything else counts as the sweep's overhead: actor start and imports, fetching the data
from the object store, checkpoints and their upload, Tune's scheduling, Optuna, MLflow
writes and waiting on the driver.

`startup` (process start to the first trial's run in MLflow: imports, data load, Ray start)
is printed separately and also shown folded into the per-trial figure.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--data-dir", type=Path, required=True)
    p.add_argument("--num-samples", type=int, default=8)
    p.add_argument("--epochs", type=int, default=2)
    p.add_argument("--subset", type=int, default=2000)
    p.add_argument("--cpus-per-trial", type=float, default=1)
    p.add_argument("--gpus-per-trial", type=float, default=0)
    p.add_argument("--fix", action="append", default=["width=16", "depth=3", "batch_size=128"])
    args = p.parse_args()

    from mlflow.tracking import MlflowClient

    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        cmd = [
            sys.executable, str(ROOT / "sweeps" / "cifar10.py"), "--data-dir", str(args.data_dir.resolve()),
            "--num-samples", str(args.num_samples), "--max-epochs", str(args.epochs), "--scheduler", "fifo",
            "--no-baseline", "--confirm", "0", "--subset", str(args.subset),
            "--cpus-per-trial", str(args.cpus_per_trial),
            "--gpus-per-trial", str(args.gpus_per_trial), "--tracking-uri", f"sqlite:///{tmp / 'm.db'}",
            "--storage-path", str(tmp / "rr"), "--name", "bench", "--out", str(tmp / "out"), "--no-download",
        ]  # fmt: skip
        for f in args.fix:
            cmd += ["--fix", f]
        t0 = time.time()
        r = subprocess.run(cmd, capture_output=True, text=True, cwd=tmp, env={**os.environ, "PYTHONUNBUFFERED": "1"})
        wall = time.time() - t0
        if r.returncode != 0:
            sys.exit(f"sweep failed ({r.returncode}): {r.stderr[-2000:]}")
        client = MlflowClient(f"sqlite:///{tmp / 'm.db'}")
        exp = client.get_experiment_by_name("cifar10")
        children = [
            run
            for run in client.search_runs([exp.experiment_id], "tags.sweep = 'bench'")
            if run.data.tags["role"] == "trial"
        ]
        train_s = sum(
            m.value
            for c in children
            for key in ("time/epoch_s", "time/test_s")
            for m in client.get_metric_history(c.info.run_id, key)
        )
        first_start = min(c.info.start_time for c in children) / 1000
        last_end = max(c.info.end_time for c in children) / 1000
        import ray

        cpus = os.cpu_count() or 1
        concurrency = min(args.num_samples, max(1, int(cpus // args.cpus_per_trial)))
        ideal = train_s / concurrency
        startup = first_start - t0
        trials_span = last_end - first_start
        out = {
            "trials": len(children),
            "concurrency": concurrency,
            "wall_s": round(wall, 1),
            "startup_s": round(startup, 1),
            "trials_span_s": round(trials_span, 1),
            "sum_trial_work_s": round(train_s, 1),
            "ideal_s": round(ideal, 1),
            "overhead_per_trial_s": round((trials_span - ideal) / len(children), 2),
            "overhead_per_trial_incl_startup_s": round((wall - ideal) / len(children), 2),
            "ray": ray.__version__,
        }
        print(
            f"{len(children)} trials, concurrency {concurrency}: wall {wall:.1f} s (startup {startup:.1f} s, "
            f"trials {trials_span:.1f} s); trial work {train_s:.1f} s / {concurrency} = {ideal:.1f} s ideal\n"
            f"overhead per trial: {out['overhead_per_trial_s']:.2f} s "
            f"({out['overhead_per_trial_incl_startup_s']:.2f} s with startup)"
        )
        print(json.dumps(out))


if __name__ == "__main__":
    main()
