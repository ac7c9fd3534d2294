"""The issue-20 sweeps as a user runs them, timed: wall time, when each baseline was first beaten on val,
the recommended configuration with its confirmed test accuracy, peak memory, and the trials' outcomes.

    python benchmarks/cpu_sweeps.py --task catdog --data-dir /tmp/data/dogs-vs-cats-128/train
    python benchmarks/cpu_sweeps.py --task cifar10 --data-dir /tmp/data/cifar10-jpg
    python benchmarks/cpu_sweeps.py --task cifar10 --data-dir DIR --num-samples 4 -- --max-epochs 1

Runs `sweeps/<task>.py --num-samples N --data-dir DIR` with the sweep's own defaults (plus any flags after
`--`), its store in a temporary folder (or --keep), and samples the memory of the sweep's whole process tree
(the driver, Ray's services and its workers: the sum of their proportional set sizes, so memory they share
is counted once) and the machine's used memory every --every seconds. Then it reads the sweep's MLflow runs
and `best_config.json`, and prints one JSON object and a few lines. Targets (issue 20, the 2-core CPU):
Cat/Dog at 8 trials <= 60 min with >= 90% confirmed test accuracy whose 95% interval is above 88%;
CIFAR-10 <= 30 min with >= 80%; peak memory < 8 GB. Run it with nothing else on the machine.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from sweeps.spec import DOCUMENTED  # noqa: E402 (a leaf module: no Ray, Optuna or MLflow)

SHOWN = ("optimizer", "lr", "batch_size", "depth", "width", "kernel_size", "image_size", "epochs")
TARGETS = {"catdog": {"minutes": 60, "test": 0.90, "ci_above": 0.88}, "cifar10": {"minutes": 30, "test": 0.80}}


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--task", choices=sorted(TARGETS), required=True)
    p.add_argument("--data-dir", type=Path, required=True)
    p.add_argument("--num-samples", type=int, default=8)
    p.add_argument("--keep", type=Path, default=None, help="keep the sweep's store here (default: a temporary one)")
    p.add_argument("--every", type=float, default=2.0, help="seconds between memory samples")
    p.add_argument("extra", nargs="*", help="more sweep flags, after --")
    args = p.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        root = (args.keep or Path(tmp)).resolve()
        root.mkdir(parents=True, exist_ok=True)
        out = run(args, root)
    print(json.dumps(out, indent=1))
    for line in lines(out):
        print(line)
    return 0 if out["exit"] == 0 else 1


def run(args: argparse.Namespace, root: Path) -> dict:
    name = f"bench-{args.task}"
    cmd = [
        sys.executable, str(ROOT / "sweeps" / f"{args.task}.py"), "--num-samples", str(args.num_samples),
        "--data-dir", str(args.data_dir.resolve()), "--no-download", "--name", name, "--out", str(root / "out"),
        "--tracking-uri", f"sqlite:///{root / 'mlflow.db'}", "--storage-path", str(root / "ray"), *args.extra,
    ]  # fmt: skip
    print("$ " + " ".join(cmd), flush=True)
    t0 = time.time()
    with open(root / f"{name}.log", "w") as log:
        proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, text=True, cwd=root)
        memory = Memory(proc.pid, args.every)
        memory.start()
        proc.wait()
        memory.stop()
    wall = time.time() - t0
    out = {"task": args.task, "command": cmd, "exit": proc.returncode, "wall_min": round(wall / 60, 1)}
    out["log"] = str(root / f"{name}.log")
    out["peak_tree_gb"], out["peak_used_gb"] = round(memory.peak_tree / 2**30, 2), round(memory.peak_used / 2**30, 2)
    out |= measure(root, args.task, name, t0)
    return out


class Memory(threading.Thread):
    """Peak memory while the sweep runs: its process tree's summed Pss (Linux /proc), and the machine's used
    memory (MemTotal - MemAvailable) above what it was at the start."""

    def __init__(self, pid: int, every: float) -> None:
        super().__init__(daemon=True)
        self.pid, self.every, self.done = pid, every, threading.Event()
        self.peak_tree = self.peak_used = 0
        self.used0 = used_bytes()

    def run(self) -> None:
        while not self.done.wait(self.every):
            self.peak_tree = max(self.peak_tree, sum(pss_bytes(p) for p in tree(self.pid)))
            self.peak_used = max(self.peak_used, used_bytes() - self.used0)

    def stop(self) -> None:
        self.done.set()
        self.join()


def tree(pid: int) -> list[int]:
    """`pid` and all its descendants (Ray's services and workers are the driver's)."""
    parents: dict[int, list[int]] = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            text = stat.read_text()
        except OSError:
            continue
        fields = text[text.rindex(")") + 2 :].split()
        parents.setdefault(int(fields[1]), []).append(int(stat.parent.name))
    found, todo = [], [pid]
    while todo:
        p = todo.pop()
        found.append(p)
        todo += parents.get(p, [])
    return found


def pss_bytes(pid: int) -> int:
    try:
        for line in Path(f"/proc/{pid}/smaps_rollup").read_text().splitlines():
            if line.startswith("Pss:"):
                return int(line.split()[1]) * 1024
    except (OSError, ValueError):
        pass
    return 0


def used_bytes() -> int:
    info = {}
    for line in Path("/proc/meminfo").read_text().splitlines():
        key, value = line.split(":", 1)
        info[key] = int(value.split()[0]) * 1024
    return info["MemTotal"] - info["MemAvailable"]


def measure(root: Path, task: str, name: str, t0: float) -> dict:
    """What the sweep's MLflow runs and best_config.json say, with times from the command's start."""
    from mlflow.tracking import MlflowClient

    c = MlflowClient(f"sqlite:///{root / 'mlflow.db'}")
    exp = c.get_experiment_by_name(task)
    runs = c.search_runs([exp.experiment_id], f"tags.sweep = '{name}'", max_results=1000) if exp else []
    res: dict = {"outcomes": {}}
    for r in runs:
        role = r.data.tags.get("role")
        if role in ("trial", "baseline", "confirm"):
            key = f"{role}:{r.data.tags.get('status', '?')}"
            res["outcomes"][key] = res["outcomes"].get(key, 0) + 1
    base = [r for r in runs if r.data.tags.get("role") == "baseline"]
    thresholds = {"documented": DOCUMENTED[task].test_acc}
    if base and "val/acc" in base[0].data.metrics:
        thresholds["re-measured"] = base[0].data.metrics["val/acc"]
        res["baseline"] = {k: base[0].data.metrics.get(k) for k in ("val/acc", "test/acc", "epoch")}
    res["baseline_epochs"] = int(base[0].data.params.get("epochs", 0)) if base else None
    history = []  # (minutes from the start, val/acc) of every search trial's epochs
    for r in runs:
        if r.data.tags.get("role") == "trial":
            points = c.get_metric_history(r.info.run_id, "val/acc")
            history += [((m.timestamp / 1000 - t0) / 60, m.value) for m in points]
    res["first_beaten_on_val_min"] = {
        k: (round(min((t for t, v in history if v > x), default=float("nan")), 1), round(x, 4))
        for k, x in thresholds.items()
    }
    best = root / "out" / name / "best_config.json"
    if best.is_file():
        b = json.loads(best.read_text())
        res["recommended"] = {
            "trial": b.get("trial_id"),
            "selected_by": b.get("selected_by"),
            "test": b.get("test"),
            "config": {k: b["config"].get(k) for k in SHOWN},
            "command": b.get("command"),
            "flag": b.get("flag"),
        }
    return res


def lines(out: dict) -> list[str]:
    """The figures a note quotes, against the issue's targets."""
    target = TARGETS[out["task"]]
    rec = out.get("recommended") or {}
    test = rec.get("test") or {}
    mean, ci = test.get("mean"), test.get("ci95") or [None, None]
    above = f", interval above {target['ci_above']:.0%}" if "ci_above" in target else ""
    said = [
        f"{out['task']}: exit {out['exit']}, wall {out['wall_min']} min (target <= {target['minutes']})",
        f"  recommended {rec.get('trial')} ({rec.get('selected_by')}): test {test.get('text')} "
        f"(target >= {target['test']:.0%}{above})",
        f"  config {rec.get('config')}",
        f"  first beaten on val (min from start, threshold): {out['first_beaten_on_val_min']}",
        f"  peak memory: process tree {out['peak_tree_gb']} GB, machine used +{out['peak_used_gb']} GB (target < 8)",
        f"  outcomes {out['outcomes']}; baseline {out.get('baseline')} over {out.get('baseline_epochs')} epoch(s)",
    ]
    met = mean is not None and mean >= target["test"] and out["wall_min"] <= target["minutes"]
    if "ci_above" in target:
        met = met and ci[0] is not None and ci[0] > target["ci_above"]
    said.append(f"  targets {'met' if met else 'missed'}")
    return said


if __name__ == "__main__":
    os.environ.setdefault("PYTHONUNBUFFERED", "1")
    sys.exit(main())
