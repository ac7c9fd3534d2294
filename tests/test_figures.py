"""Which figures a sweep's report gets (reports/figures.py) and how they read (reports/plots.py).

Reports come from a small real MLflow store written by tests/test_reports.py's `Store`; the plot
functions are called directly on small frames and the returned Figure is read back: y-limits,
tick locations, legend and axes extents after a draw.
"""

from __future__ import annotations

import re

import numpy as np
import pandas as pd
import pytest
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from cnnclf.config import PRESETS, TrainConfig
from reports import analysis, build_report, plots
from tests.test_reports import Store

DOC_88 = ("documented baseline (test) 88.00%", 0.88)  # catdog's documented baseline (sweeps.spec.DOCUMENTED)


@pytest.fixture(scope="module")
def reports(tmp_path_factory) -> dict[str, str]:
    """report.md of two sweeps, by name; their PNGs beside it.

    `one-epoch` (cifar10): 12 search trials of one epoch each, 4 SGD and 8 Adam; `six` (catdog):
    6 search trials of two epochs at 50-60%, a re-measured baseline at 80%.
    """
    root = tmp_path_factory.mktemp("figures")
    uri = f"sqlite:///{root / 'mlflow.db'}"
    store = Store(uri, root / "artifacts")
    rng = np.random.default_rng(0)

    one = store.sweep(store.experiment("cifar10"), "one-epoch", 0, num_samples=12, max_epochs=1)
    base = TrainConfig(task="cifar10", model="cnn", epochs=1, depth=4, width=32)
    for i in range(12):
        opt = "sgd" if i < 4 else "adam"
        cfg = base.replace(optimizer=opt, lr=float(10 ** rng.uniform(-4, -1)), depth=int(rng.integers(2, 7)))
        one.trial(f"t_{i:05d}", cfg, (10 * i, 10 * i + 60), [float(rng.uniform(0.3, 0.5))])
    one.finish(300, {"completed": 12})

    six = store.sweep(store.experiment("catdog"), "six", 0, num_samples=6, max_epochs=2)
    cd = PRESETS["catdog-seed"].replace(epochs=2, image_size=64)
    six.trial("b_00000", cd, (0, 100), [0.7, 0.8], role="baseline")
    for i in range(6):
        cfg = cd.replace(optimizer="sgd", lr=0.01 * (i + 1), momentum=0.9, depth=4 + i % 3)
        six.trial(f"d_{i:05d}", cfg, (10 * i, 10 * i + 200), [0.45, 0.5 + 0.02 * i])
    six.finish(400, {"completed": 7})

    out = {}
    for experiment, sweep in (("cifar10", "one-epoch"), ("catdog", "six")):
        files = build_report(uri, experiment, [sweep], root / sweep)
        out[sweep] = files[0].read_text()
        out[f"{sweep}/pngs"] = {p.stem for p in (root / sweep).glob("*.png")}
    return out


def test_a_one_epoch_sweep_has_no_learning_curves_and_says_why(reports):
    assert "learning_curves" not in reports["one-epoch/pngs"]
    md = reports["one-epoch"]
    why = re.search(r"### Learning curves\n\nNot drawn: ([^\n]+)\n", md)
    assert why, md
    assert "every search trial logged a single epoch, so each curve would be one point" in why.group(1)
    assert "learning_curves" in reports["six/pngs"]  # two epochs: curves of two points are drawn


def test_importance_needs_about_ten_trials_and_a_sentence_says_so(reports):
    assert "importance" not in reports["six/pngs"]
    assert (
        "### Hyperparameter importance\n\nNot drawn: 6 completed or early-stopped search trials; fANOVA needs "
        f"about {analysis.MIN_TRIALS} before its ranking means more than noise.\n"
    ) in reports["six"]
    # 12 trials: ranked together; the optimizer families (4 SGD, 8 Adam) are too small on their own
    assert "importance" in reports["one-epoch/pngs"]
    md = reports["one-epoch"]
    assert f"- SGD trials not ranked on their own: 4 of them, and fANOVA needs about {analysis.MIN_TRIALS}" in md
    assert f"- Adam/AdamW trials not ranked on their own: 8 of them, and fANOVA needs about {analysis.MIN_TRIALS}" in md
    assert "importance skipped" not in md


# --- y-axes fit the trials, not a far baseline ------------------------------------------------


def _hist(values: list[float]) -> pd.DataFrame:
    """analysis.history's columns for search trials in start order, each ending a minute and a half apart."""
    h = pd.DataFrame({"value": values, "outcome": "completed"})
    h["number"] = np.arange(1, len(h) + 1)
    h["elapsed_s"] = 90.0 * h["number"]
    h["best_by_number"] = h["best_by_time"] = h["value"].cummax()
    return h


def _curves(lo: float, hi: float, n: int = 3) -> dict[str, pd.Series]:
    return {f"#{i}": pd.Series(np.linspace(lo, hi - 0.01 * i, 4), index=[1, 2, 3, 4]) for i in range(1, n + 1)}


def _pareto(params: list[int], acc: list[float], baseline=None, baselines=()) -> Figure:
    pts = pd.DataFrame({"params": params, "val/acc": acc, "outcome": "completed"})
    pts["trial_id"] = [f"t{i}" for i in range(len(pts))]
    pts["on_front"] = pts["val/acc"] == pts["val/acc"].cummax()
    return plots.pareto(pts, "params", "parameters", baseline, list(baselines), "t")


VALUES = [0.52, 0.55, 0.51, 0.58, 0.60, 0.57]  # trials at 51-60%
FAR = {
    "best_so_far": lambda marks: plots.best_so_far(_hist(VALUES), marks, "t"),
    "compare_best_so_far": lambda marks: plots.compare_best_so_far({"a": _hist(VALUES)}, marks, "t"),
    "pareto": lambda marks: _pareto([1000, 2000, 3000, 4000, 5000, 6000], VALUES, baselines=marks),
}


def _data_range(name: str) -> tuple[float, float]:
    vals = _hist(VALUES)["best_by_number"] if name == "compare_best_so_far" else VALUES
    return min(vals), max(vals)


@pytest.mark.parametrize("name", sorted(FAR))
@pytest.mark.parametrize(("mark", "arrow"), [(DOC_88, "↑"), (("re-measured baseline (val) 20.00%", 0.20), "↓")])
def test_a_far_baseline_does_not_stretch_the_y_axis_and_is_named_at_the_edge(name, mark, arrow):
    fig = FAR[name]([mark])
    lo, hi = _data_range(name)
    for ax in fig.axes:
        bottom, top = ax.get_ylim()
        assert bottom <= lo and top >= hi  # every trial visible
        assert hi - lo > 0.3 * (top - bottom)  # and the trials fill most of the height, not a sliver
        assert not any(set(line.get_ydata()) == {mark[1]} for line in ax.get_lines())  # no line for it
    texts = [t.get_text() for ax in fig.axes for t in ax.texts]
    assert any(mark[0] in t and arrow in t for t in texts), texts


@pytest.mark.parametrize("name", sorted(FAR))
def test_a_near_baseline_is_a_line(name):
    fig = FAR[name]([("documented baseline (test) 61.00%", 0.61)])  # 1 point above 60%: within 15% of the span
    ax = fig.axes[0]
    assert any(set(line.get_ydata()) == {0.61} for line in ax.get_lines())
    assert ax.get_ylim()[1] > 0.61
    assert not any("61.00%" in t.get_text() for t in ax.texts)


def test_learning_curves_name_a_far_baseline_curve_at_the_edge():
    fig = plots.learning_curves(_curves(0.2, 0.32), ("baseline b_00000", pd.Series([0.7, 0.8], index=[1, 2])))
    ax = fig.axes[0]
    assert ax.get_ylim()[1] < 0.4  # the trials at 20-32% fill the plot
    assert [line.get_label() for line in ax.get_lines()] == ["#1", "#2", "#3"]
    assert any("baseline b_00000: 80.00% at epoch 2" in t.get_text() and "↑" in t.get_text() for t in ax.texts)
    near = plots.learning_curves(_curves(0.6, 0.75), ("baseline b_00000", pd.Series([0.55, 0.7], index=[1, 2])))
    assert "baseline b_00000" in [line.get_label() for line in near.axes[0].get_lines()]


def test_tick_labels_show_the_decimals_the_step_needs():
    fig = plots.best_so_far(_hist([0.742, 0.745]), [], "t")  # a 0.3-point range: ticks a fraction of a point apart
    FigureCanvasAgg(fig).draw()
    labels = [t.get_text() for t in fig.axes[0].get_yticklabels()]
    assert len(labels) == len(set(labels)) > 2, labels  # PercentFormatter(decimals=0) printed "74%" repeatedly


# --- integer axes -----------------------------------------------------------------------------


def _visible_ticks(axis) -> list[float]:
    lo, hi = sorted(axis.get_view_interval())
    return [t for t in axis.get_majorticklocs() if lo - 1e-9 <= t <= hi + 1e-9]


@pytest.mark.parametrize("n", [1, 3, 14])
def test_trial_numbers_have_integer_ticks(n):
    for fig in (
        plots.best_so_far(_hist(list(np.linspace(0.5, 0.6, n))), [], "t"),
        plots.compare_best_so_far({"a": _hist(list(np.linspace(0.5, 0.6, n)))}, [], "t"),
    ):
        FigureCanvasAgg(fig).draw()
        ticks = _visible_ticks(fig.axes[0].xaxis)
        assert ticks and all(float(t).is_integer() for t in ticks), ticks


def test_epochs_and_parameter_counts_have_integer_ticks():
    fig = plots.learning_curves({"#1": pd.Series([0.5, 0.6], index=[1, 2])}, None)
    pareto = _pareto([1000, 1001, 1003], [0.5, 0.55, 0.6])  # a linear axis a few parameters wide
    for f in (fig, pareto):
        FigureCanvasAgg(f).draw()
        ticks = _visible_ticks(f.axes[0].xaxis)
        assert ticks and all(float(t).is_integer() for t in ticks), ticks


def test_parallel_coordinates_label_integer_params_with_integers():
    df = pd.DataFrame(
        {
            "lr": [0.001, 0.003, 0.01, 0.03, 0.1, 0.0005, 0.002, 0.02],
            "depth": [2, 3, 4, 5, 6, 7, 8, 9],  # 8 values: a numeric axis, not one tick per value
            "width": [16, 24, 32, 48, 64, 96, 128, 16],
            "batch_size": [32, 64, 128, 256, 32, 64, 128, 256],
            "val/acc": np.linspace(0.5, 0.7, 8),
        }
    )
    params = ["lr", "depth", "width", "batch_size"]
    ax = plots.parallel_coordinates(df, params, "val/acc", ("lr",)).axes[0]
    for j, name in enumerate(params):
        labels = [t.get_text() for t in ax.texts if round(t.get_position()[0] - 0.04) == j]
        assert labels, name
        if name != "lr":
            assert all(re.fullmatch(r"\d+", s) for s in labels), (name, labels)
    depth = [int(t.get_text()) for t in ax.texts if round(t.get_position()[0] - 0.04) == 1]
    assert min(depth) == 2 and max(depth) == 9


# --- legends outside the data -----------------------------------------------------------------

LEGENDS = {
    "best_so_far": lambda: plots.best_so_far(_hist(VALUES), [DOC_88, ("re-measured (val) 55.00%", 0.55)], "t"),
    "compare_best_so_far": lambda: plots.compare_best_so_far({"a": _hist(VALUES), "b": _hist(VALUES[::-1])}, [], "t"),
    "learning_curves": lambda: plots.learning_curves(
        _curves(0.5, 0.6, 5), ("baseline b_00000", pd.Series([0.5, 0.55], index=[1, 2]))
    ),
    "pareto": lambda: _pareto([1000, 2000, 3000, 4000, 5000, 6000], VALUES, ("baseline b_0", 3500, 0.54), [DOC_88]),
    "per_class": lambda: plots.per_class(["cat", "dog"], {"best": [0.8, 0.9], "baseline": [0.7, 0.75]}),
}


@pytest.mark.parametrize("name", sorted(LEGENDS))
def test_legends_sit_outside_every_axes(name):
    fig = LEGENDS[name]()
    FigureCanvasAgg(fig).draw()
    legends = [ax.get_legend() for ax in fig.axes if ax.get_legend() is not None]
    assert len(legends) == 1
    box = legends[0].get_window_extent()
    for ax in fig.axes:
        assert not box.overlaps(ax.get_window_extent()), (name, box, ax.get_window_extent())


def test_saved_png_keeps_the_legend(tmp_path):
    from PIL import Image

    fig = LEGENDS["best_so_far"]()
    width_in = fig.get_figwidth()
    path = plots.save(fig, tmp_path / "b.png")
    with Image.open(path) as im:
        assert im.size[0] > width_in * plots.DPI  # bbox_inches="tight" widened the PNG to hold the legend
