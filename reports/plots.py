"""The report's figures, drawn with matplotlib's Agg canvas (no pyplot state, no display needed).

Every function takes plain data and returns a Figure; `save` writes it as PNG. Accuracies are
fractions in the data and percent on the axes.
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pandas as pd
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.cm import ScalarMappable
from matplotlib.colors import Normalize
from matplotlib.figure import Figure
from matplotlib.ticker import FuncFormatter, MaxNLocator, PercentFormatter

DPI = 100  # small PNGs: the HTML embeds every one of them
OUTCOME_COLORS = {"completed": "tab:blue", "early_stopped": "tab:gray"}
PCT = PercentFormatter(xmax=1.0, decimals=0)
LABEL_BOX = {"boxstyle": "square,pad=0.1", "fc": "white", "ec": "none", "alpha": 0.75}  # tick labels over lines


def save(fig: Figure, path: Path) -> Path:
    FigureCanvasAgg(fig)
    fig.savefig(path, format="png", dpi=DPI, bbox_inches="tight")
    return path


def _baseline_lines(ax, baselines: list[tuple[str, float]]) -> None:
    for (label, value), style in zip(baselines, ("--", ":", "-."), strict=False):
        ax.axhline(value, color="tab:red", ls=style, lw=1.2, label=label)


def best_so_far(hist: pd.DataFrame, baselines: list[tuple[str, float]], title: str) -> Figure:
    """val/acc per search trial and the best so far, against trial number and against wall time."""
    fig = Figure(figsize=(11, 4))
    ax1, ax2 = fig.subplots(1, 2, sharey=True)
    for outcome, color in OUTCOME_COLORS.items():
        h = hist[hist["outcome"] == outcome]
        ax1.scatter(h["number"], h["value"], s=18, color=color, label=outcome.replace("_", "-"), zorder=3)
        ax2.scatter(h["elapsed_s"] / 60, h["value"], s=18, color=color, zorder=3)
    ax1.step(hist["number"], hist["best_by_number"], where="post", color="tab:green", lw=2, label="best so far")
    t = hist[hist["best_by_time"].notna()].sort_values("elapsed_s")
    ax2.step(t["elapsed_s"] / 60, t["best_by_time"], where="post", color="tab:green", lw=2)
    return _by_number_and_time(fig, baselines, title, "final val/acc", " (min, at the trial's end)")


def _by_number_and_time(fig: Figure, baselines: list[tuple[str, float]], title: str, ylabel: str, unit: str) -> Figure:
    """The shared frame of the two-panel plots: by trial number (left) and by wall time (right)."""
    ax1, ax2 = fig.axes
    for ax in (ax1, ax2):
        _baseline_lines(ax, baselines)
        ax.yaxis.set_major_formatter(PCT)
        ax.grid(alpha=0.3)
    ax1.set_xlabel("trial number (start order)")
    ax2.set_xlabel("wall time since the sweep started" + unit)
    ax1.set_ylabel(ylabel)
    ax1.legend(fontsize=8, loc="lower right")
    fig.suptitle(title)
    return fig


def compare_best_so_far(hists: dict[str, pd.DataFrame], baselines: list[tuple[str, float]], title: str) -> Figure:
    """Best-so-far val/acc of several sweeps overlaid, by trial number and by wall time."""
    fig = Figure(figsize=(11, 4))
    ax1, ax2 = fig.subplots(1, 2, sharey=True)
    for name, h in hists.items():
        (line,) = ax1.step(h["number"], h["best_by_number"], where="post", lw=2, label=name)
        t = h[h["best_by_time"].notna()].sort_values("elapsed_s")
        ax2.step(t["elapsed_s"] / 60, t["best_by_time"], where="post", lw=2, color=line.get_color())
    return _by_number_and_time(fig, baselines, title, "best val/acc so far", " (min)")


def learning_curves(curves: dict[str, pd.Series], baseline: tuple[str, pd.Series] | None) -> Figure:
    """val/acc per epoch of the top trials (and the baseline, dashed)."""
    fig = Figure(figsize=(7, 4.2))
    ax = fig.subplots()
    for label, s in curves.items():
        ax.plot(s.index, s.values, marker="o", ms=3, lw=1.5, label=label)
    if baseline is not None:
        ax.plot(baseline[1].index, baseline[1].values, color="black", ls="--", lw=1.2, label=baseline[0])
    ax.set_xlabel("epoch")
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_ylabel("val/acc")
    ax.yaxis.set_major_formatter(PCT)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, loc="lower right")
    return fig


def parallel_coordinates(df: pd.DataFrame, params: list[str], metric: str, log: tuple[str, ...]) -> Figure:
    """One line per trial across one vertical axis per hyperparameter, coloured by `metric`.

    Categorical axes (strings, booleans, few distinct numbers) place their values evenly; numeric
    axes are linear, or logarithmic for `log` params. A blank (a param the trial's optimizer does
    not have) sits at the bottom of its axis, marked n/a.
    """
    axes = [*params, metric]
    n = len(df)
    pos = np.zeros((n, len(axes)))
    ticks: list[tuple[list[float], list[str]]] = []
    na_at = -0.12
    for j, name in enumerate(axes):
        col = df[name].tolist()
        present = [v for v in col if v is not None and not (isinstance(v, float) and math.isnan(v))]
        numeric = present and all(isinstance(v, int | float | np.number) and not isinstance(v, bool) for v in present)
        distinct = sorted(set(present), key=lambda v: (str(type(v)), v))
        if numeric and (len(distinct) > 6 or name in log or name == metric):
            vals = np.array(present, dtype=float)
            use_log = name in log and vals.min() > 0
            tr = np.log10 if use_log else (lambda x: x)
            lo, hi = tr(vals.min()), tr(vals.max())
            span = (hi - lo) or 1.0
            for i, v in enumerate(col):
                pos[i, j] = na_at if v not in present else (tr(float(v)) - lo) / span
            tick_vals = np.linspace(lo, hi, 3) if hi > lo else np.array([lo])
            labels = [f"{10**t:.2g}" if use_log else (f"{t:.1%}" if name == metric else f"{t:.3g}") for t in tick_vals]
            ticks.append((list((tick_vals - lo) / span), labels))
        else:
            k = len(distinct)
            where = {v: (i / (k - 1) if k > 1 else 0.5) for i, v in enumerate(distinct)}
            for i, v in enumerate(col):
                pos[i, j] = where.get(v, na_at) if v in present else na_at
            ticks.append((list(where.values()), [str(v) for v in distinct]))
        if len(present) < n:
            ticks[-1][0].append(na_at)
            ticks[-1][1].append("n/a")
    fig = Figure(figsize=(max(7, 1.15 * len(axes)), 4.5))
    ax = fig.subplots()
    values = df[metric].to_numpy(dtype=float)
    norm_lo, norm_hi = np.nanmin(values), np.nanmax(values)
    mappable = ScalarMappable(Normalize(norm_lo, norm_hi), cmap="viridis")
    fig.colorbar(mappable, ax=ax, format=PCT, pad=0.02, label=metric)
    cmap = mappable.get_cmap()
    order = np.argsort(values)  # the best drawn last, on top
    for i in order:
        shade = (values[i] - norm_lo) / ((norm_hi - norm_lo) or 1.0)
        ax.plot(range(len(axes)), pos[i], color=cmap(shade), lw=2.5 if i == order[-1] else 1.2, alpha=0.85)
    for j, (tv, tl) in enumerate(ticks):
        ax.axvline(j, color="black", lw=0.8)
        for y, label in zip(tv, tl, strict=True):
            ax.text(j + 0.04, y, label, fontsize=7, va="center", ha="left", bbox=LABEL_BOX)
    ax.set_xticks(range(len(axes)), axes, rotation=20, fontsize=8)
    ax.set_yticks([])
    ax.set_ylim(na_at - 0.06, 1.06)
    ax.set_xlim(-0.2, len(axes) - 0.6)
    for side in ("top", "right", "left"):
        ax.spines[side].set_visible(False)
    return fig


def importance(groups: dict[str, dict[str, float]]) -> Figure:
    """Horizontal bars of fANOVA importance, one panel per group of trials."""
    fig = Figure(figsize=(4.2 * len(groups), 3.6))
    axs = np.atleast_1d(fig.subplots(1, len(groups)))
    for ax, (name, imp) in zip(axs, groups.items(), strict=True):
        items = sorted(imp.items(), key=lambda kv: kv[1])
        ax.barh([k for k, _ in items], [v for _, v in items], color="tab:blue")
        ax.set_xlim(0, 1)
        ax.set_title(name, fontsize=9)
        ax.set_xlabel("importance for val/acc (sums to 1)")
        ax.grid(axis="x", alpha=0.3)
    return fig


def per_class(classes: list[str], series: dict[str, list[float]]) -> Figure:
    """Grouped bars of per-class test accuracy, one bar per series (best, baseline, documented)."""
    fig = Figure(figsize=(max(5, 0.9 * len(classes) * max(1, len(series) / 2)), 3.8))
    ax = fig.subplots()
    x = np.arange(len(classes))
    w = 0.8 / len(series)
    for i, (label, vals) in enumerate(series.items()):
        ax.bar(x + (i - (len(series) - 1) / 2) * w, vals, w, label=label)
    ax.set_xticks(x, classes, rotation=30 if len(classes) > 4 else 0, fontsize=8)
    ax.set_ylim(0, 1)
    ax.yaxis.set_major_formatter(PCT)
    ax.set_ylabel("test accuracy")
    ax.grid(axis="y", alpha=0.3)
    ax.legend(fontsize=8, loc="upper center", bbox_to_anchor=(0.5, -0.12 if len(classes) <= 4 else -0.22), ncol=3)
    return fig


def confusion(classes: list[str], matrix: np.ndarray, title: str) -> Figure:
    """Counts, coloured by the row (true class) fraction; rows true, columns predicted."""
    k = len(classes)
    fig = Figure(figsize=(1.2 + 0.55 * k + 1.5, 1.0 + 0.5 * k + 0.8))
    ax = fig.subplots()
    rows = matrix.sum(axis=1, keepdims=True)
    frac = np.divide(matrix, rows, out=np.zeros(matrix.shape, dtype=float), where=rows > 0)
    im = ax.imshow(frac, cmap="Blues", vmin=0, vmax=1)
    for i in range(k):
        for j in range(k):
            ax.text(
                j,
                i,
                str(matrix[i, j]),
                ha="center",
                va="center",
                fontsize=7,
                color="white" if frac[i, j] > 0.6 else "black",
            )
    ax.set_xticks(range(k), classes, rotation=45, ha="right", fontsize=8)
    ax.set_yticks(range(k), classes, fontsize=8)
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    ax.set_title(title, fontsize=9)
    fig.colorbar(im, ax=ax, format=PCT, fraction=0.046, pad=0.04)
    return fig


def samples(s: dict[str, np.ndarray], cols: int = 8) -> Figure:
    """Test images (uint8 CHW RGB) with the predicted class, its probability and the true class.

    The images are tiled into one array and drawn by one Axes: 32 separate Axes cost seconds.
    """
    images, labels, preds, probs = s["images"], s["labels"], s["preds"], s["probs"]
    classes = [str(c) for c in s["classes"]]
    n, _, size, _ = images.shape
    cols = min(cols, n)
    rows = math.ceil(n / cols)
    pad_x, pad_y = max(2, size // 8), max(8, size * 3 // 4)  # pixels between tiles; room for two lines of text
    cell_w, cell_h = size + pad_x, size + pad_y
    mosaic = np.full((rows * cell_h, cols * cell_w, 3), 255, dtype=np.uint8)
    fig = Figure(figsize=(1.45 * cols, 1.75 * rows))
    ax = fig.add_axes((0, 0, 1, 1))
    for i in range(n):
        r, c = divmod(i, cols)
        y, x = r * cell_h + pad_y, c * cell_w + pad_x // 2
        mosaic[y : y + size, x : x + size] = np.transpose(images[i], (1, 2, 0))
        ok = int(preds[i]) == int(labels[i])
        name = classes[int(preds[i])] if 0 <= int(preds[i]) < len(classes) else str(preds[i])
        true = classes[int(labels[i])] if 0 <= int(labels[i]) < len(classes) else str(labels[i])
        ax.text(
            x + size / 2,
            y - 1,
            f"{name} {float(probs[i]):.0%}\ntrue: {true}",
            ha="center",
            va="bottom",
            fontsize=7,
            color="tab:green" if ok else "tab:red",
        )
    ax.imshow(mosaic, interpolation="nearest")
    ax.axis("off")
    return fig


def pareto(
    points: pd.DataFrame,
    cost: str,
    xlabel: str,
    baseline: tuple[str, float, float] | None,
    baselines: list[tuple[str, float]],
    title: str,
) -> Figure:
    """val/acc against a cost: every trial of `points` (columns `cost`, val/acc, outcome, on_front,
    trial_id), the Pareto front as a step line, the re-measured baseline as a star at (cost, val/acc)."""
    fig = Figure(figsize=(7, 4.2))
    ax = fig.subplots()
    for outcome, color in OUTCOME_COLORS.items():
        p = points[points["outcome"] == outcome]
        if p.empty:
            continue  # no legend entry for an outcome no trial had
        ax.scatter(p[cost], p["val/acc"], s=22, color=color, label=outcome.replace("_", "-"), zorder=3)
    front = points[points["on_front"]].sort_values(cost)
    ax.step(front[cost], front["val/acc"], where="post", color="tab:green", lw=2, label="Pareto front", zorder=2)
    for _, r in front.iterrows():
        ax.annotate(
            str(r["trial_id"]), (r[cost], r["val/acc"]), xytext=(4, -10), textcoords="offset points", fontsize=7
        )
    if baseline is not None:
        label, x, y = baseline
        ax.scatter([x], [y], marker="*", s=160, color="tab:red", edgecolor="black", zorder=4, label=label)
    _baseline_lines(ax, baselines)
    xs = [*points[cost], *([baseline[1]] if baseline else [])]
    if min(xs) > 0 and max(xs) / min(xs) > 30:  # parameter counts and costs span decades
        ax.set_xscale("log")
    else:
        ax.xaxis.set_major_formatter(FuncFormatter(lambda x, _: f"{x:,.0f}" if abs(x) >= 1000 else f"{x:g}"))
    ax.set_xlabel(xlabel)
    ax.set_ylabel("final val/acc")
    ax.yaxis.set_major_formatter(PCT)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, loc="lower right")
    ax.set_title(title, fontsize=10)
    return fig
