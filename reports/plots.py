"""The report's figures, drawn with matplotlib's Agg canvas (no pyplot state, no display needed).

Every function takes plain data and returns a Figure; `save` writes it as PNG. Accuracies are
fractions in the data and percent on the axes. Y-axes fit the trials' values, not the baselines' (`_fit_y`);
legends sit outside the axes, so none covers a point or a line.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from pathlib import Path

import numpy as np
import pandas as pd
from matplotlib.axes import Axes
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.cm import ScalarMappable
from matplotlib.colors import Normalize
from matplotlib.figure import Figure
from matplotlib.ticker import Formatter, FuncFormatter, MaxNLocator

DPI = 100  # small PNGs: the HTML embeds every one of them
OUTCOME_COLORS = {"completed": "tab:blue", "early_stopped": "tab:gray"}
LABEL_BOX = {"boxstyle": "square,pad=0.1", "fc": "white", "ec": "none", "alpha": 0.75}  # tick labels over lines
NEAR = 0.15  # a baseline within this fraction of the trials' span of their range is a line; farther, a note at the edge
MIN_SPAN = 0.02  # accuracy (fraction): a narrower range (one trial) is widened to 2 points around its middle
MARGIN = 0.06  # of the y-range, between the data and the axes' edge
NOTE_LINE = 0.075  # of the axes' height, reserved per line of edge notes (8 pt text on the plots' ~300 px axes)
BASELINE_STYLES = ("--", ":", "-.")
LEGEND_OUTSIDE = {"loc": "upper left", "bbox_to_anchor": (1.02, 1.0), "borderaxespad": 0.0, "fontsize": 8}


class Pct(Formatter):
    """Percent tick labels with the decimals the tick step needs: 70%, 72.5%, 74.25% (accuracy as a fraction).

    PercentFormatter has fixed decimals (repeated labels on a 2-point axis) or decimals from the axis
    range; this reads the ticks' own step. One instance per axis: it keeps that axis' decimals.
    """

    decimals = 0

    def set_locs(self, locs) -> None:
        locs = np.sort(np.asarray(locs, dtype=float))
        step = float(np.diff(locs).min()) * 100 if len(locs) > 1 else 1.0
        self.decimals = next((d for d in range(4) if abs(step * 10**d - round(step * 10**d)) < 1e-6), 4)

    def __call__(self, x: float, pos=None) -> str:
        return f"{x * 100:.{self.decimals}f}%"


def save(fig: Figure, path: Path) -> Path:
    FigureCanvasAgg(fig)
    fig.savefig(path, format="png", dpi=DPI, bbox_inches="tight")
    return path


def near(value: float, data: Iterable[float]) -> bool:
    """Whether a baseline `value` lies within the range of `data` or within NEAR of its span outside it."""
    vals = np.asarray(data, dtype=float)
    vals = vals[np.isfinite(vals)]
    if not len(vals):
        return True
    lo, hi = vals.min(), vals.max()
    slack = NEAR * max(hi - lo, MIN_SPAN)
    return lo - slack <= value <= hi + slack


def _fit_y(axes: Sequence[Axes], data: Iterable[float], baselines: list[tuple[str, float]]) -> None:
    """Y-limits from `data` (the trials' values) alone, and the baselines on every one of `axes`.

    A baseline `near` the data is a red horizontal line (in the legend); one farther off is a red note
    at the top or bottom edge ("↑ documented baseline (test) 88.00%, off the scale"), in a strip of the
    axes kept free of data, so a far baseline never squeezes the trials into a sliver of the plot.
    """
    vals = np.asarray(data, dtype=float)
    vals = vals[np.isfinite(vals)]
    lines, above, below = [], [], []
    for i, (label, value) in enumerate(baselines):
        if near(value, vals):
            lines.append((label, value, BASELINE_STYLES[i % len(BASELINE_STYLES)]))
        else:
            (above if value > vals.max() else below).append(label)
    for ax in axes:
        for label, value, style in lines:
            ax.axhline(value, color="tab:red", ls=style, lw=1.2, label=label)
    if not len(vals):
        return
    shown = np.append(vals, [v for _, v, _ in lines])
    lo, hi = shown.min(), shown.max()
    if hi - lo < MIN_SPAN:
        mid = (lo + hi) / 2
        lo, hi = mid - MIN_SPAN / 2, mid + MIN_SPAN / 2
        if vals.min() >= 0 and vals.max() <= 1:  # accuracies: no tick past 100% or below 0%
            shift = hi - 1 if hi > 1 else min(lo, 0.0)
            lo, hi = lo - shift, hi - shift
    strip_top = NOTE_LINE * len(above) + (0.02 if above else 0)
    strip_bottom = NOTE_LINE * len(below) + (0.02 if below else 0)
    full = (hi - lo) * (1 + 2 * MARGIN) / (1 - strip_top - strip_bottom)  # data range + margins + strips
    margin = MARGIN * (hi - lo)
    for ax in axes:
        ax.set_ylim(lo - margin - strip_bottom * full, hi + margin + strip_top * full)
        for labels, arrow, y, va in ((above, "↑", 0.985, "top"), (below, "↓", 0.015, "bottom")):
            if labels:
                text = "\n".join(f"{arrow} {label}, off the scale" for label in labels)
                ax.annotate(text, (0.01, y), xycoords="axes fraction", ha="left", va=va, fontsize=8, color="tab:red")


def best_so_far(hist: pd.DataFrame, baselines: list[tuple[str, float]], title: str) -> Figure:
    """val/acc per search trial and the best so far, against trial number and against wall time."""
    fig = Figure(figsize=(11, 4))
    ax1, ax2 = fig.subplots(1, 2, sharey=True)
    for outcome, color in OUTCOME_COLORS.items():
        h = hist[(hist["outcome"] == outcome) & hist["value"].notna()]
        if h.empty:
            continue  # no legend entry for an outcome no trial had
        ax1.scatter(h["number"], h["value"], s=18, color=color, label=outcome.replace("_", "-"), zorder=3)
        ax2.scatter(h["elapsed_s"] / 60, h["value"], s=18, color=color, zorder=3)
    ax1.step(hist["number"], hist["best_by_number"], where="post", color="tab:green", lw=2, label="best so far")
    t = hist[hist["best_by_time"].notna()].sort_values("elapsed_s")
    ax2.step(t["elapsed_s"] / 60, t["best_by_time"], where="post", color="tab:green", lw=2)
    return _by_number_and_time(fig, hist["value"], baselines, title, "final val/acc", " (min, at the trial's end)")


def _by_number_and_time(
    fig: Figure, data, baselines: list[tuple[str, float]], title: str, ylabel: str, unit: str
) -> Figure:
    """The shared frame of the two-panel plots: by trial number (left) and by wall time (right)."""
    ax1, ax2 = fig.axes
    _fit_y((ax1, ax2), data, baselines)
    for ax in (ax1, ax2):
        ax.yaxis.set_major_formatter(Pct())
        ax.grid(alpha=0.3)
    ax1.xaxis.set_major_locator(MaxNLocator(integer=True, min_n_ticks=1))
    ax1.set_xlabel("trial number (start order)")
    ax2.set_xlabel("wall time since the sweep started" + unit)
    ax1.set_ylabel(ylabel)
    ax2.legend(*ax1.get_legend_handles_labels(), **LEGEND_OUTSIDE)  # right of both panels
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
    data = [v for h in hists.values() for col in ("best_by_number", "best_by_time") for v in h[col]]
    return _by_number_and_time(fig, data, baselines, title, "best val/acc so far", " (min)")


def learning_curves(curves: dict[str, pd.Series], baseline: tuple[str, pd.Series] | None) -> Figure:
    """val/acc per epoch of the top trials, and the baseline's dashed where it ends near them (else a note)."""
    fig = Figure(figsize=(7, 4.2))
    ax = fig.subplots()
    data = [v for s in curves.values() for v in s.values]
    for label, s in curves.items():
        ax.plot(s.index, s.values, marker="o", ms=3, lw=1.5, label=label)
    far = []
    if baseline is not None and len(baseline[1]):
        label, s = baseline
        if near(s.iloc[-1], data):
            ax.plot(s.index, s.values, color="black", ls="--", lw=1.2, label=label)
            data += list(s.values)
        else:
            far.append((f"{label}: {s.iloc[-1]:.2%} at epoch {s.index[-1]}", float(s.iloc[-1])))
    _fit_y([ax], data, far)
    ax.set_xlabel("epoch")
    ax.xaxis.set_major_locator(MaxNLocator(integer=True, min_n_ticks=1))
    ax.set_ylabel("val/acc")
    ax.yaxis.set_major_formatter(Pct())
    ax.grid(alpha=0.3)
    ax.legend(**LEGEND_OUTSIDE)
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
        integer = numeric and name != metric and all(float(v).is_integer() for v in present)
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
            if integer:  # depth, width, batch size...: whole numbers, each where it falls on the axis
                ints = sorted({round(10**t if use_log else t) for t in tick_vals})
                tick_vals, labels = np.array([tr(float(v)) for v in ints]), [str(v) for v in ints]
            else:
                labels = [
                    f"{10**t:.2g}" if use_log else (f"{t:.1%}" if name == metric else f"{t:.3g}") for t in tick_vals
                ]
            ticks.append((list((tick_vals - lo) / span), labels))
        else:
            k = len(distinct)
            where = {v: (i / (k - 1) if k > 1 else 0.5) for i, v in enumerate(distinct)}
            for i, v in enumerate(col):
                pos[i, j] = where.get(v, na_at) if v in present else na_at
            ticks.append((list(where.values()), [str(int(v)) if integer else str(v) for v in distinct]))
        if len(present) < n:
            ticks[-1][0].append(na_at)
            ticks[-1][1].append("n/a")
    fig = Figure(figsize=(max(7, 1.15 * len(axes)), 4.5))
    ax = fig.subplots()
    values = df[metric].to_numpy(dtype=float)
    norm_lo, norm_hi = np.nanmin(values), np.nanmax(values)
    mappable = ScalarMappable(Normalize(norm_lo, norm_hi), cmap="viridis")
    fig.colorbar(mappable, ax=ax, format=Pct(), pad=0.02, label=metric)
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
    ax.set_ylim(0, 1)  # bars start at zero: a bar's height is its accuracy
    ax.yaxis.set_major_formatter(Pct())
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
    fig.colorbar(im, ax=ax, format=Pct(), fraction=0.046, pad=0.04)
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
    _fit_y([ax], [*points["val/acc"], *([baseline[2]] if baseline else [])], baselines)
    xs = [*points[cost], *([baseline[1]] if baseline else [])]
    if min(xs) > 0 and max(xs) / min(xs) > 30:  # parameter counts and costs span decades
        ax.set_xscale("log")
    else:
        ax.xaxis.set_major_formatter(FuncFormatter(lambda x, _: f"{x:,.0f}" if abs(x) >= 1000 else f"{x:g}"))
        if all(float(x).is_integer() for x in xs):  # parameter counts: no 2,500.5
            ax.xaxis.set_major_locator(MaxNLocator(integer=True, min_n_ticks=1))
    ax.set_xlabel(xlabel)
    ax.set_ylabel("final val/acc")
    ax.yaxis.set_major_formatter(Pct())
    ax.grid(alpha=0.3)
    ax.legend(**LEGEND_OUTSIDE)
    ax.set_title(title, fontsize=10)
    return fig
