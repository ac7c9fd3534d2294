"""What accuracy costs, and what a warm-started sweep knew before it ran.

Every child run logs, per epoch and cumulatively (the last value is the run's total; docs/tracking.md):
`cost/train_s`, `cost/gpu_s` (its GPU fraction x train_s), `cost/cpu_s` (its CPU cores x train_s),
`cost/images` and `model/params`. From them: the sweep's GPU- and CPU core-hours (every child run,
interrupted ones included: their time was spent), the Pareto fronts of val/acc against GPU-seconds and
against parameter count (search trials whose val/acc is a measurement; the test set chooses nothing), and
the cheapest trial whose val/acc beats each baseline. Stores written before cost reporting have none of these.

A sweep run with `--warm-start` began from other sweeps' trials (`warm_start.json`): listed as prior
knowledge, never ranked, never on a front.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd

from reports import analysis as an
from reports import plots
from reports.artifacts import WARM_START_TAG
from reports.data import SweepData, parse_param
from reports.fmt import amount, pct, value
from reports.render import Block, Bullets, Heading, Image, Page, Para, Table
from sweeps.spec import DOCUMENTED, METRIC, SEARCH_PARAMS, finite

GPU_S, CPU_S, PARAMS = "cost/gpu_s", "cost/cpu_s", "model/params"
COST_METRICS = ("cost/train_s", GPU_S, CPU_S, "cost/images", PARAMS)
SINCE = "cost reporting was added"  # sweeps before that logged no COST_METRICS
NO_GPU = "no GPU in this sweep: cost is CPU core-seconds"
TOP_PRIOR = 5


@dataclass(frozen=True)
class Basis:
    """What a front measures cost in: a metric, its name in a table header, and a word on the choice."""

    column: str
    header: str
    note: str = ""


GPU = Basis(GPU_S, "GPU-seconds")
CPU = Basis(CPU_S, "CPU core-seconds", NO_GPU)
SIZE = Basis(PARAMS, "parameters")


def numbers(runs: pd.DataFrame, column: str) -> pd.Series:
    """A metric column as floats (NaN where a run did not log it, or the column is absent)."""
    if column not in runs:
        return pd.Series(np.nan, index=runs.index, dtype=float)
    return pd.to_numeric(runs[column], errors="coerce").astype(float)


def has_costs(runs: pd.DataFrame) -> bool:
    return any(numbers(runs, c).notna().any() for c in COST_METRICS)


def cost_basis(runs: pd.DataFrame) -> Basis | None:
    """GPU-seconds when any run used a GPU, else CPU core-seconds; None when neither was logged."""
    if (numbers(runs, GPU_S) > 0).any():
        return GPU
    if numbers(runs, CPU_S).notna().any():
        return CPU
    return None


def candidates(runs: pd.DataFrame, column: str) -> pd.DataFrame:
    """Search trials whose final val/acc is a measurement (completed, early-stopped) and that logged `column`."""
    t = an.importance_trials(runs)
    return t[numbers(t, column).notna()]


def pareto_front(df: pd.DataFrame, column: str) -> pd.Series:
    """True for the rows no other row dominates: none has val/acc >= and `column` <= with one of them strict."""
    acc, cost = df[METRIC].to_numpy(dtype=float), numbers(df, column).to_numpy()
    no_worse = (acc[None, :] >= acc[:, None]) & (cost[None, :] <= cost[:, None])  # [i, j]: j is no worse than i
    better = (acc[None, :] > acc[:, None]) | (cost[None, :] < cost[:, None])
    return pd.Series(~(no_worse & better).any(axis=1), index=df.index)


def front(runs: pd.DataFrame, column: str) -> pd.DataFrame:
    """The front's trials, cheapest first (then the higher val/acc)."""
    c = candidates(runs, column)
    c = c[pareto_front(c, column)]
    return c.assign(_cost=numbers(c, column), _acc=-c[METRIC].astype(float)).sort_values(
        ["_cost", "_acc"], kind="stable"
    )


def cheapest_beating(runs: pd.DataFrame, column: str, bar: float) -> pd.Series | None:
    """The cheapest search trial whose val/acc exceeds `bar` (ties: the higher val/acc); None if none does."""
    c = candidates(runs, column)
    c = c[c[METRIC].astype(float) > bar]
    if c.empty:
        return None
    return c.assign(_cost=numbers(c, column), _acc=-c[METRIC].astype(float)).sort_values(["_cost", "_acc"]).iloc[0]


def totals(runs: pd.DataFrame) -> dict:
    """GPU-hours and CPU core-hours of every child run (interrupted ones included), and how many runs logged none."""
    gpu, cpu = numbers(runs, GPU_S), numbers(runs, CPU_S)
    return {
        "gpu_h": float(gpu.sum()) / 3600,
        "cpu_h": float(cpu.sum()) / 3600,
        "runs": len(runs),
        "without": int((gpu.isna() & cpu.isna()).sum()),
    }


def gpu_hour_price(sweep: SweepData) -> float | None:
    """`--gpu-hour-price` (the parent's `sweep.gpu_hour_price` param, a string; "None" when not given)."""
    price = parse_param(str(sweep.parent["params"].get("gpu_hour_price", "None")))
    return float(price) if finite(price) and price >= 0 else None


# ---------------------------------------------------------------------------------------------
# Sections.


def cost_section(s: SweepData, page: Page, h: int) -> None:
    """The section "What accuracy costs": totals, two Pareto fronts (table and plot each), the cheapest trial
    that beats each baseline; one line instead for a sweep that logged no cost figures."""
    runs, blocks = s.runs, page.blocks
    blocks.append(Heading(h, "What accuracy costs"))
    if not has_costs(runs):
        blocks.append(
            Para(
                f"Not shown: no cost figures in this sweep (sweeps record them since {SINCE}): "
                "no run logged `cost/*` or `model/params`."
            )
        )
        return
    blocks.append(Para(_totals_line(s)))
    basis = cost_basis(runs)
    if basis is None:
        blocks.append(Heading(h + 1, "Pareto front: val/acc against GPU-seconds"))
        blocks.append(Para("Not drawn: no run logged `cost/gpu_s` or `cost/cpu_s`."))
    for b, name in ((basis, "pareto_cost"), (SIZE, "pareto_params")):
        if b is not None:
            _front_section(s, b, page.png(name), page, h + 1)
    blocks.append(Heading(h + 1, "Cheapest trial that beats each baseline"))
    if basis is None:
        blocks.append(Para("Not shown: no run logged `cost/gpu_s` or `cost/cpu_s`."))
    else:
        _cheapest_section(s, basis, an.baseline(runs), blocks)


def _totals_line(s: SweepData) -> str:
    t = totals(s.runs)
    gpu = f"**{amount(t['gpu_h'])} GPU-hours**" + (" (no GPU in this sweep)" if t["gpu_h"] == 0 else "")
    line = (
        f"Total: {gpu} and **{amount(t['cpu_h'])} CPU core-hours** of training over its {t['runs']} runs "
        "(search trials, baseline and confirmation runs; interrupted runs included, their time was spent)."
    )
    if t["without"]:
        line += f" {t['without']} of them logged no cost figures (failed before an epoch ended, or older): not counted."
    if (price := gpu_hour_price(s)) is not None:
        line += f" Cost: **${t['gpu_h'] * price:,.2f}** at ${price:,.2f} per GPU-hour."
    return line


def _marks(s: SweepData, base: pd.Series | None) -> list[tuple[str, float]]:
    doc = DOCUMENTED.get(an.task_of(s))
    marks = [(f"documented baseline (test) {pct(doc.test_acc)}", doc.test_acc)] if doc else []
    if base is not None and finite(base[METRIC]):
        marks.append((f"re-measured baseline (val) {pct(base[METRIC])}", float(base[METRIC])))
    return marks


def _front_section(s: SweepData, b: Basis, png: Path, page: Page, h: int) -> None:
    """A Pareto front of val/acc against `b`: its table, a sentence on what it shows, and its plot at `png`."""
    blocks = page.blocks
    what = "parameter count" if b is SIZE else b.header
    blocks.append(Heading(h, f"Pareto front: val/acc against {what}" + (f" ({b.note})" if b.note else "")))
    runs = s.runs
    cands = candidates(runs, b.column)
    if cands.empty:
        blocks.append(Para(f"Not drawn: no completed or early-stopped search trial logged `{b.column}`."))
        return
    f = front(runs, b.column)
    shown = [p for p in SEARCH_PARAMS if p in cands and an.varying(cands, [p])]
    blocks.append(
        Table(
            ["trial", b.header, "val/acc", "test/acc", "epochs", *shown],
            [
                [
                    f"`{r['trial_id']}`",
                    _cost(r[b.column], b),
                    pct(r[METRIC]),
                    pct(r["test/acc"]) if finite(r["test/acc"]) else "",
                    f"{value(r['epochs_run'])}/{value(r.get('epochs'))}",
                    *(value(r[p]) for p in shown),
                ]
                for _, r in f.iterrows()
            ],
            right=(1, 2, 3, 4),
        )
    )
    left = len(an.importance_trials(runs)) - len(cands)
    blocks.append(
        Para(
            f"The {len(f)} of {len(cands)} search trials (completed or early-stopped) that no other beats on both: "
            f"none has as high a val/acc for no more {b.header}, one of the two strictly better. Cheapest first. "
            "val/acc chooses; test/acc is shown beside it (blank for an early-stopped trial, which has none)."
            + (f" {left} search trial(s) without `{b.column}` left out." if left else "")
            + (f" {b.note[0].upper()}{b.note[1:]}." if b.note else "")
        )
    )
    points = cands.assign(on_front=cands.index.isin(f.index))
    base, point = an.baseline(runs), None
    if base is not None and finite(base.get(b.column)) and finite(base[METRIC]):
        point = (f"baseline {base['trial_id']}", float(base[b.column]), float(base[METRIC]))
    title = f"{s.name}: val/acc against {what}" + (f" ({b.note})" if b.note else "")
    page.pngs.append(plots.save(plots.pareto(points, b.column, _axis(b), point, _marks(s, base), title), png))
    blocks.append(
        Image(
            png,
            f"Final val/acc of each completed (blue) or early-stopped (grey) search trial against its {what}; the "
            "green step line is the Pareto front"
            + (", the red star the re-measured baseline" if point else "")
            + "; red lines are the baselines' accuracies."
            + (f" {b.note[0].upper()}{b.note[1:]}." if b.note else ""),
        )
    )


def _cheapest_section(s: SweepData, b: Basis, base: pd.Series | None, blocks: list[Block]) -> None:
    runs = s.runs
    doc = DOCUMENTED.get(an.task_of(s))
    rows = []
    if doc is not None:
        rows.append(_cheapest_row(runs, b, f"documented: {pct(doc.test_acc)} test/acc", doc.test_acc, doc.test_acc))
    if base is not None and finite(base[METRIC]):
        label = f"re-measured: trial `{base['trial_id']}`, {pct(base[METRIC])} val/acc"
        test_bar = float(base["test/acc"]) if finite(base["test/acc"]) else float(base[METRIC])
        rows.append(_cheapest_row(runs, b, label, float(base[METRIC]), test_bar))
    if not rows:
        blocks.append(Para("No baseline to beat: no documented figure for this task and no re-measured baseline."))
        return
    header = ["baseline", "val/acc to beat", "cheapest search trial beating it", b.header, "val/acc", "test/acc"]
    blocks.append(Table([*header, "test/acc beats it too"], rows, right=(1, 3, 4, 5)))
    blocks.append(
        Para(
            f"Cheapest by {b.header}{f' ({b.note})' if b.note else ''}, among the search trials whose final "
            "**val/acc** exceeds the baseline's figure (the documented one is a test accuracy, compared with val/acc "
            "because the test set chooses nothing). The last column compares test/acc with the documented test "
            "accuracy, or with the re-measured baseline's test/acc."
            + ("" if base is not None else " No baseline run (role=baseline) in this sweep.")
        )
    )


def _cheapest_row(runs: pd.DataFrame, b: Basis, label: str, bar: float, test_bar: float) -> list[str]:
    r = cheapest_beating(runs, b.column, bar)
    if r is None:
        return [label, pct(bar), "none beats it", "–", "–", "–", "–"]
    test = r["test/acc"]
    if not finite(test):
        beats = "no test/acc (early-stopped)" if r["outcome"] == "early_stopped" else "no test/acc"
    elif test > test_bar:
        beats = f"yes ({pct(test)} > {pct(test_bar)})"
    else:
        beats = f"no ({pct(test)} ≤ {pct(test_bar)})"
    test_cell = pct(test) if finite(test) else ""
    return [label, pct(bar), f"`{r['trial_id']}`", _cost(r[b.column], b), pct(r[METRIC]), test_cell, beats]


def _cost(x, b: Basis) -> str:
    return f"{int(x):,}" if b is SIZE and finite(x) else amount(x)


def _axis(b: Basis) -> str:
    if b is SIZE:
        return "parameters (model/params)"
    return f"{b.header} per trial ({b.column})"


# ---------------------------------------------------------------------------------------------
# Prior knowledge (--warm-start).


def prior_section(s: SweepData, blocks: list[Block], h: int) -> None:
    """The subsection "Prior knowledge": the other sweeps' trials the sampler began from (none without them)."""
    tag = s.parent["tags"].get(WARM_START_TAG)
    ws = s.warm_start
    if not tag and ws is None:
        return
    sources = ws["sources"] if ws and ws["sources"] else [x for x in (tag or "").split(",") if x]
    names = f"sweep{'s' if len(sources) != 1 else ''} {', '.join(sources)}"
    blocks.append(Heading(h, "Prior knowledge (warm start)"))
    if ws is None:
        blocks.append(
            Para(
                f"The sampler started from trials of {names} (not run in this sweep, not ranked); "
                "`warm_start.json` is missing or unreadable, so they are not listed (see Notes)."
            )
        )
        return
    trials = ws["trials"]
    blocks.append(
        Para(f"The sampler started from {len(trials)} trials of {names} (not run in this sweep, not ranked).")
    )
    best = sorted((t for t in trials if t["value"] is not None), key=lambda t: -t["value"])[:TOP_PRIOR]
    if best:
        blocks.append(
            Table(
                ["sweep", "trial", "status", "val/acc given to the sampler", "hyperparameters"],
                [
                    [
                        t["sweep"],
                        f"#{t['number']}" if t["number"] is not None else "?",
                        str(t["status"]).replace("_", "-"),
                        pct(t["value"]),
                        _params(t["params"]),
                    ]
                    for t in best
                ],
                right=(1, 3),
            )
        )
        blocks.append(Para(f"The best {len(best)} of them by the val/acc the sampler was given."))
    if ws["left_out"]:
        blocks.append(
            Bullets([f"{x['count']} trial(s) of sweep {x['sweep']} left out: {x['why']}" for x in ws["left_out"]])
        )


def _params(params: dict) -> str:
    order = [k for k in SEARCH_PARAMS if k in params] + sorted(k for k in params if k not in SEARCH_PARAMS)
    shown = [(k, value(params[k])) for k in order]
    return ", ".join(f"`{k}={v}`" for k, v in shown if v != "")
