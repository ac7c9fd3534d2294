"""The report's cost section (issue 14) and a warm-started sweep's prior knowledge, from a real MLflow store.

The store is written by tests/test_reports.py's `Store`, its trials carrying the cost metrics the sweep logs
per epoch (cumulative: the last value is the total). Sweep `gpu` has a known Pareto front on GPU-seconds
(t_E, t_B, t_C) and another on parameter count (t_A, t_F, t_C); t_D has the highest test/acc of all and is on
neither (the test set chooses nothing); a diverged and a KILLED trial with higher val/acc and lower cost are on
neither either. `cpu-only` ran without a GPU, `warm` was warm-started from both, `warm-broken` has an unreadable
warm_start.json and `plain` is a sweep from before the cost metrics.
"""

from __future__ import annotations

import csv
import json
import re

import pandas as pd
import pytest

from cnnclf.config import PRESETS, TrainConfig
from reports import build_report
from tests.test_reports import PNG_SIGNATURE, Store, check_png, per_class

GPU_FRACTION, CPUS = 0.25, 2.0
# trial -> (status, val/acc per epoch, test/acc, GPU-seconds in all, parameters)
GPU_TRIALS = {
    "t_E": ("early_stopped", [0.66], None, 50, 60_000),
    "t_A": ("completed", [0.5, 0.6, 0.70], 0.69, 250, 20_000),
    "t_B": ("completed", [0.5, 0.6, 0.75], 0.74, 200, 150_000),
    "t_C": ("completed", [0.5, 0.6, 0.80], 0.78, 400, 100_000),
    "t_D": ("completed", [0.5, 0.6, 0.72], 0.81, 300, 300_000),  # the best test/acc, dominated on both fronts
    "t_F": ("completed", [0.5, 0.6, 0.78], 0.77, 600, 40_000),
}
GPU_FRONT, PARAMS_FRONT = ["t_E", "t_B", "t_C"], ["t_A", "t_F", "t_C"]
# every child run's GPU-seconds: the trials, t_X (diverged) 10, t_K (KILLED) 5, the baseline 150, a confirmation 400
GPU_SECONDS = sum(t[3] for t in GPU_TRIALS.values()) + 10 + 5 + 150 + 400
PRICE = 2.5
PRIOR = [  # warm_start.json's trials: (sweep, number, value, status)
    ("gpu", 0, 0.97, "completed"),
    ("gpu", 1, 0.66, "early_stopped"),
    ("gpu", 2, 0.0, "diverged"),
    ("gpu", 3, 0.80, "completed"),
    ("cpu-only", 0, 0.70, "completed"),
    ("cpu-only", 1, 0.75, "completed"),
    ("cpu-only", 2, 0.72, "completed"),
]
LEFT_OUT = {"sweep": "cpu-only", "count": 2, "why": "fixed settings differ: image_size 64 vs 32"}


def spend(gpu_s: float, params: int, gpu: float = GPU_FRACTION, cpu_s: float | None = None):
    """The cost metrics of a run that spent `gpu_s` GPU-seconds (or, without a GPU, `cpu_s` core-seconds) in
    all, as the sweep logs them: cumulative per epoch, the training seconds split evenly over the epochs."""
    train_s = gpu_s / gpu if gpu else cpu_s / CPUS

    def metrics(epoch: int, epochs: int) -> dict:
        t = train_s * epoch / epochs
        return {
            "resources/gpu": gpu,
            "resources/cpu": CPUS,
            "cost/train_s": t,
            "cost/gpu_s": gpu * t,
            "cost/cpu_s": CPUS * t,
            "cost/images": 45_000.0 * epoch,
            "model/params": float(params),
        }

    return metrics


@pytest.fixture(scope="module")
def reports(tmp_path_factory) -> dict[str, dict]:
    """Each sweep's report: its report.md text, the files written and trials.csv's rows."""
    root = tmp_path_factory.mktemp("mlflow-cost")
    uri = f"sqlite:///{root / 'mlflow.db'}"
    s = Store(uri, root / "artifacts")
    exp = s.experiment("cifar10")
    base = TrainConfig(task="cifar10", model="cnn", epochs=3, depth=4, width=32, optimizer="sgd", momentum=0.9)
    seed_cfg = PRESETS["cifar10-seed"].replace(epochs=2)

    gpu = s.sweep(exp, "gpu", 0, gpu_hour_price=PRICE)
    gpu.trial("b_00000", seed_cfg, (0, 100), [0.55, 0.68], per_class(0.67), role="baseline", more=spend(150, 62_006))
    for i, (tid, (status, val, test, gpu_s, params)) in enumerate(GPU_TRIALS.items()):
        cfg = base.replace(lr=0.01 * (i + 1), depth=2 + i)
        acc = per_class(test) if test is not None else None
        gpu.trial(tid, cfg, (10 + i, 200 + i), val, acc, status=status, more=spend(gpu_s, params))
    x = base.replace(lr=0.5)
    gpu.trial("t_X", x, (20, 40), [0.95], status="diverged", mlflow_status="FAILED", diverged_at=2, more=spend(10, 1))
    gpu.trial(
        "t_K", base.replace(lr=0.2), (30, 50), [0.99], status="interrupted", mlflow_status="KILLED", more=spend(5, 1)
    )
    gpu.trial("t_Z", base.replace(lr=0.3), (35, 36), [], status="error", mlflow_status="FAILED")  # no epoch: no cost
    c = base.replace(lr=0.04, depth=5, seed=1)
    more = spend(400, 100_000)
    gpu.trial(
        "c_00001",
        c,
        (300, 400),
        [0.5, 0.6, 0.79],
        per_class(0.785),
        role="confirm",
        tags={"confirm_of": "t_C"},
        more=more,
    )
    gpu.finish(500, {"completed": 5, "early_stopped": 1, "diverged": 1, "error": 1})

    cpu = s.sweep(exp, "cpu-only", 1000, gpu_hour_price=None)
    for i, (tid, v, cpu_s, params) in enumerate(
        (("t_P", 0.70, 100, 30_000), ("t_Q", 0.75, 300, 80_000), ("t_R", 0.72, 500, 20_000))
    ):
        more = spend(0, params, gpu=0.0, cpu_s=cpu_s)
        cpu.trial(tid, base.replace(lr=0.01 * (i + 1)), (1000 + i, 1100 + i), [0.5, 0.6, v], per_class(v), more=more)
    cpu.finish(1200, {"completed": 3})

    warm = s.sweep(exp, "warm", 2000)
    for i, (tid, v) in enumerate((("w_1", 0.71), ("w_2", 0.73))):
        more = spend(100 * (i + 1), 50_000)
        warm.trial(tid, base.replace(lr=0.02 * (i + 1)), (2000 + i, 2100 + i), [0.5, 0.6, v], per_class(v), more=more)
    prior = {
        "sources": ["gpu", "cpu-only"],
        "trials": [
            {
                "sweep": sw,
                "number": n,
                "params": {"optimizer": "sgd", "lr": 0.01 * (n + 1), "depth": 3},
                "value": v,
                "status": st,
            }
            for sw, n, v, st in PRIOR
        ],
        "left_out": [LEFT_OUT],
    }
    _warm_start(s, warm, json.dumps(prior), "gpu,cpu-only")
    warm.finish(2200, {"completed": 2})

    broken = s.sweep(exp, "warm-broken", 3000)
    broken.trial("v_1", base, (3000, 3100), [0.5, 0.6, 0.7], per_class(0.7), more=spend(100, 50_000))
    _warm_start(s, broken, "{not json", "gpu")
    broken.finish(3200, {"completed": 1})

    plain = s.sweep(exp, "plain", 4000)  # as sweeps before issue 14 wrote it: no cost metrics
    plain.trial("b_00000", seed_cfg, (4000, 4100), [0.55, 0.6], per_class(0.6), role="baseline")
    plain.trial("p_1", base, (4000, 4200), [0.5, 0.6, 0.7], per_class(0.69))
    plain.finish(4300, {"completed": 2})

    out = {}
    for name in ("gpu", "cpu-only", "warm", "warm-broken", "plain"):
        files = build_report(uri, "cifar10", [name], root / "out" / name)
        with open(files[2], newline="") as f:
            rows = {r["trial_id"]: r for r in csv.DictReader(f)}
        out[name] = {"md": files[0].read_text(), "files": files, "csv": rows, "uri": uri}
    return out


def _warm_start(s: Store, sweep, text: str, sources: str) -> None:
    s.c.set_tag(sweep.parent, "warm_start.sources", sources)
    path = sweep.files / "warm_start.json"
    path.write_text(text)
    s.c.log_artifact(sweep.parent, str(path))


def section(md: str, heading: str) -> str:
    """The text under the Markdown heading that starts with `heading`, up to the next heading of any level."""
    m = re.search(rf"^#+ {re.escape(heading)}.*$", md, re.M)
    assert m, f"no heading {heading!r}"
    rest = md[m.end() :]
    nxt = re.search(r"^#+ ", rest, re.M)
    return rest[: nxt.start()] if nxt else rest


def table(text: str) -> list[dict[str, str]]:
    """The first Markdown table in `text`, one dict per row."""
    lines = [x for x in text.splitlines() if x.startswith("|")]
    header = [c.strip() for c in lines[0].strip("|").split("|")]
    return [dict(zip(header, (c.strip() for c in x.strip("|").split("|")), strict=True)) for x in lines[2:]]


# ---------------------------------------------------------------------------------------------


def test_pareto_front_keeps_ties_and_drops_the_dominated():
    from reports.cost import GPU_S, cheapest_beating, pareto_front

    df = pd.DataFrame(
        {
            "trial_id": ["a", "b", "c", "d", "e"],
            "val/acc": [0.7, 0.7, 0.8, 0.8, 0.6],
            GPU_S: [10.0, 10.0, 20.0, 30.0, 5.0],  # a and b tie; d costs more for c's val/acc
            "role": "trial",
            "outcome": "completed",
        }
    )
    assert list(df["trial_id"][pareto_front(df, GPU_S)]) == ["a", "b", "c", "e"]
    assert cheapest_beating(df, GPU_S, 0.65)["trial_id"] == "a"
    assert cheapest_beating(df, GPU_S, 0.8) is None  # beating is strictly more


def test_pareto_fronts_on_gpu_seconds_and_parameters(reports):
    md = reports["gpu"]["md"]
    gpu = section(md, "Pareto front: val/acc against GPU-seconds")
    rows = table(gpu)
    assert [r["trial"] for r in rows] == [f"`{t}`" for t in GPU_FRONT]  # cheapest first; not t_D, t_X, t_K
    assert [r["GPU-seconds"] for r in rows] == ["50", "200", "400"]
    assert [r["val/acc"] for r in rows] == ["66.00%", "75.00%", "80.00%"]
    assert [r["test/acc"] for r in rows] == ["", "74.00%", "78.00%"]  # t_E was early-stopped: no test/acc
    assert {"lr", "depth"} <= set(rows[0])  # the hyperparameters that varied
    assert "![" in gpu and "pareto_cost.png" in gpu and "no GPU in this sweep" not in md
    params = table(section(md, "Pareto front: val/acc against parameter count"))
    assert [r["trial"] for r in params] == [f"`{t}`" for t in PARAMS_FRONT]
    assert [r["parameters"] for r in params] == ["20,000", "40,000", "100,000"]
    assert "`t_D`" not in gpu + section(md, "Pareto front: val/acc against parameter count")  # test/acc 81%
    out = reports["gpu"]["files"][0].parent
    for name in ("pareto_cost.png", "pareto_params.png"):
        assert (out / name).read_bytes()[:8] == PNG_SIGNATURE
        check_png(out / name)
        assert f"]({name})" in md
    html = reports["gpu"]["files"][1].read_text()
    assert "Pareto front: val/acc against GPU-seconds" in html


def test_cheapest_trial_beating_each_baseline(reports):
    rows = table(section(reports["gpu"]["md"], "Cheapest trial that beats each baseline"))
    doc, remeasured = rows
    assert doc["baseline"].startswith("documented: 61.00%") and doc["val/acc to beat"] == "61.00%"
    assert doc["cheapest search trial beating it"] == "`t_E`" and doc["GPU-seconds"] == "50"
    assert (
        doc["val/acc"] == "66.00%" and doc["test/acc"] == "" and doc["test/acc beats it too"].startswith("no test/acc")
    )
    assert remeasured["val/acc to beat"] == "68.00%"  # the baseline's val/acc
    assert remeasured["cheapest search trial beating it"] == "`t_B`" and remeasured["GPU-seconds"] == "200"
    assert remeasured["val/acc"] == "75.00%" and remeasured["test/acc"] == "74.00%"
    assert remeasured["test/acc beats it too"] == "yes (74.00% > 67.00%)"  # against the baseline's test/acc


def test_totals_and_priced_cost(reports):
    text = section(reports["gpu"]["md"], "What accuracy costs")
    hours = GPU_SECONDS / 3600
    assert f"**{hours:.3g} GPU-hours**" in text and "**0.657 GPU-hours**" in text
    assert f"**{8 * GPU_SECONDS / 3600:.3g} CPU core-hours**" in text  # 2 cores x 4 training seconds per GPU-second
    assert f"Cost: **${hours * PRICE:.2f}** at $2.50 per GPU-hour." in text and "$1.64" in text
    assert "1 of them logged no cost figures" in text  # t_Z failed before an epoch ended
    rows = reports["gpu"]["csv"]
    assert float(rows["t_B"]["cost/gpu_s"]) == 200 and float(rows["t_B"]["model/params"]) == 150_000
    assert float(rows["t_B"]["cost/cpu_s"]) == 1600 and float(rows["t_B"]["cost/train_s"]) == 800
    assert float(rows["t_B"]["cost/images"]) == 135_000 and float(rows["b_00000"]["cost/gpu_s"]) == 150


def test_cpu_only_sweep_uses_cpu_core_seconds(reports):
    md = reports["cpu-only"]["md"]
    assert "no GPU in this sweep: cost is CPU core-seconds" in md
    cpu = section(md, "Pareto front: val/acc against CPU core-seconds")
    assert [r["trial"] for r in table(cpu)] == ["`t_P`", "`t_Q`"]  # on GPU-seconds (all 0) only t_Q would be
    assert [r["CPU core-seconds"] for r in table(cpu)] == ["100", "300"]
    assert [r["trial"] for r in table(section(md, "Pareto front: val/acc against parameter count"))] == [
        "`t_R`",
        "`t_Q`",
    ]
    text = section(md, "What accuracy costs")
    assert "**0 GPU-hours** (no GPU in this sweep)" in text and "Cost:" not in text  # no --gpu-hour-price
    [doc] = table(section(md, "Cheapest trial that beats each baseline"))  # no baseline run in this sweep
    assert doc["cheapest search trial beating it"] == "`t_P`" and doc["CPU core-seconds"] == "100"
    assert doc["test/acc beats it too"] == "yes (70.00% > 61.00%)"


def test_warm_start_prior_knowledge_is_listed_never_ranked(reports):
    r = reports["warm"]
    md = r["md"]
    text = section(md, "Prior knowledge (warm start)")
    assert "The sampler started from 7 trials of sweeps gpu, cpu-only (not run in this sweep, not ranked)." in text
    rows = table(text)
    best5 = sorted(PRIOR, key=lambda t: -t[2])[:5]
    assert [(x["sweep"], x["trial"], x["val/acc given to the sampler"]) for x in rows] == [
        (sw, f"#{n}", f"{100 * v:.2f}%") for sw, n, v, _ in best5
    ]
    assert "`optimizer=sgd`, `lr=0.01`, `depth=3`" in rows[0]["hyperparameters"]
    assert "2 trial(s) of sweep cpu-only left out: fixed settings differ: image_size 64 vs 32" in text
    # the sweep's own trials are ranked; the prior 97% is nowhere but in its own subsection
    assert "trial `w_2`, val/acc **73.00%**" in md
    assert md.count("97.00%") == 1 and "97.00%" in text
    assert set(r["csv"]) == {"w_1", "w_2"} and [r["csv"][t]["rank"] for t in ("w_2", "w_1")] == ["1", "2"]
    assert [x["trial"] for x in table(section(md, "Pareto front: val/acc against GPU-seconds"))] == ["`w_1`", "`w_2`"]
    assert "Prior knowledge" not in reports["gpu"]["md"] and "Prior knowledge" not in reports["plain"]["md"]


def test_unreadable_warm_start_is_a_note(reports):
    md = reports["warm-broken"]["md"]
    assert "The sampler started from trials of sweep gpu (not run in this sweep, not ranked)" in md
    assert "`warm_start.json` is unreadable" in section(md, "Notes")
    assert "trial `v_1`, val/acc **70.00%**" in md


def test_a_sweep_without_cost_figures_still_reports(reports):
    md = reports["plain"]["md"]
    assert "no cost figures in this sweep (sweeps record them since cost reporting" in md
    assert "Pareto" not in md and "GPU-hours" not in md and "trial `p_1`, val/acc **70.00%**" in md
    assert not list(reports["plain"]["files"][0].parent.glob("pareto_*.png"))
    assert not any(k.startswith("cost/") for k in reports["plain"]["csv"]["p_1"])
    assert "no cost figures in this sweep" not in reports["gpu"]["md"]


def test_data_reads_warm_start_json():
    from reports.artifacts import warm_start

    doc = warm_start({"trials": [{"sweep": "a", "number": 1, "params": {}, "value": float("nan")}]})
    assert doc == {
        "sources": ["a"],
        "trials": [{"sweep": "a", "number": 1, "params": {}, "value": None, "status": "completed"}],
        "left_out": [],
    }
    for bad in ([], {"trials": "x"}, {"trials": [{"number": 1}]}, {"left_out": [{"sweep": "a"}]}):
        with pytest.raises((KeyError, TypeError, ValueError)):
            warm_start(bad)


def test_compared_sweeps_each_have_their_cost_section(reports):
    uri, root = reports["gpu"]["uri"], reports["gpu"]["files"][0].parents[2]
    files = build_report(uri, "cifar10", ["gpu", "cpu-only", "plain"], root / "compare")
    names = {f.name for f in files}
    assert {"gpu_pareto_cost.png", "gpu_pareto_params.png", "cpu-only_pareto_cost.png"} <= names
    assert not any(n.startswith("plain_pareto") for n in names)
    md = files[0].read_text()
    assert md.count("\n### What accuracy costs\n") == 3 and md.count("no cost figures in this sweep") == 1
    assert md.count("against CPU core-seconds (no GPU in this sweep: cost is CPU core-seconds)") == 1
